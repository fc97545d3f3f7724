"""InternVL checkpoints on disk: format detection, configs, key maps, partial loading.

Two formats exist (see shared/specs/checkpoints.md): HF-native (`InternVLForConditionalGeneration`)
and the original one (`InternVLChatModel`). Each server reads only its half: `read_part` opens
the safetensors files and reads only the tensors of the requested part, renamed to the names
of transformers' own modules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from safetensors import safe_open
from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig, PreTrainedConfig

Format = Literal["hf", "original"]
Part = Literal["vision", "projector", "llm", "vir"]
PARTS: tuple[Part, ...] = ("vision", "projector", "llm", "vir")


class CheckpointError(ValueError):
    """The directory is not an InternVL checkpoint this project can read."""


# Original-format ViT names and transformers InternVLVisionModel names (after "vision_model." and
# "model.vision_tower."), one table read both ways: "{n}" is a layer index; a name ending in "."
# is a prefix, any other a whole name.
_VIT_NAMES: list[tuple[str, str]] = [
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("encoder.layers.{n}.attn.proj.", "encoder.layer.{n}.attention.projection_layer."),
    ("encoder.layers.{n}.attn.q_norm.", "encoder.layer.{n}.attention.q_norm."),
    ("encoder.layers.{n}.attn.k_norm.", "encoder.layer.{n}.attention.k_norm."),
    ("encoder.layers.{n}.mlp.", "encoder.layer.{n}.mlp."),
    ("encoder.layers.{n}.norm1.", "encoder.layer.{n}.layernorm_before."),
    ("encoder.layers.{n}.norm2.", "encoder.layer.{n}.layernorm_after."),
    ("encoder.layers.{n}.ls1", "encoder.layer.{n}.lambda_1"),
    ("encoder.layers.{n}.ls2", "encoder.layer.{n}.lambda_2"),
]


def _vit_rules(source: int) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, replacement) pairs that rename from column `source` of _VIT_NAMES to the other."""
    rules = []
    for names in _VIT_NAMES:
        old, new = names[source], names[1 - source]
        pattern = r"(\d+)".join(re.escape(part) for part in old.split("{n}"))
        rules.append((re.compile(f"^{pattern}" + ("" if old.endswith(".") else "$")), new.replace("{n}", r"\1")))
    return rules


_ORIGINAL_TO_HF_VIT = _vit_rules(0)
_HF_TO_ORIGINAL_VIT = _vit_rules(1)

_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_PROJECTOR_ORIGINAL = {"mlp1.0.": "layer_norm.", "mlp1.1.": "linear_1.", "mlp1.3.": "linear_2."}


