"""The conformance matrix: every published InternVL3 / InternVL3.5 family (pipeline/model/families.py),
in both checkpoint formats, through the two real server processes on each engine, gives the greedy
tokens of transformers' `InternVLForConditionalGeneration.generate` in float32 for one image, two
images and text only. (An LLM whose layers the builtin engine cannot run is refused at start-up:
tests/language_server/test_engine_families.py.)

One family: `pytest tests/e2e/test_families.py -k internvl3-9b`. The tokenizers of InternVL3-9B
and InternVL3.5-20B-A4B are stand-ins (pipeline/model/tiny_processors.py): no registry package
ships their vocabularies. A family's two formats start together on each engine (FormatPairs), so
that their start-ups overlap.
"""

from __future__ import annotations

import gc
from typing import Iterator

import pytest
import torch

from pipeline.client import sampling
from pipeline.entrypoints.launch import Deployment, LaunchError, start_together, stop_together
from pipeline.model.families import FAMILIES, TINY_FAMILY, family_dir
from tests.conftest import FP32, TINY_CONFIG, VLLM_ENGINE, port_overrides, requires_vllm
from tests.e2e.test_equivalence import CASES
from tests.reference import Reference, to_messages

MAX_NEW_TOKENS = 8
FORMATS = ("hf", "original")
CONFORMANCE_CASES = ("single_image", "two_images", "text_only")
ENGINE_OVERRIDES = {"builtin": {}, "vllm": VLLM_ENGINE}
# The tiny model is TINY_FAMILY's checkpoint: three of its cells use the session's shared deployments.
SHARED = {
    (TINY_FAMILY, "hf", "builtin"): "fp32_deployment", (TINY_FAMILY, "original", "builtin"): "original_fp32_deployment",
    (TINY_FAMILY, "hf", "vllm"): "vllm_deployment",
}


def _cells() -> list:
    cells = []
    for family in FAMILIES:
        for engine in ENGINE_OVERRIDES:
            for fmt in FORMATS:
                marks = [requires_vllm] if engine == "vllm" else []
                cells.append(pytest.param(family, fmt, engine, id=_cell_id(family, fmt, engine), marks=marks))
    return cells


def _cell_id(family: str, fmt: str, engine: str) -> str:
    return f"{family}-{fmt}-{engine}"


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


class FormatPairs:
    """A family's two formats on one engine start together (their start-ups overlap on two cores):
    the first of the two cells starts both, the second takes the one left waiting for it, and both
    are stopped together once neither is in use."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[str, str, str], Deployment] = {}  # started for a cell still to come
        self.used: dict[tuple[str, str], Deployment] = {}  # (family, engine) -> served, awaiting its pair

    def take(self, family: str, fmt: str, engine: str, tmp_path, request) -> Deployment:  # noqa: ANN001
        if (family, fmt, engine) in self.waiting:
            return self.waiting.pop((family, fmt, engine))
        partners = [f for f in FORMATS if f != fmt and (family, f, engine) not in SHARED
                    and _still_to_run(request, _cell_id(family, f, engine))]
        deployments = {f: _deployment(family, f, engine, tmp_path / f) for f in (fmt, *partners)}
        try:
            start_together(list(deployments.values()))
        except LaunchError:
            if not partners:
                raise
            return _deployment(family, fmt, engine, tmp_path / f"{fmt}-alone").start()  # its failure, if any, is its own
        self.waiting.update({(family, f, engine): deployments[f] for f in partners})
        return deployments[fmt]

    def release(self, family: str, engine: str, deployment: Deployment) -> None:
        if any(key[0] == family and key[2] == engine for key in self.waiting):
            self.used[(family, engine)] = deployment
            return
        stop_together([deployment, *filter(None, [self.used.pop((family, engine), None)])])

    def close(self) -> None:
        stop_together([*self.waiting.values(), *self.used.values()])
        self.waiting.clear()
        self.used.clear()


def _still_to_run(request, cell: str) -> bool:  # noqa: ANN001
    """Whether this session runs the test of `cell` after the current one."""
    items = [item.name for item in request.session.items]
    name = f"{request.node.originalname}[{cell}]"
    return name in items and items.index(name) > items.index(request.node.name)


def _deployment(family: str, fmt: str, engine: str, log_dir) -> Deployment:  # noqa: ANN001
    overrides = {**port_overrides(), **FP32, **ENGINE_OVERRIDES[engine], "model.path": str(family_dir(family) / fmt)}
    return Deployment(TINY_CONFIG, overrides, log_dir=log_dir)


@pytest.fixture(scope="module")
def format_pairs() -> Iterator[FormatPairs]:
    pairs = FormatPairs()
    yield pairs
    pairs.close()


@pytest.mark.parametrize(("family", "fmt", "engine"), _cells())
def test_family_serves_transformers_tokens(family, fmt, engine, tmp_path, request, format_pairs):
    expected = reference_tokens(family)
    if (family, fmt, engine) in SHARED:
        assert answers(request.getfixturevalue(SHARED[family, fmt, engine])) == expected
        return
    deployment = format_pairs.take(family, fmt, engine, tmp_path, request)
    try:
        assert answers(deployment) == expected
    finally:
        format_pairs.release(family, engine, deployment)


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
