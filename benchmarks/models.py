"""Random InternVL checkpoints for benchmarks (generated once into the cache, never committed)."""

from __future__ import annotations

from pathlib import Path

from pipeline.tiny_model import TEXT_CONFIG, VISION_CONFIG, random_model_dir, tiny_model_dir

# "small": sized so that, on a CPU core, encoding a ~5-tile image costs about what the LLM
# spends on that request's prefill and its share of decoding.
SMALL_VISION = {**VISION_CONFIG, "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 5,
                "num_attention_heads": 4}
SMALL_TEXT = {**TEXT_CONFIG, "hidden_size": 384, "intermediate_size": 1152, "num_hidden_layers": 4,
              "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64}
SMALL_VERSION = 4


def bench_model(name: str) -> Path:
    """"tiny", "small", or a local checkpoint directory (HF-native directory of a generated model)."""
    if name == "tiny":
        return tiny_model_dir("hf")
    if name == "small":
        return random_model_dir(f"bench-small-v{SMALL_VERSION}", SMALL_VISION, SMALL_TEXT, formats=("hf",)) / "hf"
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise SystemExit(f"{name}: not 'tiny', 'small' or a checkpoint directory")
    return path
