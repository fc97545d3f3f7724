"""Generate the Python stubs of proto/dvd/v1/*.proto (never committed).

`python -m proto` regenerates stale stubs (`--force`: all); importing `proto` does the same,
so the stubs always match their .proto sources.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
SOURCES = sorted((PROTO_DIR / "dvd" / "v1").glob("*.proto"))


def _outputs(source: Path) -> list[Path]:
    stem = source.with_suffix("")
    return [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2_grpc.py"), Path(f"{stem}_pb2.pyi")]


def stale() -> list[Path]:
    """The .proto files whose stubs are missing or older than the source."""
    return [
        src
        for src in SOURCES
        if any(not out.exists() or out.stat().st_mtime < src.stat().st_mtime for out in _outputs(src))
    ]


def build(force: bool = False) -> list[Path]:
    """Compile stale (or, with force, all) sources; returns the compiled ones."""
    if not force and not stale():
        return []
    from grpc_tools import protoc
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    lock_path = PROTO_DIR / ".build.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = SOURCES if force else stale()
        for src in todo:
            args = [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"-I{well_known}",
                f"--python_out={ROOT}",
                f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}",
                str(src.relative_to(ROOT)),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {src}")
        return todo