@dataclass
class LoadedPart:
    """Tensors of one part, keyed by module-relative names, and the checkpoint names read."""

    tensors: dict[str, torch.Tensor]
    source_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Checkpoint:
    """A local InternVL checkpoint directory."""

    path: Path
    format: Format
    raw_config: dict

    # ----- configs -------------------------------------------------------------------
    @cached_property
    def vision_config(self) -> InternVLVisionConfig:
        if self.format == "hf":
            return self.internvl_config.vision_config
        vc = dict(self.raw_config["vision_config"])
        image_size = self.raw_config.get("force_image_size") or vc.get("image_size", 448)
        return InternVLVisionConfig(
            hidden_size=vc["hidden_size"],
            intermediate_size=vc["intermediate_size"],
            num_attention_heads=vc["num_attention_heads"],
            num_hidden_layers=vc["num_hidden_layers"],
            attention_bias=vc.get("qkv_bias", True),
            use_qk_norm=vc.get("qk_normalization", False),
            norm_type=vc.get("norm_type", "layer_norm"),
            layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
            hidden_act=vc.get("hidden_act", "gelu"),
            image_size=image_size,
            patch_size=vc.get("patch_size", 14),
            num_channels=vc.get("num_channels", 3),
            use_mean_pooling=True,
        )

    @cached_property
    def text_config(self) -> PreTrainedConfig:
        if self.format == "hf":
            return self.internvl_config.text_config
        llm = dict(self.raw_config["llm_config"])
        model_type = llm.pop("model_type", None)
        if model_type is None:
            raise CheckpointError(f"{self.path}: llm_config has no model_type")
        return AutoConfig.for_model(model_type, **llm)

    @cached_property
    def internvl_config(self) -> InternVLConfig:
        """The HF-native composite config (built from the original one when needed)."""
        if self.format == "hf":
            return InternVLConfig.from_dict(self.raw_config)
        return InternVLConfig(
            vision_config=self.vision_config.to_dict(),
            text_config=self.text_config.to_dict(),
            downsample_ratio=self.downsample_ratio,
            image_token_id=self.raw_config.get("img_context_token_id") or 151667,
            image_seq_length=self.tokens_per_tile,
            projector_hidden_act="gelu",
            vision_feature_layer=self.raw_config.get("select_layer", -1),
            vision_feature_select_strategy="default",
            tie_word_embeddings=self.text_config.tie_word_embeddings,
        )

    @property
    def downsample_ratio(self) -> float:
        return float(self.raw_config.get("downsample_ratio", 0.5))

    @property
    def image_size(self) -> int:
        size = self.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def tokens_per_tile(self) -> int:
        patches = self.image_size // int(_first(self.vision_config.patch_size))
        return int(patches * patches * self.downsample_ratio**2)

    @property
    def llm_architecture(self) -> str:
        archs = getattr(self.text_config, "architectures", None) or []
        return archs[0] if archs else type(self.text_config).__name__.replace("Config", "ForCausalLM")

    @property
    def is_flash(self) -> bool:
        """An InternVL3.5-Flash checkpoint with the ViR router."""
        return bool(self.raw_config.get("flash_mode", False)) or any(n.startswith("gating.") for n in self.tensor_names)

    @property
    def name(self) -> str:
        return self.path.name

    # ----- tensors ------------------------------------------------------------------
    @cached_property
    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no .safetensors files")
        mapping = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                mapping.update({name: file for name in handle.keys()})
        return mapping

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._weight_map)

    def part_names(self, part: Part) -> list[str]:
        """Checkpoint tensor names that belong to one part."""
        return [name for name in self.tensor_names if self._part_of(name) == part]

    def read_part(self, part: Part, dtype: torch.dtype | None = None) -> LoadedPart:
        """Read only `part`'s tensors, renamed for transformers' modules (optionally cast)."""
        names = self.part_names(part)
        rename = _RENAMERS[(self.format, part)]
        loaded = LoadedPart(tensors={})
        for name, tensor in self._read(names):
            for target, value in rename(name, tensor):
                loaded.tensors[target] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
            loaded.source_names.append(name)
        return loaded

    def _read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._weight_map[name], []).append(name)
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in file_names:
                    yield name, handle.get_tensor(name)

    def _part_of(self, name: str) -> Part | None:
        if self.format == "hf":
            if name.startswith(("model.vision_tower.", "vision_tower.")):
                return "vision"
            if name.startswith(("model.multi_modal_projector.", "multi_modal_projector.")):
                return "projector"
            if name.startswith(("model.language_model.", "language_model.", "lm_head.")):
                return "llm"
            return None
        if name.startswith("vision_model."):
            return "vision"
        if name.startswith("mlp1."):
            return "projector"
        if name.startswith("language_model."):
            return "llm"
        if name.startswith(("mlp2.", "pooling_before_gating.", "gating.")):
            return "vir"
        return None


def open_checkpoint(path: str | Path, format: Literal["auto", "hf", "original"] = "auto") -> Checkpoint:
    """Open a local checkpoint directory and detect (or check) its format."""
    path = Path(path).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    raw = json.loads(config_file.read_text())
    detected = detect_format(raw)
    if detected is None:
        raise CheckpointError(
            f"{path}: config.json is neither HF-native InternVL (model_type 'internvl') "
            f"nor original InternVL (architectures ['InternVLChatModel'])"
        )
    if format != "auto" and format != detected:
        raise CheckpointError(f"{path}: configured format {format!r} but the checkpoint is {detected!r}")
    return Checkpoint(path=path, format=detected, raw_config=raw)


def detect_format(raw_config: dict) -> Format | None:
    if raw_config.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in raw_config.get(
        "architectures", []
    ):
        return "hf"
    if "InternVLChatModel" in raw_config.get("architectures", []) or "llm_config" in raw_config:
        return "original"
    return None


# ----- renaming ---------------------------------------------------------------------------
Renamer = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


