import sys

from proto.build import build

done = build(force="--force" in sys.argv)
print(f"proto: {len(done)} file(s) compiled" if done else "proto: stubs up to date")
