"""Mixture-of-experts weights as transformers' modules hold them, from the per-expert tensors
checkpoints store.

Qwen2/Qwen3-MoE checkpoints on disk keep one tensor per expert and projection
(`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`). transformers 5 stacks them at load
time into `mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden] (gate rows, then up
rows) and `mlp.experts.down_proj` [experts, hidden, intermediate]. The partial loaders read
tensors by name, so they apply the same conversion here, to the tensors the module expects.
"""

from __future__ import annotations

import re

import torch

_PER_EXPERT = re.compile(r"(?P<prefix>.*\.experts\.)(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """`tensors` with every per-expert group replaced by the fused tensor that `expected` names.
    Groups whose fused name the module does not expect are left as they are."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        match = _PER_EXPERT.fullmatch(name)
        if match and match["prefix"] + ("down_proj" if match["proj"] == "down_proj" else "gate_up_proj") in expected:
            groups.setdefault(match["prefix"], {}).setdefault(match["proj"], {})[int(match["expert"])] = tensor
    if not groups:
        return tensors
    fused = {name: tensor for name, tensor in tensors.items() if not _grouped(name, groups)}
    for prefix, projections in groups.items():
        stacked = {proj: _stack(prefix, proj, experts) for proj, experts in projections.items()}
        if "gate_proj" in stacked or "up_proj" in stacked:
            if stacked.keys() < {"gate_proj", "up_proj"}:
                raise ValueError(f"{prefix}*: gate_proj and up_proj must both be stored")
            fused[prefix + "gate_up_proj"] = torch.cat([stacked["gate_proj"], stacked["up_proj"]], dim=1)
        if "down_proj" in stacked:
            fused[prefix + "down_proj"] = stacked["down_proj"]
    return fused


def _grouped(name: str, groups: dict[str, dict]) -> bool:
    match = _PER_EXPERT.fullmatch(name)
    return bool(match) and match["prefix"] in groups


def _stack(prefix: str, proj: str, experts: dict[int, torch.Tensor]) -> torch.Tensor:
    if sorted(experts) != list(range(len(experts))):
        missing = sorted(set(range(max(experts) + 1)) - set(experts))
        raise ValueError(f"{prefix}*.{proj}: experts {missing[:5]} are missing")
    return torch.stack([experts[index] for index in range(len(experts))])
