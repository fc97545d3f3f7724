"""python -m language_server --config configs/tiny.yaml [--set key=value ...]"""

from __future__ import annotations

import sys

from pipeline.runtime.process import server_args


def main(argv: list[str] | None = None) -> int:
    _, config = server_args("python -m language_server", "Run the DvD language server.", argv)
    from language_server.server import run_until_signalled

    run_until_signalled(config, "language")
    return 0


if __name__ == "__main__":
    sys.exit(main())
