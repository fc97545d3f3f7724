"""An image whose structure would make header parsing cost more than its size allows is refused
after reading a bounded part of it."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image

from pipeline.model.image_header import MAX_PNG_CHUNKS, ImageHeaderError, check_structure


def _png_with_chunks(extra: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    data = buffer.getvalue()
    first_data = data.index(b"IDAT") - 4
    text = b"Comment\x00hello"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    return data[:first_data] + chunk * extra + data[first_data:]


def test_ordinary_images_pass() -> None:
    check_structure(_png_with_chunks(MAX_PNG_CHUNKS // 2))
    for fmt in ("JPEG", "WEBP", "GIF"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, fmt)
        check_structure(buffer.getvalue())
    check_structure(_png_with_chunks(3)[:40])  # truncated: left to Pillow to report


def test_a_png_padded_with_chunks_is_refused_after_reading_a_bounded_part() -> None:
    with pytest.raises(ImageHeaderError, match=f"more than {MAX_PNG_CHUNKS} chunks before its image data"):
        check_structure(_png_with_chunks(MAX_PNG_CHUNKS))
    padded = _png_with_chunks(1_000_000)
    started = time.perf_counter()
    with pytest.raises(ImageHeaderError):
        check_structure(padded)
    assert time.perf_counter() - started < 0.5  # Pillow takes seconds over the same file
