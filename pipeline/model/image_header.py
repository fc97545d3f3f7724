"""Checks an encoded image's structure before Pillow parses its header, so that parsing never
costs more than the image's size allows.

Pillow reads a PNG's chunks one by one up to the first image data (IDAT), in Python: millions of
empty chunks padded in front of the pixels cost seconds before a single pixel is decoded. Real
files carry a handful there (IHDR, palette, colour profile, text, EXIF), so a PNG with more than
MAX_PNG_CHUNKS before its image data is refused after reading at most that many chunk headers.
"""

from __future__ import annotations

import struct

MAX_PNG_CHUNKS = 1000  # before the first IDAT
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_HEAD = struct.Struct(">I4s")  # length, type; a 4-byte CRC follows the data


class ImageHeaderError(ValueError):
    """The encoded image's structure is refused before its header is parsed."""


def check_structure(data: bytes, max_png_chunks: int = MAX_PNG_CHUNKS) -> None:
    """Raise ImageHeaderError when parsing `data`'s header would cost more than its size allows."""
    if data.startswith(PNG_SIGNATURE):
        _check_png_chunks(data, max_png_chunks)


def _check_png_chunks(data: bytes, limit: int) -> None:
    offset = len(PNG_SIGNATURE)
    for _ in range(limit):
        if offset + _CHUNK_HEAD.size > len(data):
            return  # truncated: Pillow says so
        length, kind = _CHUNK_HEAD.unpack_from(data, offset)
        if kind in (b"IDAT", b"IEND"):
            return
        offset += _CHUNK_HEAD.size + length + 4
    raise ImageHeaderError(f"PNG has more than {limit} chunks before its image data")
