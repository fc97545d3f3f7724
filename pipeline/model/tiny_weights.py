"""The shape of the tiny InternVL3.5 and the deterministic random weights of a generated model.

Shaped like InternVL3.5 (InternViT -> pixel shuffle 0.5 -> MLP -> Qwen3) with tiny widths; the
weights are drawn so that answers visibly depend on the image.
"""

from __future__ import annotations

import torch

from pipeline.model.tiny_processors import IMG_CONTEXT_ID, VOCAB_SIZE

VISION_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "attention_bias": True,
    "use_qk_norm": False,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "layer_scale_init_value": 1.0,
    "use_mean_pooling": True,
}
TEXT_CONFIG = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}


def internvl_config(
    vision_config: dict | None = None, text_config: dict | None = None, image_token_id: int = IMG_CONTEXT_ID
):
    """The transformers InternVLConfig of a generated model (tiny by default)."""
    from transformers import InternVLConfig

    text_config = text_config or TEXT_CONFIG
    return InternVLConfig(
        vision_config=vision_config or VISION_CONFIG,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=256,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text_config.get("tie_word_embeddings", False),
    )


def build_model(
    seed: int = 0,
    vision_config: dict | None = None,
    text_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    image_token_id: int = IMG_CONTEXT_ID,
):
    """A random InternVLForConditionalGeneration (tiny by default) with weights that make images matter,
    allocated in `dtype` on `device` (the values are drawn in float32 either way, by `device`'s generator)."""
    from transformers import InternVLForConditionalGeneration

    config = internvl_config(vision_config, text_config, image_token_id)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InternVLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad(), torch.device(device):
        for name, param in model.named_parameters():
            param.copy_(_init_value(name, param, generator))
    return model


def _init_value(name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Deterministic weights: unit norms and layer scales, projections wide enough that
    attention is far from uniform, so that answers visibly depend on the image."""
    shape = param.shape
    if name.endswith(("lambda_1", "lambda_2")) or ("norm" in name and name.endswith("weight")):
        return torch.ones(shape)
    if "norm" in name and name.endswith("bias"):
        return torch.zeros(shape)
    if name.endswith("bias"):
        return torch.randn(shape, generator=generator) * 0.02
    if "embed_tokens" in name or "lm_head" in name:
        return torch.randn(shape, generator=generator)
    if "position_embeddings" in name or "cls_token" in name:
        return torch.randn(shape, generator=generator) * 0.5
    # experts stacked [experts, out, in] or [experts, in, out]: the smaller side is the fan-in here
    fan_in = min(shape[1:]) if param.dim() == 3 else param[0].numel()
    return torch.randn(shape, generator=generator) * (1.6 / fan_in**0.5)
