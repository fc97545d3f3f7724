"""The conformance matrix: every published InternVL3 / InternVL3.5 family (pipeline/model/families.py),
in both checkpoint formats, through the two real server processes on each engine, gives the greedy
tokens of transformers' `InternVLForConditionalGeneration.generate` in float32 for one image, two
images and text only. (An LLM whose layers the builtin engine cannot run is refused at start-up:
tests/language_server/test_engine_families.py.)

One family: `pytest tests/e2e/test_families.py -k internvl3-9b`. The tokenizers of InternVL3-9B
and InternVL3.5-20B-A4B are stand-ins (pipeline/model/tiny_processors.py): no registry package
ships their vocabularies.
"""

from __future__ import annotations

import gc

import pytest
import torch

from pipeline.client import sampling
from pipeline.entrypoints.launch import Deployment
from pipeline.model.families import FAMILIES, TINY_FAMILY, family_dir
from tests.conftest import FP32, TINY_CONFIG, VLLM_ENGINE, port_overrides, requires_vllm
from tests.e2e.test_equivalence import CASES
from tests.reference import Reference, to_messages

MAX_NEW_TOKENS = 8
CONFORMANCE_CASES = ("single_image", "two_images", "text_only")
ENGINE_OVERRIDES = {"builtin": {}, "vllm": VLLM_ENGINE}
# The tiny model is TINY_FAMILY's checkpoint: its cells use the session's shared deployments.
SHARED = {
    ("hf", "builtin"): "fp32_deployment", ("original", "builtin"): "original_fp32_deployment",
    ("hf", "vllm"): "vllm_deployment", ("original", "vllm"): "original_vllm_deployment",
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


def answers(deployment: Deployment) -> dict[str, list[int]]:
    from pipeline.client import DvDClient

    with DvDClient(deployment.address, timeout_s=120) as client:
        params = sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
        return {case: list(client.generate(to_messages(CASES[case]), params).token_ids) for case in CONFORMANCE_CASES}


@pytest.mark.parametrize(("family", "fmt", "engine"), _cells())
def test_family_serves_transformers_tokens(family, fmt, engine, tmp_path, request):
    if family == TINY_FAMILY:
        assert answers(request.getfixturevalue(SHARED[(fmt, engine)])) == reference_tokens(family)
        return
    model_dir = family_dir(family) / fmt
    overrides = {**port_overrides(), **FP32, **ENGINE_OVERRIDES[engine], "model.path": str(model_dir)}
    deployment = Deployment(TINY_CONFIG, overrides, log_dir=tmp_path)
    expected = reference_tokens(family)
    with deployment:
        assert answers(deployment) == expected


@pytest.mark.parametrize("family", [f.name for f in FAMILIES.values() if f.flash and f.name != TINY_FAMILY])
def test_family_flash_variant_under_vir(family, tmp_path):
    """The -Flash variant (ViR router added; the tiny model's: test_vision_vir.py) gives the released
    Flash algorithm's tokens, with some tiles compressed to 64 tokens and some kept at 256."""
    from tests.vision_server.vir_reference import ReleasedFlash

    root = family_dir(family)
    released = ReleasedFlash(Reference(root / "hf", torch.float32), root / "flash")
    overrides = {**port_overrides(), **FP32, "model.path": str(root / "flash")}
    with Deployment(TINY_CONFIG, overrides, log_dir=tmp_path) as deployment:
        got = answers(deployment)
    for case in ("single_image", "two_images"):
        expected, _, flags = released.generate(CASES[case], MAX_NEW_TOKENS)
        assert 0 < sum(flags) < len(flags), case
        assert got[case] == expected, case
