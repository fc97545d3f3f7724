"""The two-CPU bound of benchmarks/vllm_bound.py: its figures from runs' rates and CPU seconds, and
its text-only requests."""

from __future__ import annotations

import pytest

from benchmarks.vllm_bound import bound, text_bodies
from benchmarks.workloads import PROMPT


def test_the_bound_is_one_over_the_dearer_half_and_two_over_both_halves_balanced() -> None:
    rates = {"dvd-vllm": 1.9, "vllm-b": 2.0, "vllm-a": 1.25}
    cpu = {"dvd-vllm vision": 0.5, "text-a": 0.3, "vllm-a": 0.8}
    figures = bound(rates, cpu)
    assert figures["V"] == 0.5 and figures["L"] == 0.3
    assert figures["E"] == pytest.approx(0.5)  # vLLM's encoder path: its whole request less the LLM half
    assert figures["s"] == pytest.approx(0.8)  # 2.0 req/s on two CPUs against 1.25 on one
    assert figures["measured"] == pytest.approx(0.95)
    assert figures["as_sized"] == pytest.approx(1.0)  # the vision half, 0.5 CPU-s, allows 2 req/s
    assert figures["balanced"] == pytest.approx(1.25)  # 2 CPUs / 0.8 CPU-s = 2.5 req/s


def test_text_requests_carry_no_image_and_no_two_share_a_prefix() -> None:
    bodies = text_bodies("vllm-a", "tile tile tile", 16)
    first, second = bodies(0), bodies(1)
    for index, body in enumerate((first, second)):
        (message,) = body["messages"]
        assert message["content"] == [{"type": "text", "text": f"{index} tile tile tile {PROMPT}"}]
        assert (body["model"], body["max_tokens"], body["ignore_eos"], body["temperature"]) == ("vllm-a", 16, True, 0.0)
