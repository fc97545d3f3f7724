"""Random InternVL checkpoints for benchmarks (generated once into the cache, never committed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.model.tiny_model import random_model_dir, tiny_model_dir
from pipeline.model.tiny_weights import TEXT_CONFIG, VISION_CONFIG

# "small": sized so that, on a CPU core, encoding a ~5-tile image costs a little less than what
# the LLM spends on that request's prefill and its share of decoding. The paper's 1.87x for (a)
# at 896 px puts its cheaper stage at ~0.87 of the dearer one, and the dearer is the LLM (for
# InternVL3.5-8B, InternViT-300M's FLOPs over 5 tiles are about a fifth of Qwen3-8B's prefill of
# their 1,280 tokens). In `make bench` at 896 px: vision-only 1.72, LLM-only 1.42 req/s, vision at
# 0.83 of the LLM (bench-20261122-205710). Resize it when either half gets faster: the engine's
# CPU linear kernel (60aabe6) took LLM-only from 1.17 to ~1.4 req/s, which had left the 5-layer
# ViT of 4c6ca77 (vision-only ~1.2) the slower stage.
SMALL_VISION = {**VISION_CONFIG, "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
                "num_attention_heads": 4}
SMALL_TEXT = {**TEXT_CONFIG, "hidden_size": 384, "intermediate_size": 1152, "num_hidden_layers": 4,
              "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64}
SMALL_VERSION = 6  # 5: unlabelled images in the chat template (pipeline/model/tiny_processors.py); 6: ViT 4 layers

# "internvl3_5-8b": the shapes of InternVL3.5-8B (InternViT-300M + Qwen3-8B), random weights in
# bfloat16, for GPU runs. About 17 GB on disk; generating it takes about as much RAM.
VIT_300M = {**VISION_CONFIG, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16}
QWEN3_8B = {**TEXT_CONFIG, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960}
EIGHT_B_VERSION = 2  # 2: unlabelled images in the chat template

# name -> (cache directory, vision config, text config, weight dtype)
RANDOM_MODELS = {
    "small": (f"bench-small-v{SMALL_VERSION}", SMALL_VISION, SMALL_TEXT, torch.float32),
    "internvl3_5-8b": (f"bench-internvl3_5-8b-v{EIGHT_B_VERSION}", VIT_300M, QWEN3_8B, torch.bfloat16),
}
NAMES = ("tiny", *RANDOM_MODELS)


def bench_model(name: str, device: str = "cpu") -> Path:
    """A name from NAMES, or a local checkpoint directory; the path of its HF-native directory.
    A random model missing from the cache is generated on `device`."""
    if name == "tiny":
        return tiny_model_dir("hf")
    if name in RANDOM_MODELS:
        directory, vision, text, dtype = RANDOM_MODELS[name]
        return random_model_dir(directory, vision, text, formats=("hf",), dtype=dtype, device=device) / "hf"
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise SystemExit(f"{name}: not one of {', '.join(NAMES)} or a checkpoint directory")
    return path


def small_variant(vision_layers: int, device: str = "cpu") -> Path:
    """`small` with `vision_layers` ViT layers instead of 4 and the same shapes otherwise: the same
    LLM work per request with more or less vision work (its HF-native directory)."""
    directory, vision, text, dtype = RANDOM_MODELS["small"]
    return random_model_dir(f"{directory}-vit{vision_layers}", {**vision, "num_hidden_layers": vision_layers}, text,
                            formats=("hf",), dtype=dtype, device=device) / "hf"


def bench_flash_model(name: str, device: str = "cpu") -> Path | None:
    """The InternVL3.5-Flash variant (original format, ViR router added; pipeline/model/tiny_flash.py) of a
    model from NAMES, with the same ViT and LLM weights; a local checkpoint directory counts when its
    config.json sets flash_mode. None when there is no such variant."""
    if name == "tiny":
        return tiny_model_dir("flash")
    if name in RANDOM_MODELS:
        directory, vision, text, dtype = RANDOM_MODELS[name]
        return random_model_dir(f"{directory}-flash", vision, text, formats=("flash",), dtype=dtype,
                                device=device) / "flash"
    path = Path(name).expanduser()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return path if config.get("flash_mode") else None
