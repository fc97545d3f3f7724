"""A faster float32 CPU kernel for the few-row linear layers of batched decode steps.

`F.linear(x, W)` computes `x @ W.T`. With a handful of rows, MKL can run that product far below
both the core's arithmetic peak and its memory bandwidth. Asking for the transposed product,
`(W @ x.T).T`, reads the same weight in a layout MKL handles well, so a few-row product costs
about what one row does. Large products cost about the same either way (see MAX_ROWS).

`install` gives every float32 CPU `nn.Linear` of a model the transposed path; it is taken only
inside `enabled()`, which the engine holds around its forward, so other users of the same model
(transformers' `generate`, the reference in tests) still run the stock kernel. The flag is
per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

MAX_ROWS = 256  # beyond this the two kernels cost the same and the transpose copy is not worth it

_state = threading.local()


def install(model: nn.Module) -> int:
    """Route the model's float32 CPU linear layers through `linear`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.forward = partial(linear, module)
            count += 1
    return count


@contextmanager
def enabled() -> Iterator[None]:
    """Use the transposed kernel in installed layers on this thread while inside the block."""
    previous = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = previous


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if not getattr(_state, "on", False) or rows > MAX_ROWS:
        return F.linear(x, module.weight, module.bias)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.mm(module.weight, flat.t()).t().contiguous()
    if module.bias is not None:
        out += module.bias
    return out.view(*x.shape[:-1], module.out_features)
