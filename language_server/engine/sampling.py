"""Next-token sampling for a batch of requests, each with its own parameters.

The logits pipeline follows transformers' `generate`: repetition penalty -> temperature ->
top-k -> top-p -> sample (greedy rows take the argmax after the repetition penalty).
Reported log-probabilities are those of the raw logits, before any processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20
# Below this a temperature only sharpens the distribution into its argmax, and dividing logits by
# it overflows float32: such requests are greedy, as in vLLM (_SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
# Outside this range a penalty pushes logits to inf or 0; common values are 1.0-1.3.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
# Every generated token is checked against every stop string (engine thread, whole batch waits).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (or below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # HF semantics, over prompt + output tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # ignored when ignore_eos
    ignore_eos: bool = False
    top_logprobs: int = 0  # 0..MAX_TOP_LOGPROBS

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range."""
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in {MIN_REPETITION_PENALTY:g}..{MAX_REPETITION_PENALTY:g}, "
                f"got {self.repetition_penalty}"
            )
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(self.stop)} stop strings exceed the limit of {MAX_STOP_STRINGS}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(f"a stop string is {longest} characters, over the limit of {MAX_STOP_STRING_CHARS}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids!r}")

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the most likely token (temperature below GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE

    def make_generator(self) -> torch.Generator | None:
        """The per-request generator to pass to every `Sampler.sample` call, or None without a seed."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


@dataclass
class SampleOutput:
    """The token chosen for one row, with log-probabilities from the raw logits."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Samples one token per row of a [B, V] logits batch."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Shared by rows that bring no generator of their own.
        self._default = generator if generator is not None else torch.Generator()
        if generator is None:
            self._default.seed()

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        history: list[torch.Tensor],
    ) -> list[SampleOutput]:
        """Pick a token for each row; `history[i]` holds row i's prompt + generated ids."""
        batch = logits.shape[0]
        if not len(params) == len(generators) == len(history) == batch:
            raise ValueError(f"batch of {batch} rows needs as many params, generators and histories")
        if batch == 0:
            return []
        raw = logits.float()
        scores = process_logits(raw, params, history)
        chosen = torch.empty(batch, dtype=torch.long, device=raw.device)
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        if greedy:
            rows = torch.tensor(greedy, device=raw.device)
            chosen[rows] = _take_rows(scores, rows).argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled:
            rows = torch.tensor(sampled, device=raw.device)
            # One uniform draw per row and step, from the row's own generator when it has one,
            # so a seeded row's tokens do not depend on what else is in the batch.
            uniforms = torch.cat([self._uniform(generators[i]) for i in sampled]).to(raw.device)
            warped = _take_rows(scores, rows)
            probs = warped.softmax(dim=-1)
            picked, broken = _inverse_cdf(probs, uniforms)
            if bool(broken.any()):  # e.g. NaN logits: the cdf means nothing, take the best score
                best = torch.nan_to_num(warped, nan=float("-inf")).argmax(dim=-1)
                picked = torch.where(broken, best, picked)
            chosen[rows] = picked
        return _outputs(raw, chosen, params)

    def _uniform(self, generator: torch.Generator | None) -> torch.Tensor:
        generator = generator if generator is not None else self._default
        return torch.rand(1, generator=generator, device=generator.device).cpu()


def process_logits(
    logits: torch.Tensor, params: list[SamplingParams], history: list[torch.Tensor]
) -> torch.Tensor:
    """The float32 scores each row samples from (greedy rows: takes the argmax of).

    Repetition penalty applies to every row; temperature, top-k and top-p (masked to -inf)
    only to sampled rows.
    """
    scores = _apply_repetition_penalty(logits.float(), params, history)
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled:
        return scores
    rows = torch.tensor(sampled, device=scores.device)
    sub = [params[i] for i in sampled]
    warped = _take_rows(scores, rows) / _column(scores, [p.temperature for p in sub])
    warped = _apply_top_k(warped, [p.top_k for p in sub])
    warped = _apply_top_p(warped, [p.top_p for p in sub])
    if len(sampled) == len(params):
        return warped
    scores = scores.clone()
    scores[rows] = warped
    return scores


def _column(like: torch.Tensor, values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _apply_repetition_penalty(
    logits: torch.Tensor, params: list[SamplingParams], history: list[torch.Tensor]
) -> torch.Tensor:
    """Divide positive (multiply negative) logits of every token seen so far by the penalty."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and history[i].numel()]
    if not rows:
        return logits
    scores = logits.clone()
    vocab = scores.shape[1]
    for i in rows:
        ids = history[i].to(device=scores.device, dtype=torch.long)
        ids = ids[(ids >= 0) & (ids < vocab)]
        seen = scores[i, ids]
        penalty = params[i].repetition_penalty
        scores[i, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def _apply_top_k(scores: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    """Mask every token scoring below the row's k-th best (ties with it are kept); k = 0 is off."""
    largest = min(max(top_ks), scores.shape[1])
    if largest == 0:
        return scores
    ks = torch.tensor(top_ks, device=scores.device)
    kth = scores.topk(largest, dim=-1).values.gather(1, (ks.clamp(1, largest) - 1).unsqueeze(1))
    remove = (scores < kth) & (ks > 0).unsqueeze(1)
    return scores.masked_fill(remove, float("-inf"))


def _apply_top_p(scores: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches top_p (at least one)."""
    active = [i for i, p in enumerate(top_ps) if p < 1.0]
    if not active:
        return scores
    rows = torch.tensor(active, device=scores.device)
    sub = _take_rows(scores, rows)
    finite = int(torch.count_nonzero(torch.isfinite(sub), dim=-1).max())
    if finite < sub.shape[1]:
        # After top-k only a few tokens are left in play: order just those.
        descending, order = sub.topk(finite, dim=-1)
        ascending, order = descending.flip(-1), order.flip(-1)
    else:
        ascending, order = sub.sort(dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1.0 - _column(sub, [top_ps[i] for i in active])
    drop_sorted[:, -1] = False
    drop = torch.zeros_like(sub, dtype=torch.bool).scatter(1, order, drop_sorted)
    if len(active) == scores.shape[0]:
        return sub.masked_fill(drop, float("-inf"))
    scores = scores.clone()
    scores[rows] = sub.masked_fill(drop, float("-inf"))
    return scores


def _take_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`tensor[rows]`, without a copy when `rows` is every row in order."""
    return tensor if rows.numel() == tensor.shape[0] else tensor[rows]


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token whose cumulative-probability interval contains each row's uniform draw, and
    which rows hold a NaN (it runs through the cumulative sum to the row's total)."""
    cdf = probs.cumsum(dim=-1)
    broken = ~torch.isfinite(cdf[:, -1])
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    if bool((picked >= probs.shape[1]).any()):
        # Rounding put a target on the very end of the cdf: take the last possible token there.
        last_possible = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
        picked = torch.minimum(picked, last_possible)
    return picked, broken


def _logsumexp(raw: torch.Tensor) -> torch.Tensor:
    """`raw.logsumexp(dim=-1)` of finite logits, without torch's slow CPU path on subnormal terms.

    A term more than 80 below its row's maximum (exp < 2e-35) cannot change a float32 sum that
    holds the maximum's exp(0) = 1, so it is clamped there, out of the subnormal range. On a random
    model's logits (151k vocabulary, spread over +-98) torch's CPU logsumexp took 25 ms for 8 rows,
    and this takes 5.
    """
    top = raw.amax(dim=-1, keepdim=True)
    top = torch.where(top.isfinite(), top, torch.zeros_like(top))
    return (raw - top).clamp_(min=-80.0).exp_().sum(dim=-1).log_() + top.squeeze(-1)


def _outputs(raw: torch.Tensor, chosen: torch.Tensor, params: list[SamplingParams]) -> list[SampleOutput]:
    normalizer = _logsumexp(raw)
    chosen_logprobs = (raw.gather(1, chosen.unsqueeze(1)).squeeze(1) - normalizer).tolist()
    most = max(p.top_logprobs for p in params)
    top_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    if most:
        values, indices = raw.topk(min(most, raw.shape[1]), dim=-1)
        top_ids = indices.tolist()
        top_logprobs = (values - normalizer.unsqueeze(1)).tolist()
    outputs = []
    for i, (token, logprob, p) in enumerate(zip(chosen.tolist(), chosen_logprobs, params)):
        top = list(zip(top_ids[i][: p.top_logprobs], top_logprobs[i][: p.top_logprobs])) if most else []
        outputs.append(SampleOutput(token_id=token, logprob=logprob, top=top))
    return outputs
