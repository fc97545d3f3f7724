"""Imported at start-up by every Python process with this directory on its PYTHONPATH: torch then
reports a CPU without AVX-512 (nor its BF16 and VNNI extensions, nor AMX), so vLLM loads and runs
the kernels it builds for AVX2 hosts (tests/e2e/test_vllm_engine.py)."""

import torch.cpu

for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
              "_is_amx_tile_supported", "_is_amx_fp16_supported"):
    if hasattr(torch.cpu, _name):
        setattr(torch.cpu, _name, lambda: False)
