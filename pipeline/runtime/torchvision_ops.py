"""Makes PyPI's torchvision importable beside a CPU-only torch.

vLLM imports torchvision's pure-Python transforms, and so does transformers once torchvision is
installed. PyPI carries only CUDA builds of torchvision for Linux x86-64; beside torch's CPU build
their compiled ops (`_C.so`) cannot load. torchvision copes with that, except that it registers
fake kernels for `torchvision::nms` and `torchvision::qnms` unconditionally, which fails at import
("operator torchvision::nms does not exist").

`install()` (run at interpreter start by the `dvd_torchvision_ops.pth` file that `make install`
writes with `write_pth`) adds an import hook: the first `import torchvision` defines those two operator schemas,
without kernels, when the compiled ops cannot load. The transforms then work; calling nms raises.
Where the compiled ops load (a matching build), nothing is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library holding the schemas; kept alive for the process


def define_missing_ops() -> bool:
    """Define the schemas torchvision's import needs when its compiled ops cannot load.
    Returns True when it defined them."""
    global _library
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None or _library is not None:
        return False
    compiled = [p for d in spec.submodule_search_locations for p in Path(d).glob("_C*.so")]
    try:
        if compiled:
            torch.ops.load_library(str(compiled[0]))
            return False
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs `define_missing_ops` once, just before torchvision is first imported."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - importlib's signature
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None  # the normal finders import it


def install() -> None:
    """Add the import hook (cheap: imports nothing until torchvision is imported)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def write_pth() -> Path:
    """Install the hook in this environment: a .pth file in site-packages that calls `install()`."""
    import sysconfig

    path = Path(sysconfig.get_paths()["purelib"]) / "dvd_torchvision_ops.pth"
    path.write_text("import pipeline.runtime.torchvision_ops; pipeline.runtime.torchvision_ops.install()\n")
    return path
