"""One request inside the engine: its prompt, its output so far, and when it ends."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Callable

import torch

from language_server.engine.arriving_rows import ArrivingRows
from language_server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from language_server.engine.sampling import SampleOutput, SamplingParams
from language_server.limits import new_token_limit


Prepared = tuple[list[int], "torch.Tensor | None"]
_handles = itertools.count(-1, -1)  # for sequences built outside an engine (tests, tools)


@dataclass
class EngineRequest:
    """What the API layer hands the engine.

    `prepare`, when set, runs on the engine thread right before the request is first scheduled
    and returns (prompt_ids, image_rows); it is how the colocated baseline runs vision inline.
    An exception it raises fails only this request, with that exception as the error.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    image_rows: torch.Tensor | ArrivingRows | None = None  # features for the <IMG_CONTEXT> positions, in order
    prepare: Callable[[], Prepared] | None = None

    def run_prepare(self) -> None:
        """Run `prepare`, once: the prompt and rows it returns replace `prompt_ids` and `image_rows`."""
        if self.prepare is not None:
            prepare, self.prepare = self.prepare, None
            self.prompt_ids, self.image_rows = prepare()


def image_positions(token_ids: list[int], image_token_id: int) -> list[int]:
    """The index of every image placeholder (<IMG_CONTEXT>) among `token_ids`, in order."""
    return [i for i, token in enumerate(token_ids) if token == image_token_id]


def check_image_rows(positions: list[int], rows: torch.Tensor | None) -> None:
    """ValueError unless there is one feature row per image placeholder."""
    count = 0 if rows is None else rows.shape[0]
    if len(positions) != count:
        raise ValueError(f"{len(positions)} image placeholder tokens but {count} feature rows")


@dataclass
class EngineOutput:
    """New output of one request since its previous EngineOutput."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[SampleOutput] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "eos", "stop_string"
    error: Exception | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queued_s: float = 0.0  # engine arrival -> first scheduled
    prefill_s: float = 0.0  # first scheduled -> first token
    decode_s: float = 0.0  # first token -> finish

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Engine-side state of one request.

    Its tokens are the prompt followed by the output so far. The first `num_computed_tokens` of
    them have their keys and values in the KV cache, in the blocks listed by `block_table`;
    preemption by recompute drops both and starts over from token 0. `handle` identifies it in
    the engine; `request_id` (the client's) is only echoed. `image_positions` are the prompt's
    image placeholders, found once (none without `image_token_id`).
    """

    def __init__(
        self, request: EngineRequest, tokenizer, max_model_len: int, handle: int | None = None,
        image_token_id: int | None = None,
    ) -> None:
        self.request = request
        self.handle = next(_handles) if handle is None else handle
        self.image_token_id = image_token_id
        self.request_id = request.request_id
        self.params = request.params
        self.max_model_len = max_model_len
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.set_prompt(request.prompt_ids, request.image_rows)
        self.generator = self.params.make_generator()
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_preemptions = 0
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(self.params.stop)
        self.arrived = time.perf_counter()
        self.scheduled: float | None = None
        self.first_token: float | None = None

    def set_prompt(self, prompt_ids: list[int], image_rows: torch.Tensor | ArrivingRows | None) -> None:
        """Install the prompt (at construction, or after `prepare` ran)."""
        self.prompt_ids = list(prompt_ids)
        self.arriving = image_rows if isinstance(image_rows, ArrivingRows) else None
        self.image_rows = image_rows.tensor if isinstance(image_rows, ArrivingRows) else image_rows
        if self.arriving is not None:
            self.image_positions = self.arriving.positions
        elif self.image_token_id is not None:
            self.image_positions = image_positions(self.prompt_ids, self.image_token_id)
        else:
            self.image_positions = []
        self.max_new_tokens = new_token_limit(self.params.max_new_tokens, len(self.prompt_ids), self.max_model_len)

    def run_prepare(self) -> None:
        """Run the request's `prepare` hook, once."""
        if self.request.prepare is not None:
            self.request.run_prepare()
            self.set_prompt(self.request.prompt_ids, self.request.image_rows)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_ready_tokens(self) -> int:
        """Leading tokens that can be computed now: all, unless image rows are still arriving."""
        if self.arriving is None or self.arriving.complete:
            return self.num_tokens
        return self.arriving.ready_tokens(len(self.prompt_ids))

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose keys and values are not in the KV cache yet (1 for a decoding sequence)."""
        return self.num_tokens - self.num_computed_tokens

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without building the whole list."""
        prompt = len(self.prompt_ids)
        if stop <= prompt:
            return self.prompt_ids[start:stop]
        if start >= prompt:
            return self.output_ids[start - prompt : stop - prompt]
        return self.prompt_ids[start:] + self.output_ids[: stop - prompt]

    def preempt(self) -> None:
        """Forget the cached tokens (their blocks are freed by the caller); they will be recomputed."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_preemptions += 1
        self.status = Status.WAITING

    def history(self) -> torch.Tensor:
        """Prompt and output ids, for the repetition penalty."""
        return torch.tensor(self.all_ids, dtype=torch.long)

    def mark_scheduled(self) -> None:
        if self.scheduled is None:
            self.scheduled = time.perf_counter()

    def append(self, sample: SampleOutput) -> EngineOutput:
        """Record one sampled token and say what is new, finishing the sequence when a rule says so."""
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        token = sample.token_id
        self.output_ids.append(token)
        finish = None
        if not self.params.ignore_eos and token in self.params.stop_token_ids:
            finish = "eos"
        text, stopped = self._stops.push(self._detokenizer.push([token]))
        if stopped:
            finish = "stop_string"
        elif finish is None and len(self.output_ids) >= self.max_new_tokens:
            finish = "length"
        if finish in ("eos", "length"):
            tail, stopped = self._stops.push(self._detokenizer.flush())
            text += tail
            if stopped:
                finish = "stop_string"
            else:
                text += self._stops.flush()
        output = EngineOutput(
            request_id=self.request_id,
            token_ids=[token],
            text=text,
            logprobs=[sample] if self.params.top_logprobs else [],
            finish_reason=finish,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
        )
        if finish is not None:
            self.status = Status.FINISHED
            self._fill_timings(output, now)
        return output

    def end_for_length(self) -> EngineOutput:
        """End without a new token (no room left for one), releasing any text still held back."""
        tail, stopped = self._stops.push(self._detokenizer.flush())
        text = tail if stopped else tail + self._stops.flush()
        output = EngineOutput(
            request_id=self.request_id,
            token_ids=[],
            text=text,
            finish_reason="stop_string" if stopped else "length",
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
        )
        self.status = Status.FINISHED
        self._fill_timings(output, time.perf_counter())
        return output

    def fail(self, error: Exception) -> EngineOutput:
        self.status = Status.FINISHED
        output = EngineOutput(self.request_id, [], "", error=error, prompt_tokens=len(self.prompt_ids))
        self._fill_timings(output, time.perf_counter())
        return output

    def _fill_timings(self, output: EngineOutput, now: float) -> None:
        scheduled = self.scheduled or now
        first = self.first_token or now
        output.queued_s = scheduled - self.arrived
        output.prefill_s = first - scheduled
        output.decode_s = now - first
