"""The embedded default model: a tiny random InternVL3.5 written in both checkpoint formats.

Shaped like InternVL3.5 (InternViT -> pixel shuffle 0.5 -> MLP -> Qwen3) with tiny widths
(tiny_weights.py), the real Qwen vocabulary and the InternVL special tokens at their real ids
(tiny_processors.py). Generated deterministically on first use into a cache directory; its
text is meaningless, every other part of the system is real.

A third directory, `flash`, holds the same model as an InternVL3.5-Flash checkpoint in the
original format, with the ViR router added (pipeline/model/tiny_flash.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.model.tiny_processors import build_image_processor, build_tokenizer
from pipeline.model.tiny_weights import build_model

# Makes the tokenizer saved with a model (default: the Qwen one of tiny_processors.build_tokenizer).
TokenizerFactory = Callable[[], Any]
# Turns the LLM's transformers config (a dict) into the original format's `llm_config`.
OriginalLlmConfig = Callable[[dict], dict]

TINY_VERSION = 5  # 4: unlabelled images in the chat template; 5: head_dim 32 (vLLM's CPU attention has no 16)
FORMATS = ("hf", "original", "flash")


def cache_root() -> Path:
    return Path(os.environ.get("DVD_CACHE_DIR", Path.home() / ".cache" / "dvd")).expanduser()


def tiny_model_dir(format: str = "hf") -> Path:
    """Directory of the tiny model in one format ("hf", "original" or "flash"), generated if missing."""
    if format not in FORMATS:
        raise ValueError(f"tiny model format must be one of {FORMATS}, got {format!r}")
    return random_model_dir(f"tiny-internvl3_5-v{TINY_VERSION}") / format


def random_model_dir(
    name: str,
    vision_config: dict | None = None,
    text_config: dict | None = None,
    formats: tuple[str, ...] = FORMATS,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    tokenizer: TokenizerFactory = build_tokenizer,
    original_llm: OriginalLlmConfig | None = None,
) -> Path:
    """A random InternVL checkpoint generated once into the cache (file-locked, written atomically).
    `device` draws the weights there: a GPU generates an 8B model in seconds, but its draws differ
    from the CPU's, so the cached weights depend on where they were first generated."""
    root = cache_root() / name
    done = root / ".complete"
    if not done.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f".{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                staging = root.with_name(root.name + ".tmp")
                shutil.rmtree(staging, ignore_errors=True)
                generate(staging, vision_config=vision_config, text_config=text_config, formats=formats, dtype=dtype,
                         device=device, tokenizer=tokenizer, original_llm=original_llm)
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
                (root / ".complete").touch()
    return root


def generate(
    root: Path,
    seed: int = 0,
    vision_config: dict | None = None,
    text_config: dict | None = None,
    formats: tuple[str, ...] = FORMATS,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    tokenizer: TokenizerFactory = build_tokenizer,
    original_llm: OriginalLlmConfig | None = None,
) -> None:
    """Write a random model in HF-native (root/hf), original (root/original) and Flash (root/flash) formats.

    The original-format tensors are renamed from the HF-native files as `save_pretrained` wrote
    them, so both hold what checkpoints on disk hold (experts stored one by one, tied embeddings once).
    """
    from safetensors.torch import load_file, save_file

    from pipeline.model.checkpoint_names import hf_to_original
    from pipeline.model.tiny_flash import write_flash

    tokenizer = tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    model = build_model(seed, vision_config, text_config, dtype, device, image_token_id).to("cpu")
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the caller (a benchmark) goes on to start servers on this GPU
    root.mkdir(parents=True)
    hf_dir = root / "hf"
    im_end, end_of_text = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    model.generation_config.eos_token_id = [im_end] + ([end_of_text] if end_of_text is not None else [])
    model.generation_config.pad_token_id = end_of_text
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    build_image_processor().save_pretrained(hf_dir)
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    original_tensors = hf_to_original(tensors)
    del tensors
    original_config = _original_config(model.config, original_llm)
    if "original" in formats:
        original_dir = root / "original"
        original_dir.mkdir()
        save_file(original_tensors, original_dir / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(original_dir)
        (original_dir / "config.json").write_text(json.dumps(original_config, indent=2))
    if "flash" in formats:
        write_flash(root / "flash", original_tensors, original_config, tokenizer, seed)
    if "hf" not in formats:
        shutil.rmtree(hf_dir)


def _original_config(config, original_llm: OriginalLlmConfig | None = None) -> dict:
    """config.json of the original (InternVLChatModel) format for the same model."""
    vc = config.vision_config
    llm = config.text_config.to_dict()
    if original_llm is not None:
        llm = original_llm(llm)
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {},
        "downsample_ratio": config.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "use_thumbnail": True,
        "img_context_token_id": config.image_token_id,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vc.hidden_size,
            "intermediate_size": vc.intermediate_size,
            "num_attention_heads": vc.num_attention_heads,
            "num_hidden_layers": vc.num_hidden_layers,
            "qkv_bias": vc.attention_bias,
            "qk_normalization": vc.use_qk_norm,
            "norm_type": vc.norm_type,
            "layer_norm_eps": vc.layer_norm_eps,
            "hidden_act": vc.hidden_act,
            "image_size": 448,
            "patch_size": 14,
            "num_channels": 3,
            "drop_path_rate": 0.0,
            "use_flash_attn": False,
        },
        "llm_config": llm,
    }
