"""InternVL checkpoints on disk: format detection, configs, partial loading, module building.

Two formats exist (see docs/checkpoints.md): HF-native (`InternVLForConditionalGeneration`)
and the original one (`InternVLChatModel`). Each server reads only its half: `read_part` opens
the safetensors files and reads only the tensors of the requested part, renamed to the names
of transformers' own modules (the name maps live in `checkpoint_names`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from safetensors import safe_open
from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig, PreTrainedConfig

from pipeline.model.checkpoint_names import CheckpointError, Format, Part, part_of, renamer
from pipeline.model.expert_fusion import fuse_experts


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
        try:
            return llm_text_config(self.raw_config["llm_config"])
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None

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
        return [name for name in self.tensor_names if part_of(self.format, name) == part]

    def read_part(self, part: Part, dtype: torch.dtype | None = None) -> LoadedPart:
        """Read only `part`'s tensors, renamed for transformers' modules (optionally cast)."""
        names = self.part_names(part)
        rename = renamer(self.format, part, self.text_config if part == "llm" else None)
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


def llm_text_config(llm_config: dict) -> PreTrainedConfig:
    """The LLM's transformers config from an original checkpoint's `llm_config` section."""
    llm = dict(llm_config)
    model_type = llm.pop("model_type", None)
    if model_type is None:
        raise ValueError("llm_config has no model_type")
    if model_type in ("internlm3", "internlm2"):
        model_type, llm = "llama", _internlm_as_llama(model_type, llm)
    return AutoConfig.for_model(model_type, **llm)


def _internlm_as_llama(model_type: str, llm: dict) -> dict:
    """InternLM2/3 settings as a llama config, as transformers' InternVL conversion treats them
    (transformers has no InternLM class of its own)."""
    qkv_bias = llm.pop("qkv_bias", llm.get("bias", False))
    bias = llm.pop("bias", False)
    if model_type == "internlm3" and qkv_bias != bias:
        raise ValueError(f"internlm3 llm_config: qkv_bias {qkv_bias} and bias {bias} differ, which a llama-type "
                         "model cannot express")
    scaling = dict(llm.pop("rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    rope = {**scaling, "rope_type": rope_type, "rope_theta": llm.pop("rope_theta", 10000.0)}
    for key in ("auto_map", "attn_implementation", "architectures"):
        llm.pop(key, None)
    return {**llm, "architectures": ["LlamaForCausalLM"], "attention_bias": bias, "mlp_bias": bias,
            "rope_parameters": rope}


def detect_format(raw_config: dict) -> Format | None:
    if raw_config.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in raw_config.get(
        "architectures", []
    ):
        return "hf"
    if "InternVLChatModel" in raw_config.get("architectures", []) or "llm_config" in raw_config:
        return "original"
    return None


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
    try:
        tensors = fuse_experts(tensors, expected)
    except ValueError as exc:
        raise CheckpointError(f"{type(module).__name__}: {exc}") from None
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
        from pipeline.model.tiny_model import tiny_model_dir

        return open_checkpoint(tiny_model_dir("hf" if format == "auto" else format), format)
    return open_checkpoint(path, format)
