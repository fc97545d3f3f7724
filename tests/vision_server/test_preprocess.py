"""vision_server.preprocess: decoding policy, and tiling/normalisation against transformers' GotOcr2 processor."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from skimage import data as skdata
from transformers.image_transforms import convert_to_rgb
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from pipeline.config import ImageLimits
from pipeline.model.tiny_processors import build_image_processor
from tests.vision_server.helpers import preprocess_image
from vision_server.preprocess import (
    ImageError,
    TilingParams,
    decode_image,
    find_grid,
    tile_image,
    to_pixel_values,
)

LIMITS = ImageLimits()


@pytest.fixture(scope="module")
def oracle():
    return build_image_processor()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def oracle_pixels(oracle, image: Image.Image, max_tiles: int) -> torch.Tensor:
    return oracle(images=[image], max_patches=max_tiles, return_tensors="pt")["pixel_values"]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# --- agreement with the oracle ---------------------------------------------------------------

PHOTOS = {
    "astronaut": lambda: Image.fromarray(skdata.astronaut()),
    "coffee": lambda: Image.fromarray(skdata.coffee()),
    "chelsea": lambda: Image.fromarray(skdata.chelsea()),
    "rocket": lambda: Image.fromarray(skdata.rocket()),
    "camera": lambda: Image.fromarray(skdata.camera()),  # grayscale
    "chelsea_4x3": lambda: Image.fromarray(skdata.chelsea()).resize((1200, 900)),  # a 12-tile grid
    "wide_2000x100": lambda: noise(2000, 100, seed=1),
    "tall_100x2000": lambda: noise(100, 2000, seed=2),
}


@pytest.mark.parametrize("max_tiles", [1, 6, 12])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_matches_oracle_from_bytes(oracle, name, max_tiles):
    payload = encode(PHOTOS[name](), "PNG")
    ours = preprocess_image(payload, TilingParams(max_tiles=max_tiles), LIMITS)
    expected = oracle_pixels(oracle, Image.open(io.BytesIO(payload)), max_tiles)
    assert ours.dtype == torch.float32
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_matches_oracle_on_jpeg_bytes(oracle):
    payload = encode(Image.fromarray(skdata.coffee()), "JPEG", quality=90)
    ours = preprocess_image(payload, TilingParams(), LIMITS)
    expected = oracle_pixels(oracle, Image.open(io.BytesIO(payload)), 12)
    assert ours.shape == expected.shape == (7, 3, 448, 448)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_matches_oracle_on_rgba(oracle):
    rgba = np.asarray(Image.fromarray(skdata.astronaut()).resize((600, 300))).copy()
    alpha = np.linspace(0, 255, 600, dtype=np.uint8)[None, :].repeat(300, axis=0)
    image = Image.fromarray(np.dstack([rgba, alpha]))
    payload = encode(image, "PNG")
    ours = preprocess_image(payload, TilingParams(), LIMITS)
    expected = oracle_pixels(oracle, Image.open(io.BytesIO(payload)), 12)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (7, 1), (3, 500), (2000, 100)])
@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_tiny_and_extreme_shapes_match_oracle(oracle, size, max_tiles):
    image = noise(*size, seed=size[0] * 31 + size[1])
    ours = to_pixel_values(tile_image(image, TilingParams(max_tiles=max_tiles)))
    expected = oracle_pixels(oracle, image, max_tiles)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_find_grid_matches_oracle_sweep():
    sides = sorted({*range(1, 3000, 53), 100, 224, 448, 896, 1344, 1792, 2240, 2688})
    for min_tiles, max_tiles, tile in [(1, 12, 448), (1, 6, 448), (2, 8, 448), (1, 1, 448), (1, 40, 448), (1, 12, 224)]:
        for width in sides:
            for height in sides:
                expected = get_optimal_tiled_canvas((height, width), (tile, tile), min_tiles, max_tiles)
                assert find_grid(width, height, min_tiles, max_tiles, tile) == expected, (width, height, max_tiles)


def test_find_grid_tie_breaks():
    # 2:1 images: (2, 1) and (4, 2) fit equally; the larger grid only for a large enough image.
    assert find_grid(200, 100, 1, 12) == (2, 1)
    assert find_grid(1792, 896, 1, 12) == (4, 2)
    assert find_grid(448, 448, 1, 12) == (1, 1)
    assert find_grid(2000, 2000, 1, 12) == (3, 3)


def test_tile_layout_and_thumbnail():
    image = noise(900, 450)
    tiles = tile_image(image, TilingParams())
    assert len(tiles) == 3  # (2, 1) grid + thumbnail
    assert all(tile.size == (448, 448) for tile in tiles)
    resized = image.resize((896, 448), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(resized.crop((0, 0, 448, 448))))
    assert np.array_equal(np.asarray(tiles[1]), np.asarray(resized.crop((448, 0, 896, 448))))
    assert len(tile_image(image, TilingParams(use_thumbnail=False))) == 2
    assert len(tile_image(noise(500, 500), TilingParams())) == 1  # one tile: no thumbnail


def test_rows_are_cut_top_to_bottom():
    image = Image.new("RGB", (448, 896), (255, 0, 0))
    image.paste((0, 0, 255), (0, 448, 448, 896))
    top, bottom, _thumbnail = tile_image(image, TilingParams())
    assert np.asarray(top)[200, 200].tolist() == [255, 0, 0]
    assert np.asarray(bottom)[200, 200].tolist() == [0, 0, 255]


def test_pixel_values_normalisation():
    tile = Image.new("RGB", (448, 448), (0, 128, 255))
    values = to_pixel_values([tile])
    expected = [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        assert values[0, channel].unique().tolist() == pytest.approx([value], abs=1e-6)
    with pytest.raises(ValueError):
        to_pixel_values([Image.new("RGB", (10, 10))])


def test_bad_tiling_params_rejected():
    with pytest.raises(ImageError):
        TilingParams(min_tiles=0)
    with pytest.raises(ImageError):
        TilingParams(min_tiles=5, max_tiles=4)


# --- formats ---------------------------------------------------------------------------------

def test_jpeg_png_webp_round_trip():
    image = noise(64, 48)
    png = decode_image(encode(image, "PNG"), LIMITS)
    assert png.mode == "RGB" and np.array_equal(np.asarray(png), np.asarray(image))
    webp = decode_image(encode(image, "WEBP", lossless=True), LIMITS)
    assert np.array_equal(np.asarray(webp), np.asarray(image))
    smooth = Image.fromarray(skdata.chelsea())
    jpeg = decode_image(encode(smooth, "JPEG", quality=95), LIMITS)
    assert jpeg.size == smooth.size and np.abs(as_array(jpeg) - as_array(smooth)).mean() < 3


def test_grayscale_becomes_rgb():
    image = decode_image(encode(Image.fromarray(skdata.camera()), "JPEG"), LIMITS)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    payload = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(payload)).n_frames == 3
    decoded = decode_image(payload, LIMITS)
    assert decoded.mode == "RGB" and np.asarray(decoded)[5, 5].tolist() == [255, 0, 0]


def test_animated_webp_first_frame():
    frames = [Image.new("RGB", (32, 32), colour) for colour in [(0, 0, 255), (255, 0, 0)]]
    payload = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert Image.open(io.BytesIO(payload)).n_frames == 2
    assert np.asarray(decode_image(payload, LIMITS))[5, 5].tolist() == [0, 0, 255]


def test_16bit_png_is_scaled_not_clipped():
    """Deliberately unlike transformers and InternVL's convert('RGB'), which clip 16-bit levels at
    255 (nearly white): DvD keeps the picture by scaling 65535 to 255."""
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(8, axis=0)
    payload = encode(Image.fromarray(gradient), "PNG")
    assert Image.open(io.BytesIO(payload)).mode.startswith("I")
    row = np.asarray(decode_image(payload, LIMITS))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.abs(row - np.arange(256)).max() <= 1  # the full 8-bit range, in order
    assert len(np.unique(row)) > 250


# Transparency: transformers' convert_to_rgb is the reference, and its releases differ (5.19 drops the
# alpha channel; later ones composite onto white). Each test checks both the reference's own answer
# and which of the two it is.
def _reference_composites() -> bool:
    return convert_to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_png_colour_key_transparency():
    levels = np.full((4, 4), 40000, dtype=np.uint16)
    levels[0, 0] = 1234
    pixels = np.asarray(decode_image(encode(Image.fromarray(levels), "PNG", transparency=1234), LIMITS))
    assert pixels[0, 0].tolist() == ([255, 255, 255] if _reference_composites() else [5, 5, 5])  # 1234 / 257
    assert pixels[1, 1].tolist() == [156, 156, 156]  # 40000 / 257


def test_palette_png_with_transparency_follows_the_reference():
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    image.paste(0, (0, 0, 8, 16))
    payload = encode(image, "PNG", transparency=0)
    pixels = np.asarray(decode_image(payload, LIMITS))
    assert np.array_equal(pixels, np.asarray(convert_to_rgb(Image.open(io.BytesIO(payload)))))
    assert pixels[3, 3].tolist() == ([255, 255, 255] if _reference_composites() else [0, 0, 0])
    assert pixels[3, 12].tolist() == [200, 30, 40]


def test_rgba_follows_the_reference():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    pixels = as_array(decode_image(encode(image, "PNG"), LIMITS))
    assert np.abs(pixels[0, 0] - ([255, 127, 127] if _reference_composites() else [255, 0, 0])).max() <= 1


def test_cmyk_jpeg():
    image = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red
    payload = encode(image, "JPEG", quality=95)
    decoded = decode_image(payload, LIMITS)
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")))
    red, green, blue = np.asarray(decoded)[16, 16].tolist()
    assert red > 220 and green < 40 and blue < 40


@pytest.mark.parametrize("orientation, rotation", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_applied(orientation, rotation):
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(payload, LIMITS)
    assert decoded.size == (32, 64)
    upright = Image.open(io.BytesIO(payload)).convert("RGB").transpose(rotation)
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))


# --- errors ----------------------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of the given size (all black), tiny when compressed."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_rejects_empty():
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", LIMITS)


def test_rejects_random_bytes():
    payload = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not a recognised image"):
        decode_image(payload, LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_rejects_truncated(fmt):
    payload = encode(Image.fromarray(skdata.astronaut()), fmt)
    with pytest.raises(ImageError, match=f"corrupt.*{fmt}"):
        decode_image(payload[: len(payload) // 2], LIMITS)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_rejects_unsupported_format(fmt):
    with pytest.raises(ImageError, match=f"unsupported image format '{fmt}'"):
        decode_image(encode(noise(16, 16), fmt), LIMITS)


def test_rejects_too_small():
    with pytest.raises(ImageError, match="image too small: 1x1"):
        decode_image(encode(noise(1, 1), "PNG"), LIMITS)
    with pytest.raises(ImageError, match="image too small: 300x1"):
        decode_image(encode(noise(300, 1), "PNG"), LIMITS)
    assert decode_image(encode(noise(2, 2), "PNG"), LIMITS).size == (2, 2)


def test_rejects_decompression_bomb_from_header(monkeypatch):
    payload = png_header_only(20000, 20000)
    assert len(payload) < LIMITS.max_image_bytes

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="20000x20000"):
        decode_image(payload, LIMITS)
    assert time.perf_counter() - start < 0.5  # decoding 400M pixels would take seconds and ~400 MB


def test_pixel_limit_is_ours_not_pils(monkeypatch):
    with pytest.raises(ImageError, match="64x64"):
        decode_image(encode(noise(64, 64), "PNG"), ImageLimits(max_image_pixels=4000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's global guard neither blocks nor protects us
    assert decode_image(encode(noise(64, 64), "PNG"), LIMITS).size == (64, 64)


def test_rejects_over_max_bytes():
    payload = encode(noise(64, 64), "PNG")
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(payload, ImageLimits(max_image_bytes=len(payload) - 1))
    assert decode_image(payload, ImageLimits(max_image_bytes=len(payload))).size == (64, 64)
