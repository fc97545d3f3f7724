"""Benchmark workloads: real photos at three sizes (about 1, 5 and 10 tiles), fixed output length."""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from functools import lru_cache

from pipeline.client import image, message
from proto.dvd.v1 import generate_pb2 as pb

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZES = {"448px": 448, "896px": 896, "1344px": 1344}  # 1, 2x2+thumbnail, 3x3+thumbnail tiles
PROMPT = "Describe this image in detail."


@dataclass(frozen=True)
class Workload:
    """One image size: encoded photos and how to turn an index into a request."""

    name: str
    side: int
    images: tuple[bytes, ...]
    output_tokens: int

    def image(self, index: int) -> bytes:
        """Photo `index % len(images)`, made unique: no two calls in this process return the same
        pixels, so no cache of either server (features, processed inputs, prefixes) makes a
        request cheaper than the first one with that photo."""
        return stamped(self.images[index % len(self.images)], next(_SERIALS))

    def request(self, index: int) -> pb.GenerateRequest:
        data = self.image(index)
        return pb.GenerateRequest(
            request_id=f"{self.name}-{index}",
            messages=[message("user", image(data), PROMPT)],
            sampling=pb.SamplingParameters(max_new_tokens=self.output_tokens, temperature=0.0, ignore_eos=True),
        )


_SERIALS = itertools.count(1)
STAMP = 16  # pixels: the side of the corner block that carries a request's serial number


@lru_cache(maxsize=32)
def _pixels(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def stamped(data: bytes, serial: int) -> bytes:
    """The JPEG `data` with its top-left STAMP x STAMP block painted in a colour that encodes `serial`."""
    from PIL import Image

    picture: Image.Image = _pixels(data).copy()
    colour = (serial & 0xFF, (serial >> 8) & 0xFF, (serial >> 16) & 0xFF)
    picture.paste(colour, (0, 0, STAMP, STAMP))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photo(name: str, side: int) -> bytes:
    """A skimage.data photo resized to side x side, as JPEG."""
    from PIL import Image
    from skimage import data

    picture = Image.fromarray(getattr(data, name)()).convert("RGB").resize((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def workloads(output_tokens: int, sizes: list[str] | None = None) -> list[Workload]:
    chosen = sizes or list(SIZES)
    return [
        Workload(name, SIZES[name], tuple(photo(p, SIZES[name]) for p in PHOTOS), output_tokens) for name in chosen
    ]
