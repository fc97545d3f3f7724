"""Sampler: transformers-equal logits processing, greedy, seeded reproducibility, logprobs, validation."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from language_server.engine.sampling import (
    GREEDY_TEMPERATURE,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SampleOutput,
    Sampler,
    SamplingParams,
    process_logits,
)

VOCAB = 5000


def _random_logits(batch: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _history(seed: int, length: int = 40, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))


def _hf_scores(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor) -> torch.Tensor:
    """One row through transformers' own processors, in generate's order."""
    input_ids, scores = history.unsqueeze(0), logits.unsqueeze(0).float()
    processors = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.is_greedy:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores[0]


def _sample_one(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, history: torch.Tensor) -> SampleOutput:
    return sampler.sample(logits.unsqueeze(0), [params], [params.make_generator()], [history])[0]


PROCESSOR_CASES = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.5, top_k=50),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.3, top_p=0.5),
    SamplingParams(temperature=0.8, top_k=200, top_p=0.8, repetition_penalty=1.2),
    SamplingParams(temperature=2.0, top_k=7, top_p=0.05, repetition_penalty=1.1),
]


def test_processed_distributions_match_transformers():
    logits = _random_logits(len(PROCESSOR_CASES))
    histories = [_history(i) for i in range(len(PROCESSOR_CASES))]
    # The repeated ids in the history must not compound the penalty.
    histories[0] = torch.cat([histories[0], histories[0][:5], histories[0][:5]])
    ours = process_logits(logits, PROCESSOR_CASES, histories)
    for i, params in enumerate(PROCESSOR_CASES):
        expected = _hf_scores(logits[i], params, histories[i])
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(expected)), params
        torch.testing.assert_close(ours[i].softmax(-1), expected.softmax(-1), atol=1e-6, rtol=1e-5)


def test_tied_logits_match_transformers():
    """Coarse (bfloat16-like) logits tie a lot; which tied token top-p drops is arbitrary, how many is not."""
    logits = (_random_logits(4, seed=5) * 2).round() / 2
    params = [
        SamplingParams(temperature=1.0, top_k=20, top_p=0.7),
        SamplingParams(temperature=0.6, top_k=3, top_p=0.95),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=1.0, top_k=40),
    ]
    history = [torch.tensor([], dtype=torch.long)] * 4
    ours = process_logits(logits, params, history)
    for i, p in enumerate(params):
        expected = _hf_scores(logits[i], p, history[i])
        assert torch.isfinite(ours[i]).sum() == torch.isfinite(expected).sum()
        torch.testing.assert_close(ours[i].softmax(-1).sort().values, expected.softmax(-1).sort().values)


def test_top_p_keeps_at_least_one_token_and_top_k_keeps_ties():
    logits = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=1.0, top_p=1e-6), SamplingParams(temperature=1.0, top_k=2)]
    scores = process_logits(logits, params, [torch.tensor([], dtype=torch.long)] * 2)
    assert torch.isfinite(scores[0]).tolist() == [True, False, False, False, False]
    for i, p in enumerate(params):
        assert torch.equal(scores[i], _hf_scores(logits[i], p, torch.tensor([], dtype=torch.long)))


def test_greedy_is_argmax_of_penalized_logits():
    logits = _random_logits(6, seed=1)
    history = [_history(100 + i) for i in range(6)]
    # Make the argmax of the penalized rows a token that was already seen.
    for i in range(3):
        logits[i, history[i][0]] = logits[i].max() + 0.05
    params = [SamplingParams(repetition_penalty=1.5)] * 3 + [SamplingParams()] * 3
    outputs = Sampler().sample(logits, params, [None] * 6, history)
    tokens = [o.token_id for o in outputs]
    for i in range(6):
        assert tokens[i] == int(_hf_scores(logits[i], params[i], history[i]).argmax())
    assert tokens[3:] == logits[3:].argmax(-1).tolist()
    assert all(tokens[i] != int(history[i][0]) for i in range(3))


def test_top_k_one_equals_greedy():
    logits = _random_logits(8, seed=2)
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(8)]
    outputs = Sampler().sample(logits, params, [p.make_generator() for p in params], [torch.tensor([])] * 8)
    assert [o.token_id for o in outputs] == logits.argmax(-1).tolist()


def _step_logits(request: int, step: int) -> torch.Tensor:
    """Logits that depend only on (request, step), whatever batch the request is in."""
    return _random_logits(1, seed=1000 * request + step, scale=2.0)[0]


def _run(requests: dict[int, SamplingParams], steps: int) -> dict[int, list[int]]:
    """Decode `steps` tokens for every request in one batch; return each request's tokens."""
    sampler = Sampler(torch.Generator().manual_seed(123))
    generators = {r: p.make_generator() for r, p in requests.items()}
    tokens: dict[int, list[int]] = {r: [] for r in requests}
    for step in range(steps):
        order = list(requests)
        logits = torch.stack([_step_logits(r, step) for r in order])
        history = [torch.tensor([7, 8, 9] + tokens[r], dtype=torch.long) for r in order]
        outputs = sampler.sample(logits, [requests[r] for r in order], [generators[r] for r in order], history)
        for r, out in zip(order, outputs):
            tokens[r].append(out.token_id)
    return tokens


def test_seeded_row_is_the_same_alone_and_in_any_batch():
    seeded_a = SamplingParams(temperature=0.8, top_p=0.9, top_k=100, seed=7)
    seeded_b = SamplingParams(temperature=1.2, repetition_penalty=1.2, seed=99)
    others = {
        2: SamplingParams(),  # greedy
        3: SamplingParams(temperature=1.0),  # unseeded: draws from the shared generator
        4: SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.3),
    }
    steps = 40
    alone_a = _run({0: seeded_a}, steps)[0]
    alone_b = _run({1: seeded_b}, steps)[1]
    batched = _run({3: others[3], 0: seeded_a, 2: others[2], 1: seeded_b, 4: others[4]}, steps)
    reordered = _run({1: seeded_b, 4: others[4], 0: seeded_a}, steps)
    assert batched[0] == alone_a == reordered[0]
    assert batched[1] == alone_b == reordered[1]
    assert len(set(alone_a)) > 10  # it really sampled


def test_different_seeds_give_different_tokens():
    runs = [_run({0: SamplingParams(temperature=1.0, seed=seed)}, 30)[0] for seed in (1, 2, 3)]
    assert runs[0] != runs[1] and runs[0] != runs[2] and runs[1] != runs[2]
    assert runs[0] == _run({0: SamplingParams(temperature=1.0, seed=1)}, 30)[0]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=1.0, top_k=3)],
)
def test_sampling_frequencies_follow_the_distribution(params):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    draws = 20000
    sampler = Sampler(torch.Generator().manual_seed(0))
    outputs = sampler.sample(logits.expand(draws, -1), [params] * draws, [None] * draws, [torch.tensor([])] * draws)
    counts = torch.bincount(torch.tensor([o.token_id for o in outputs]), minlength=6).float()
    expected = process_logits(logits.unsqueeze(0), [params], [torch.tensor([])])[0].softmax(-1)
    torch.testing.assert_close(counts / draws, expected, atol=0.015, rtol=0)
    assert counts[expected == 0].sum() == 0


def test_logprobs_come_from_the_raw_logits():
    logits = _random_logits(4, seed=3).to(torch.bfloat16)
    params = [
        SamplingParams(top_logprobs=5),
        SamplingParams(temperature=0.5, top_k=10, repetition_penalty=1.4, seed=1, top_logprobs=20),
        SamplingParams(temperature=1.0, top_p=0.5, seed=2),
        SamplingParams(repetition_penalty=2.0, top_logprobs=1),
    ]
    history = [_history(i) for i in range(4)]
    outputs = Sampler().sample(logits, params, [p.make_generator() for p in params], history)
    reference = torch.log_softmax(logits.float(), dim=-1)
    for i, (out, p) in enumerate(zip(outputs, params)):
        assert out.logprob == pytest.approx(reference[i, out.token_id].item(), abs=1e-5)
        assert len(out.top) == p.top_logprobs
        values, ids = reference[i].topk(p.top_logprobs) if p.top_logprobs else (torch.tensor([]), torch.tensor([]))
        assert [t for t, _ in out.top] == ids.tolist()
        assert [lp for _, lp in out.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(out.top, out.top[1:]))


def test_logprobs_of_widely_spread_logits_match_log_softmax():
    # Most terms of these rows fall far below exp(-80) of their maximum (the subnormal range).
    logits = torch.randn(3, 151_936, generator=torch.Generator().manual_seed(4)) * 40
    logits[1, 7] = 500.0  # one token leaves every other term negligible
    params = [SamplingParams(top_logprobs=3)] * 3
    outputs = Sampler().sample(logits, params, [None] * 3, [torch.tensor([])] * 3)
    reference = torch.log_softmax(logits, dim=-1)
    for i, out in enumerate(outputs):
        assert out.token_id == int(logits[i].argmax())
        assert out.logprob == pytest.approx(reference[i, out.token_id].item(), abs=1e-5)
        assert [lp for _, lp in out.top] == pytest.approx(reference[i].topk(3).values.tolist(), abs=1e-4)
    assert outputs[1].logprob == 0.0


def test_validate_accepts_defaults_and_sensible_values():
    SamplingParams().validate()
    SamplingParams(temperature=0.7, top_p=0.5, top_k=40, repetition_penalty=1.1, top_logprobs=20, stop=("x",)).validate()
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.1).is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 1e-40),
        ("repetition_penalty", 1e6),
        ("repetition_penalty", float("nan")),
        ("top_logprobs", -1),
        ("top_logprobs", 21),
        ("stop", ("ok", "")),
        ("stop", tuple(f"s{i}" for i in range(MAX_STOP_STRINGS + 1))),
        ("stop", ("x" * (MAX_STOP_STRING_CHARS + 1),)),
        ("stop_token_ids", (151645, -1)),
    ],
)
def test_validate_rejects_bad_values_naming_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()


def test_stop_string_limits_name_the_limit():
    with pytest.raises(ValueError, match=f"limit of {MAX_STOP_STRINGS}"):
        SamplingParams(stop=("s",) * (MAX_STOP_STRINGS + 1)).validate()
    with pytest.raises(ValueError, match=f"limit of {MAX_STOP_STRING_CHARS}"):
        SamplingParams(stop=("x" * (MAX_STOP_STRING_CHARS + 1),)).validate()
    SamplingParams(stop=("x" * MAX_STOP_STRING_CHARS,) * MAX_STOP_STRINGS).validate()


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-45, GREEDY_TEMPERATURE / 2])
def test_a_vanishing_temperature_is_greedy(temperature):
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0)) * 5
    params = SamplingParams(temperature=temperature)
    params.validate()
    outputs = Sampler().sample(logits, [params] * 2, [None] * 2, [torch.empty(0, dtype=torch.long)] * 2)
    assert params.is_greedy
    assert [o.token_id for o in outputs] == logits.argmax(dim=-1).tolist()


def test_rows_whose_probabilities_are_not_finite_take_the_best_score():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    logits[0, 7] = float("inf")  # softmax of inf - inf is NaN
    logits[1, :] = float("nan")
    logits[1, 3] = 2.0
    params = [SamplingParams(temperature=1.0)] * 3
    outputs = Sampler(torch.Generator().manual_seed(0)).sample(logits, params, [None] * 3, [torch.tensor([])] * 3)
    assert outputs[0].token_id == 7
    assert outputs[1].token_id == 3
    assert 0 <= outputs[2].token_id < 50


def test_mismatched_batch_is_rejected():
    with pytest.raises(ValueError, match="rows"):
        Sampler().sample(torch.zeros(2, 10), [SamplingParams()], [None], [torch.tensor([])])
