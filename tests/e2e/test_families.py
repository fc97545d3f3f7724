"""The conformance matrix: every published InternVL3 / InternVL3.5 family (pipeline/model/families.py),
in both checkpoint formats, through the two real server processes on each engine, gives the greedy
tokens of transformers' `InternVLForConditionalGeneration.generate` in float32 for one image, two
images and text only. Where an engine cannot serve a family, start-up fails at once with a message
naming the family, what is missing and the engine that can.

One family: `pytest tests/e2e/test_families.py -k internvl3-9b`. The tokenizers of InternVL3-9B
and InternVL3.5-20B-A4B are stand-ins (pipeline/model/tiny_processors.py): no registry package
ships their vocabularies.
"""

from __future__ import annotations

import gc
import re
import time

import pytest
import torch

from pipeline.client import sampling
from pipeline.entrypoints.launch import Deployment, LaunchError
from pipeline.model.families import FAMILIES, family_dir
from tests.conftest import TINY_CONFIG, VLLM_ENGINE, port_overrides, requires_vllm
from tests.e2e.test_equivalence import CASES
from tests.reference import Reference, to_messages

MAX_NEW_TOKENS = 8
CONFORMANCE_CASES = ("single_image", "two_images", "text_only")
FP32 = {"vision.dtype": "float32", "language.dtype": "float32"}
ENGINE_OVERRIDES = {"builtin": {}, "vllm": VLLM_ENGINE}
# (family, engine) -> what start-up must say instead of serving
REFUSED = {
    ("internvl3_5-20b-a4b", "builtin"): r"cannot serve a gpt_oss LLM \(sliding-window attention layers .* and "
                                        r"attention sinks are not supported\); serve this model with "
                                        r"language.engine: vllm",
}


def _cells() -> list:
    cells = []
    for family in FAMILIES:
        for fmt in ("hf", "original"):
            for engine in ENGINE_OVERRIDES:
                marks = [requires_vllm] if engine == "vllm" else []
                cells.append(pytest.param(family, fmt, engine, id=f"{family}-{fmt}-{engine}", marks=marks))
    return cells


_references: dict[str, dict[str, list[int]]] = {}


def reference_tokens(family: str) -> dict[str, list[int]]:
    """transformers' greedy tokens for each case on the family's HF-native checkpoint (once per family)."""
    if family not in _references:
        reference = Reference(family_dir(family) / "hf", torch.float32)
        _references[family] = {case: reference.generate(CASES[case], MAX_NEW_TOKENS) for case in CONFORMANCE_CASES}
        del reference
        gc.collect()
    return _references[family]


@pytest.mark.parametrize(("family", "fmt", "engine"), _cells())
def test_family_serves_transformers_tokens(family, fmt, engine, tmp_path):
    model_dir = family_dir(family) / fmt
    overrides = {**port_overrides(), **FP32, **ENGINE_OVERRIDES[engine], "model.path": str(model_dir)}
    deployment = Deployment(TINY_CONFIG, overrides, log_dir=tmp_path)
    refusal = REFUSED.get((family, engine))
    started = time.monotonic()
    if refusal is not None:
        with pytest.raises(LaunchError) as failure:
            deployment.start(timeout_s=300)
        assert str(failure.value).startswith("language: ")
        assert re.search(refusal, str(failure.value)), str(failure.value)
        assert time.monotonic() - started < 120  # at once: before any weight loads, not at a timeout
        return
    expected = reference_tokens(family)
    from pipeline.client import DvDClient

    with deployment, DvDClient(deployment.address, timeout_s=120) as client:
        for case in CONFORMANCE_CASES:
            result = client.generate(
                to_messages(CASES[case]), sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
            )
            assert list(result.token_ids) == expected[case], case
