"""The engine runs other InternVL LLM families token for token like their own `generate`: tiny
random Qwen2, Qwen3-MoE and GPT-OSS (sliding-window layers narrower than most prompts, attention
sinks) causal LMs built here, with image feature rows in some prompts and limits small enough that
prompts are chunked and sequences preempted."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from language_server.engine.attention import unsupported_features
from language_server.model import LanguageModel
from tests.language_server.conftest import Case, drive

VOCAB = 512
IMAGE_TOKEN = VOCAB - 1
EOS = 2
HIDDEN = 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, initializer_range=0.1,
    eos_token_id=EOS, bos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
)
FAMILIES = {
    "qwen2": dict(model_type="qwen2", **COMMON),
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, **COMMON
    ),
    "gpt_oss": dict(
        model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2, sliding_window=24,
        layer_types=["sliding_attention", "full_attention"], **COMMON
    ),
}


def _build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(FAMILIES[family])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    config._attn_implementation = "eager" if family == "gpt_oss" else "sdpa"  # GPT-OSS has no SDPA path
    return AutoModelForCausalLM.from_config(config).eval()


def _prompts() -> list[tuple[list[int], int]]:
    """(prompt ids, image rows) of 10 requests from 3 to ~230 tokens; image spans of 40 rows."""
    generator = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(3, VOCAB - 1, (n,), generator=generator).tolist()  # noqa: E731
    image = [IMAGE_TOKEN] * 40
    return [
        (text(3), 0),
        (text(20) + image + text(7), 40),
        (text(150), 0),
        (text(5) + image + text(3) + image + text(9), 80),
        (text(60), 0),
        (image + text(4), 40),
        (text(230), 0),
        (text(12) + image + text(100), 40),
        (text(33), 0),
        (text(8) + image, 40),
    ]


def _reference(model: torch.nn.Module, prompt: list[int], rows: torch.Tensor | None, max_new: int) -> list[int]:
    """The model's own `generate` on embeddings with the rows scattered into the image positions."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids)
        if rows is not None:
            mask = (ids == IMAGE_TOKEN).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, rows)
        out = model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
        )
    return out[0].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_equals_the_family_generate(family, make_engine):
    model = _build(family)
    generator = torch.Generator().manual_seed(2)
    cases = []
    for i, (prompt, num_rows) in enumerate(_prompts()):
        rows = torch.randn(num_rows, HIDDEN, generator=generator) * 0.1 if num_rows else None
        max_new = 4 + (5 * i) % 13
        cases.append(Case(f"{family}-{i}", prompt, rows, max_new, _reference(model, prompt, rows, max_new)))
    # The engine takes over its model's attention; give it a copy so `model` stays a plain reference.
    engine = make_engine(
        LanguageModel(copy.deepcopy(model), IMAGE_TOKEN),
        num_kv_blocks=40, block_size=8, max_num_batched_tokens=48, max_model_len=320,
    )
    arrivals = [(2 * i, case.request(stop_token_ids=(EOS,))) for i, case in enumerate(cases)]
    results = drive(engine, arrivals)
    for case in cases:
        got = results[case.request_id]
        assert got.error is None, got.error
        assert got.token_ids == case.expected, case.request_id
    assert engine.num_preemptions > 0 and engine.scheduler.num_partial_prefills > 0


def test_the_builtin_engine_refuses_at_start_up_an_llm_whose_layers_it_lacks(tmp_path) -> None:
    from transformers import InternVLConfig

    from language_server.engines import refuse_unsupported
    from pipeline.model.checkpoint import CheckpointError, open_checkpoint
    from pipeline.model.tiny_weights import VISION_CONFIG

    text = AutoConfig.for_model(
        "qwen3_next", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )
    InternVLConfig(vision_config=VISION_CONFIG, text_config=text.to_dict()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot serve a qwen3_next LLM \(linear_attention layers are not "
                                              r"supported\); serve this model with language.engine: vllm"):
        refuse_unsupported(open_checkpoint(tmp_path))
    for family in FAMILIES:  # the families it serves pass the same check
        config = AutoConfig.for_model(**FAMILIES[family])
        assert unsupported_features(config) == []
