"""Image bytes -> InternVL pixel tiles: decode safely, pick a tile grid, normalise.

Matches transformers' GotOcr2ImageProcessor with crop_to_patches=True (the InternVL recipe):
bicubic resize to a grid of 448x448 tiles, tiles row by row, plus a thumbnail when the grid
has more than one tile, then ImageNet mean/std normalisation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin
from transformers.image_transforms import convert_to_rgb

from pipeline.config import ImageLimits

from pipeline.model.image_header import ImageHeaderError, check_structure
from pipeline.model.tiling import exif_orientation, find_grid, shown_upright, upright_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Only these decoders ever see client bytes. Opening through the plugin classes (not
# Image.open) skips PIL's global MAX_IMAGE_PIXELS check; decode_image applies its own limit.
_OPENERS = {
    "JPEG": JpegImagePlugin.jpeg_factory,
    "PNG": PngImagePlugin.PngImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
    """The input cannot be used; the message says why, in words a client understands."""


@dataclass(frozen=True)
class TilingParams:
    """How one image is cut into tiles."""

    min_tiles: int = 1
    max_tiles: int = 12  # thumbnail excluded
    use_thumbnail: bool = True
    tile_size: int = 448

    def __post_init__(self) -> None:
        if self.min_tiles < 1 or self.max_tiles < self.min_tiles:
            raise ImageError(f"invalid tile range: min_tiles={self.min_tiles}, max_tiles={self.max_tiles}")
        if self.tile_size < 1:
            raise ImageError(f"invalid tile_size {self.tile_size}")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode JPEG/PNG/WEBP/GIF bytes to an upright RGB image, enforcing `limits`.

    The first frame of an animation is used; other modes become RGB as the installed transformers'
    `convert_to_rgb` (the reference) makes them.
    Raises ImageError when the bytes are empty, too large, corrupt, of another format,
    or describe an image with too many pixels (checked from the header) or too small a side.
    """
    image, fmt = _open(data, limits)
    orientation = exif_orientation(image)  # before load(): the header's EXIF, as the tile estimate reads it
    try:
        image.load()
        return _to_rgb(shown_upright(image, orientation))
    except Exception as exc:
        raise ImageError(f"corrupt or truncated {fmt} image: {exc}") from None


def image_size(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header only; checks `limits` as
    decode_image does, without decoding any pixel."""
    image, _ = _open(data, limits)
    return upright_size(image)


def _open(data: bytes, limits: ImageLimits) -> tuple[Image.Image, str]:
    """The opened (not decoded) image and its format, after every check the header allows."""
    if not data:
        raise ImageError("empty image data")
    if len(data) > limits.max_image_bytes:
        raise ImageError(f"image data is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    fmt = _sniff_format(data)
    if fmt is None:
        other = _identify_other_format(data)
        if other:
            raise ImageError(f"unsupported image format {other!r} (accepted: JPEG, PNG, WEBP, GIF)")
        raise ImageError("not a recognised image (accepted: JPEG, PNG, WEBP, GIF)")
    try:
        check_structure(data)
    except ImageHeaderError as exc:
        raise ImageError(str(exc)) from None
    try:
        image = _OPENERS[fmt](io.BytesIO(data))
    except Exception as exc:  # Pillow reports bad headers with many exception types
        raise ImageError(f"corrupt {fmt} image: {exc}") from None

    width, height = image.size  # from the header; no pixels decoded yet
    if width * height > limits.max_image_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels}"
        )
    if min(width, height) < limits.min_image_side:
        raise ImageError(f"image too small: {width}x{height} (each side must be at least {limits.min_image_side})")
    return image, fmt


def tile_image(image: Image.Image, params: TilingParams) -> list[Image.Image]:
    """Cut an RGB image into tile_size squares, row by row, plus a thumbnail when more than one."""
    size = params.tile_size
    cols, rows = find_grid(image.width, image.height, params.min_tiles, params.max_tiles, size)
    resized = image.resize((cols * size, rows * size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)
    ]
    if params.use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    return tiles


def to_pixel_values(tiles: list[Image.Image], tile_size: int = 448) -> torch.Tensor:
    """Stack RGB tiles into a normalised float32 tensor [T, 3, tile_size, tile_size]."""
    if not tiles:
        raise ValueError("no tiles")
    for tile in tiles:
        if tile.mode != "RGB" or tile.size != (tile_size, tile_size):
            width, height = tile.size
            raise ValueError(f"expected {tile_size}x{tile_size} RGB tiles, got {width}x{height} {tile.mode}")
    pixels = np.stack([np.asarray(tile) for tile in tiles])  # [T, H, W, 3] uint8
    out = np.empty((len(tiles), 3, tile_size, tile_size), dtype=np.float32)
    for channel in range(3):
        out[:, channel] = _NORMALISED[channel][pixels[..., channel]]
    return torch.from_numpy(out)


def _normalisation_table() -> np.ndarray:
    """[3, 256] float32: the normalised value of every 8-bit level per channel.

    Computed with the same float steps as transformers (x * (1/255) in float64, cast to float32,
    then (x - mean) / std in float32), so table lookups reproduce it bit for bit.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None]
    std = np.array(IMAGENET_STD, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


_NORMALISED = _normalisation_table()


def _sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _identify_other_format(data: bytes) -> str | None:
    """Name the format of bytes we do not accept, from magic bytes only (no parsing)."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        _, accept = Image.OPEN[fmt]
        try:
            verdict = accept(prefix) if accept is not None else False
        except Exception:  # a plugin's check may choke on short or odd prefixes
            continue
        if verdict and not isinstance(verdict, str):  # a str verdict is a warning, not a match
            return fmt
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it: releases differ on transparency (5.19, which
    vLLM's CPU build pins, drops the alpha channel, as InternVL's own `convert('RGB')` does; later
    releases composite onto white), and the vision server follows the one installed."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_8bit(image)
    return convert_to_rgb(image) if image.mode != "RGB" else image


def _sixteen_bit_to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale to 8 bits (65535 -> 255). A deliberate departure from the reference:
    transformers and InternVL's convert('RGB') clip at 255, turning nearly every level white."""
    raw = np.asarray(image).astype(np.int64)
    gray = Image.fromarray(np.rint(np.clip(raw, 0, 65535) / 257).astype(np.uint8))
    key = image.info.get("transparency")
    if isinstance(key, int):  # a tRNS colour key names one 16-bit level as transparent
        alpha = Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray
