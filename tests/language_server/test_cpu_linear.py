"""The transposed CPU linear kernel computes what nn.Linear computes, only inside `enabled()` and
only on the thread that holds it."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from language_server.engine import cpu_linear


@pytest.mark.parametrize("rows", [1, 3, 8, cpu_linear.MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_stock_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(1, rows, 48)
    expected = layer(x)
    assert cpu_linear.install(nn.Sequential(layer)) == 1
    with cpu_linear.enabled():
        got = layer(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kernel_only_inside_enabled_and_on_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = nn.Linear(16, 16)
    cpu_linear.install(layer)
    transposed_calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: transposed_calls.append(1) or real_mm(a, b))
    x = torch.randn(4, 16)
    layer(x)
    assert transposed_calls == []
    with cpu_linear.enabled():
        other = threading.Thread(target=layer, args=(x,))
        other.start()
        other.join(timeout=10)
        assert not other.is_alive() and transposed_calls == []
        layer(x)
    assert transposed_calls == [1]
    layer(x)
    assert transposed_calls == [1]


def test_install_skips_non_float32_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Embedding(3, 4))
    assert cpu_linear.install(model) == 1
