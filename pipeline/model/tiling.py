"""InternVL's dynamic tiling rule, shared by the vision server (to cut tiles) and the language
server (to estimate tiles from an image header without decoding it), and the upright size of an
opened image that both feed it."""

from __future__ import annotations

import logging

from PIL import Image

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_UPRIGHT_BY = {  # EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image, read from the header only: no pixel is
    decoded, whatever the format. 1 (as stored) when there is none, and when the EXIF block or its
    orientation tag is corrupt: such an image is used unrotated, with a warning.

    PNG's getexif() decodes the whole image when the header has no eXIf chunk, so for PNG only
    the eXIf chunk read with the header counts (Pillow and common writers put it before the pixels).
    """
    try:
        if image.format == "PNG":
            exif = Image.Exif()
            if raw := image.info.get("exif"):
                exif.load(raw)
        else:
            exif = image.getexif()
        orientation = exif.get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - Pillow reports bad EXIF blocks with many exception types
        log.warning("ignored a corrupt EXIF block of a %s image: %s", image.format, f"{type(exc).__name__}: {exc}"[:200])
        return 1
    if type(orientation) is not int or orientation not in range(1, 9):
        log.warning("ignored an invalid EXIF orientation of a %s image: %s", image.format, repr(orientation)[:80])
        return 1
    return orientation


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied, read from the
    header only (exif_orientation)."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _TRANSPOSED else (width, height)


def shown_upright(image: Image.Image, orientation: int) -> Image.Image:
    """A decoded image turned as its EXIF `orientation` (from exif_orientation) says; the EXIF block
    itself is left alone (rewriting it fails on many corrupt blocks)."""
    method = _UPRIGHT_BY.get(orientation)
    return image if method is None else image.transpose(method)


def find_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int = 448) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect ratio is closest to width/height.

    Grids are tried by increasing tile count; on an exact tie the larger grid wins when the
    image area exceeds half the grid's pixel area.
    """
    counts = range(1, max_tiles + 1)
    grids = [(c, r) for c in counts for r in counts if min_tiles <= c * r <= max_tiles]
    if not grids:
        raise ValueError(f"no tile grid has between {min_tiles} and {max_tiles} tiles")
    grids.sort(key=lambda grid: grid[0] * grid[1])  # stable: keeps columns-then-rows order within a count
    aspect, area = width / height, width * height
    best, best_diff = grids[0], float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff or (diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows):
            best, best_diff = (cols, rows), diff
    return best


def tile_count(
    width: int, height: int, min_tiles: int, max_tiles: int, use_thumbnail: bool, tile_size: int = 448
) -> int:
    """Tiles an image of this size becomes: its grid, plus the thumbnail when the grid has several."""
    cols, rows = find_grid(width, height, min_tiles, max_tiles, tile_size)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def most_tiles(max_tiles: int, use_thumbnail: bool) -> int:
    """The largest tile count an image (or frame) may get."""
    return max_tiles + 1 if use_thumbnail and max_tiles > 1 else max_tiles
