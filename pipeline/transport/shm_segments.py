"""Named POSIX shared-memory segments for the shm transport: create, open, sweep.

A segment is a file in /dev/shm named `dvd-shm-<pid>-<start>-<seq>`, where <pid> and
<start> (the process start time in clock ticks) identify the process that created it,
so a later process can tell a stale segment of a dead process from a live one. Its first
64 bytes are a control block that sender and receiver share:

    offset 0   8 bytes   magic b"DVDSHM01"
    offset 8   u64       state: 0 free, 1 sent (the receiver owns the payload)
    offset 16  u64       generation: bumped by the sender for every payload

The payload follows at offset 64. Only the receiver turns a sent segment back to free;
only the sender bumps the generation and turns free to sent. A payload travels to the
receiver as a handle, `DVDSHM1 <name> <generation> <nbytes>`.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "dvd-shm-"
NAME_RE = re.compile(r"dvd-shm-(\d+)-(\d+)-(\d+)")
MAGIC = b"DVDSHM01"
CONTROL_BYTES = 64
FREE, SENT = 0, 1
HANDLE_MAGIC = b"DVDSHM1"
_U64 = struct.Struct("<Q")


def encode_handle(name: str, generation: int, nbytes: int) -> bytes:
    return b"%s %s %d %d" % (HANDLE_MAGIC, name.encode(), generation, nbytes)


def parse_handle(data: bytes) -> tuple[str, int, int]:
    """(segment name, generation, payload bytes); ValueError if `data` is not a handle."""
    parts = data.split(b" ")
    if len(parts) != 4 or parts[0] != HANDLE_MAGIC:
        raise ValueError(f"not a shared-memory handle: {data[:64]!r}")
    return parts[1].decode("ascii"), int(parts[2]), int(parts[3])


def process_start_ticks(pid: int) -> int | None:
    """The start time of a live process (field 22 of /proc/<pid>/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it start past the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def segment_prefix(pid: int | None = None) -> str:
    """The name prefix of every segment created by process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{PREFIX}{pid}-{process_start_ticks(pid)}-"


def sweep_stale_segments() -> list[str]:
    """Unlink segments whose creating process no longer runs; return their names."""
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        match = NAME_RE.fullmatch(path.name)
        if match is None:
            continue
        pid, start = int(match.group(1)), int(match.group(2))
        if process_start_ticks(pid) == start:
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:  # gone already, or another user's file: not ours to remove
            pass
    return removed


class Segment:
    """One mapped segment: control block plus payload area."""

    def __init__(self, name: str, mapping: mmap.mmap) -> None:
        self.name = name
        self.mapping = mapping
        self.capacity = len(mapping) - CONTROL_BYTES

    @classmethod
    def create(cls, name: str, capacity: int) -> Segment:
        """Create and map a new segment (the name must not exist yet)."""
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserve the pages now: a full /dev/shm then fails here with ENOSPC instead of
            # killing a writer or reader with SIGBUS later.
            os.posix_fallocate(fd, 0, CONTROL_BYTES + capacity)
            mapping = mmap.mmap(fd, CONTROL_BYTES + capacity)
        except BaseException:
            os.unlink(SHM_DIR / name)
            raise
        finally:
            os.close(fd)
        mapping[:8] = MAGIC
        return cls(name, mapping)

    @classmethod
    def open(cls, name: str) -> Segment:
        """Map an existing segment by name; raise OSError or ValueError if it is not one of ours."""
        if NAME_RE.fullmatch(name) is None:
            raise ValueError(f"{name!r} is not a DvD shared-memory segment name")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < CONTROL_BYTES:
                raise ValueError(f"segment {name} is too small ({size} bytes)")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if mapping[:8] != MAGIC:
            mapping.close()
            raise ValueError(f"segment {name} has no DvD control block")
        return cls(name, mapping)

    @property
    def state(self) -> int:
        return _U64.unpack_from(self.mapping, 8)[0]

    @state.setter
    def state(self, value: int) -> None:
        _U64.pack_into(self.mapping, 8, value)

    @property
    def generation(self) -> int:
        return _U64.unpack_from(self.mapping, 16)[0]

    @generation.setter
    def generation(self, value: int) -> None:
        _U64.pack_into(self.mapping, 16, value)

    def write(self, payload: memoryview | bytes) -> None:
        data = memoryview(payload).cast("B")
        self.mapping[CONTROL_BYTES : CONTROL_BYTES + data.nbytes] = data

    def unlink(self) -> None:
        try:
            os.unlink(SHM_DIR / self.name)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap (the caller guarantees no view of the payload is alive)."""
        self.mapping.close()
