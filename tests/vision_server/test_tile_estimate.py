"""The language side's cheap tile counts agree with what the vision server makes, and the request
limits on tiles and videos are enforced before any job is sent."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from language_server.request import GenerationRequest
from language_server.tile_estimate import estimate_tiles, image_size as estimated_size, image_tiles, video_tiles
from pipeline.model.tiling import tile_count
from pipeline.client import image, message, video
from pipeline.config import ImageLimits, load_config
from pipeline.errors import InvalidRequest
from pipeline.wire import VisionJob
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import TINY_CONFIG, photo_bytes
from vision_server.preprocess import TilingParams, decode_image, find_grid, tile_image
from vision_server.preprocess import image_size as vision_image_size


def encoded(width: int, height: int, fmt: str = "PNG", **options) -> bytes:
    pixels = np.random.default_rng(width * 7 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def test_grid_rule_matches_the_vision_server_on_a_sweep():
    sides = [1, 7, 100, 224, 447, 448, 449, 600, 896, 1000, 1344, 2000, 3000]
    for max_tiles in (1, 6, 12):
        for width in sides:
            for height in sides:
                cols, rows = find_grid(width, height, 1, max_tiles)
                expected = cols * rows + (1 if cols * rows > 1 else 0)
                assert tile_count(width, height, 1, max_tiles, use_thumbnail=True) == expected, (width, height)


@pytest.mark.parametrize("name", ["coffee", "astronaut", "chelsea", "rocket", "camera"])
@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_header_estimate_equals_the_tiles_made(name, max_tiles):
    data = photo_bytes(name)
    made = len(tile_image(decode_image(data, ImageLimits()), TilingParams(max_tiles=max_tiles)))
    assert image_tiles(data, 1, max_tiles, use_thumbnail=True) == made


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True}), ("JPEG", {})])
def test_exif_rotation_is_honoured_in_every_format(fmt, options, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # stored 1050 x 300, shown upright as 300 x 1050
    data = encoded(1050, 300, fmt, exif=exif.tobytes(), **options)
    made = len(tile_image(decode_image(data, ImageLimits()), TilingParams()))
    assert image_tiles(data, 1, 12, use_thumbnail=True) == made == 5  # a 1x4 grid and the thumbnail
    assert tile_count(1050, 300, 1, 12, use_thumbnail=True) == 4  # what ignoring the rotation gives
    assert vision_image_size(data, ImageLimits()) == estimated_size(data) == (300, 1050)


def test_reading_the_upright_size_of_a_png_decodes_no_pixel(monkeypatch):
    """PngImageFile.getexif() decodes the image when its header has no eXIf chunk; the size
    readers on both sides must not."""
    loads = []
    original = PngImagePlugin.PngImageFile.load

    def counting_load(self):
        loads.append(self.size)
        return original(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting_load)
    exif = Image.Exif()
    exif[0x0112] = 6
    for data, size in ((encoded(640, 480), (640, 480)), (encoded(640, 480, exif=exif.tobytes()), (480, 640))):
        assert vision_image_size(data, ImageLimits()) == estimated_size(data) == size
    assert loads == []
    decode_image(encoded(64, 48), ImageLimits())
    assert loads and set(loads) == {(64, 48)}  # the counter does see a decode


def test_job_estimates_fall_back_to_the_largest_grid():
    assert estimate_tiles(VisionJob("a", "r", "image", b"garbage", "x", max_tiles=6)) == 7
    assert estimate_tiles(VisionJob("b", "r", "image", photo_bytes("astronaut"), "x")) == 1
    assert estimate_tiles(VisionJob("c", "r", "video", b"clip", "x", num_segments=8, max_tiles=1)) == 8
    assert video_tiles(4, 2, use_thumbnail=True) == 12


CONFIG = load_config(TINY_CONFIG)


def request(*parts) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[message("user", *parts, "What is this?")])


@pytest.mark.parametrize(
    ("parts", "overrides", "error"),
    [
        ((image(photo_bytes("coffee")),) * 3, {"images.max_tiles_per_request": 20}, "21 tiles, over the limit of 20"),
        ((video(b"clip", num_segments=65),), {}, "num_segments must be in 1..64"),
        ((video(b"clip", max_tiles_per_frame=5),), {}, "max_tiles_per_frame must be in 1..4"),
        ((video(b"x" * 2000),), {"video.max_video_bytes": 1000}, "video is 2000 bytes, over the limit of 1000"),
        ((video(b"clip", num_segments=40),), {"images.max_tiles_per_request": 32}, "40 tiles, over the limit of 32"),
        # 2 tiles per frame make 3 with the thumbnail (InternVL's load_video): 8 frames are 24 tiles
        ((video(b"clip", num_segments=8, max_tiles_per_frame=2),), {"images.max_tiles_per_request": 20},
         "24 tiles, over the limit of 20"),
        ((pb.ContentPart(video=pb.VideoInput(data=b"clip", start_s=-2.0)),), {}, "start_s must be in 0..3600"),
    ],
)
def test_request_limits(parts, overrides, error):
    config = load_config(TINY_CONFIG, overrides) if overrides else CONFIG
    with pytest.raises(InvalidRequest) as info:
        GenerationRequest.from_pb(request(*parts), config)
    assert error in str(info.value)


def test_video_defaults_come_from_the_config():
    config = load_config(TINY_CONFIG, {"video.num_segments": 5, "video.tiles_per_frame": 2})
    (part,) = GenerationRequest.from_pb(request(video(b"clip")), config).media
    assert (part.num_segments, part.max_tiles_per_frame) == (5, 2)
    ok = GenerationRequest.from_pb(request(*(image(photo_bytes("coffee")),) * 3), CONFIG)
    assert len(ok.media) == 3


def _tiff_exif(count: int, entries: list[tuple[int, int, bytes]]) -> bytes:
    """A big-endian TIFF EXIF block whose IFD says it has `count` entries: (tag, type, value) each,
    one value of four bytes or less."""
    ifd = b"".join(struct.pack(">HHI", tag, kind, 1) + value.ljust(4, b"\x00") for tag, kind, value in entries)
    return b"MM\x00\x2a" + struct.pack(">IH", 8, count) + ifd + b"\x00\x00\x00\x00"


_ORIENTATION_6 = (0x0112, 3, b"\x00\x06")  # SHORT 6: rotate 90 degrees when displayed
CORRUPT_EXIF = {  # name: (format, EXIF block, upright size of a stored 1050 x 300 image)
    "orientation_of_type_undefined": ("JPEG", _tiff_exif(1, [(0x0112, 7, b"\x06")]), (1050, 300)),
    "orientation_of_type_ascii": ("JPEG", _tiff_exif(1, [(0x0112, 2, b"6\x00")]), (1050, 300)),
    "rational_tag_of_type_undefined": ("JPEG", _tiff_exif(2, [_ORIENTATION_6, (0x011A, 7, b"abcd")]), (300, 1050)),
    "png_claiming_65535_tags": ("PNG", _tiff_exif(0xFFFF, [_ORIENTATION_6, (0x0128, 2, b"abc")]), (300, 1050)),
    "not_tiff_at_all": ("PNG", b"this is no EXIF block", (1050, 300)),
}


@pytest.mark.parametrize("case", list(CORRUPT_EXIF))
def test_a_corrupt_exif_block_is_ignored_and_both_sides_agree(case, caplog):
    fmt, block, upright = CORRUPT_EXIF[case]
    data = encoded(1050, 300, fmt, exif=(b"Exif\x00\x00" + block) if fmt == "JPEG" else block)
    decoded = decode_image(data, ImageLimits())
    assert decoded.size == upright
    made = len(tile_image(decoded, TilingParams()))
    assert image_tiles(data, 1, 12, use_thumbnail=True) == made
    assert vision_image_size(data, ImageLimits()) == estimated_size(data) == upright
    if upright == (1050, 300):
        assert "EXIF" in caplog.text  # a warning says what was ignored
