"""Decode attention of one engine step, alone: the SDPA backend's grouped-query path against the
path it replaced (one query row per head; with a padding mask on CUDA that meant keys and values
repeated per query head, as transformers' `repeat_kv` does, elsewhere SDPA's own GQA), on
gathered contexts as the paged cache returns them. Shapes default to Qwen3-8B's layers.

    python -m benchmarks.decode_attention --device cuda:0 --dtype bfloat16 --batch 32 --context 1400
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from language_server.engine.sdpa_backend import _sdpa, decode_sdpa


def _per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return _sdpa(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), mask, False, scale).squeeze(2)


def _time(step: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Mean seconds of one call, after a warm-up."""
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=32, help="sequences decoding together")
    parser.add_argument("--context", type=int, default=1400, help="longest context; the others are shorter")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=36, help="layers per step (one timed call each)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator(device).manual_seed(0)
    lengths = torch.linspace(args.context // 2, args.context, args.batch, device=device).long()
    mask = (torch.arange(args.context, device=device) < lengths[:, None])[:, None, None, :]
    q = torch.randn(args.batch, args.heads, args.head_dim, generator=generator, device=device, dtype=dtype)
    kv_shape = (args.batch, args.context, args.kv_heads, args.head_dim)
    k, v = (torch.randn(kv_shape, generator=generator, device=device, dtype=dtype) for _ in range(2))
    scale = args.head_dim**-0.5

    grouped = decode_sdpa(q, k, v, mask, scale).float()
    difference = (grouped - _per_head(q, k, v, mask, scale).float()).abs().max().item()
    results = {}
    for name, step in (("grouped (ours)", lambda: decode_sdpa(q, k, v, mask, scale)),
                       ("previous", lambda: _per_head(q, k, v, mask, scale))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = _time(lambda: [step() for _ in range(args.layers)], device, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        results[name] = seconds
        print(f"{name:16s} {seconds * 1e3:8.2f} ms per step of {args.layers} layers   peak {peak:8.0f} MiB")
    print(f"previous / grouped: {results['previous'] / results['grouped (ours)']:.2f}x; "
          f"largest difference {difference:.2e} ({args.batch} sequences, contexts {args.context // 2}-{args.context}, "
          f"{args.heads}/{args.kv_heads} heads, {args.dtype} on {args.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