def _strip(*prefixes: str) -> Renamer:
    def rename(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        for prefix in prefixes:
            if name.startswith(prefix):
                return [(name[len(prefix) :], tensor)]
        raise CheckpointError(f"unexpected tensor name {name!r}")

    return rename


def _hf_llm(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    for prefix, target in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(prefix):
            return [(target + name[len(prefix) :], tensor)]
    raise CheckpointError(f"unexpected LLM tensor name {name!r}")


def _original_llm(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    for prefix, target in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return [(target + name[len(prefix) :], tensor)]
    raise CheckpointError(f"unexpected LLM tensor name {name!r}")


def _original_vision(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    inner = name[len("vision_model.") :]
    match = _QKV.match(inner)
    if match:
        layer, kind = match.groups()
        q, k, v = tensor.chunk(3, dim=0)
        return [(f"encoder.layer.{layer}.attention.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    for pattern, replacement in _ORIGINAL_TO_HF_VIT:
        renamed, count = pattern.subn(replacement, inner)
        if count:
            return [(renamed, tensor)]
    raise CheckpointError(f"unexpected vision tensor name {name!r}")


def _original_projector(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    for prefix, target in _PROJECTOR_ORIGINAL.items():
        if name.startswith(prefix):
            return [(target + name[len(prefix) :], tensor)]
    raise CheckpointError(f"unexpected projector tensor name {name!r}")


def _identity(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor)]


_RENAMERS: dict[tuple[Format, Part], Renamer] = {
    ("hf", "vision"): _strip("model.vision_tower.", "vision_tower."),
    ("hf", "projector"): _strip("model.multi_modal_projector.", "multi_modal_projector."),
    ("hf", "llm"): _hf_llm,
    ("hf", "vir"): _identity,
    ("original", "vision"): _original_vision,
    ("original", "projector"): _original_projector,
    ("original", "llm"): _original_llm,
    ("original", "vir"): _identity,
}


def hf_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF-native InternVL state dict (transformers 5.x names) to the original format.

    The inverse of the loaders' renaming: q/k/v projections are fused into `attn.qkv`.
    """
    out: dict[str, torch.Tensor] = {}
    qkv = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        if name.startswith("model.vision_tower."):
            inner = name[len("model.vision_tower.") :]
            match = qkv.match(inner)
            if match:
                layer, which, kind = match.groups()
                fused.setdefault((layer, kind), {})[which] = tensor
                continue
            for pattern, replacement in _HF_TO_ORIGINAL_VIT:
                renamed, count = pattern.subn(replacement, inner)
                if count:
                    out["vision_model." + renamed] = tensor
                    break
            else:
                raise CheckpointError(f"no original-format name for {name!r}")
        elif name.startswith("model.multi_modal_projector."):
            inner = name[len("model.multi_modal_projector.") :]
            for original, hf in _PROJECTOR_ORIGINAL.items():
                if inner.startswith(hf):
                    out[original + inner[len(hf) :]] = tensor
                    break
            else:
                raise CheckpointError(f"no original-format name for {name!r}")
        elif name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model.") :]] = tensor
        elif name.startswith("lm_head."):
            out["language_model." + name] = tensor
        else:
            out[name] = tensor
    for (layer, kind), parts in fused.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in "qkv"], dim=0)
    return out


def _first(value: int | tuple | list) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def materialize(
    factory: Callable[[], torch.nn.Module],
    tensors: dict[str, torch.Tensor],
    device: torch.device | str,
    dtype: torch.dtype,
    allow_missing: tuple[str, ...] = (),
) -> torch.nn.Module:
    """Build a module without allocating weights, then adopt `tensors` as its parameters.

    Buffers that checkpoints do not store (rotary inverse frequencies) are recomputed on
    `device`. Any other parameter missing from `tensors`, or any extra tensor, is an error.
    """
    with torch.device("meta"):
        module = factory()
    expected = set(module.state_dict())
    missing = sorted(expected - set(tensors) - set(allow_missing))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{type(module).__name__}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    cast = {
        name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for name, t in tensors.items()
    }
    module.load_state_dict(cast, strict=False, assign=True)
    _rebuild_meta_buffers(module, device)
    return module.eval().requires_grad_(False)


def _rebuild_meta_buffers(module: torch.nn.Module, device: torch.device | str) -> None:
    for name, child in list(module.named_modules()):
        if not any(b.is_meta for b in child.buffers(recurse=False)):
            continue
        config = getattr(child, "config", None)
        if config is None:
            raise CheckpointError(f"cannot rebuild buffers of {name or type(child).__name__}")
        with torch.device(device):
            fresh = type(child)(config=config)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, fresh)


def open_model(path: str, format: Literal["auto", "hf", "original"] = "auto") -> Checkpoint:
    """Open the configured model: a local directory, or "tiny" (generated on first use)."""
    if path == "tiny":
        from pipeline.tiny_model import tiny_model_dir

        return open_checkpoint(tiny_model_dir("hf" if format == "auto" else format), format)
    return open_checkpoint(path, format)
