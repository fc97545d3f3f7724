"""`VllmEngine`: the builtin AsyncEngine's `generate`, served by vLLM's AsyncLLM."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import AsyncIterator

import torch

from language_server.engine.arriving_rows import ArrivingRows
from language_server.engine.sampling import SampleOutput, SamplingParams
from language_server.engine.sequence import EngineOutput, EngineRequest
from language_server.limits import new_token_limit
from language_server.vllm_engine.args import apply_environment, engine_args
from language_server.vllm_engine.prompt import ImageTokens, vllm_prompt
from language_server.vllm_engine.stats import EngineStats, stat_logger_factory
from pipeline.model.checkpoint import Checkpoint
from pipeline.config import DvDConfig
from pipeline.errors import DvDError, InternalError, InvalidRequest, Unavailable
from pipeline.runtime.process import bind_process_tree

log = logging.getLogger(__name__)


class VllmEngine:
    """Runs requests on vLLM's engine (its engine-core process is vLLM's own business).

    Requests are keyed in vLLM by an id of this engine's own, never the client's request_id.
    Leaving `generate` early (cancellation, a client gone) aborts the request in vLLM, which
    frees its KV blocks.
    """

    def __init__(self, llm, tokens: ImageTokens, stats: EngineStats, max_model_len: int) -> None:  # noqa: ANN001
        self.llm = llm
        self.tokens = tokens
        self.stats = stats
        self.max_model_len = max_model_len
        self._ids = itertools.count(1)
        cache = llm.vllm_config.cache_config
        self.kv_blocks_total = int(cache.num_gpu_blocks or 0)

    @classmethod
    def start(cls, config: DvDConfig, checkpoint: Checkpoint, tokenizer) -> VllmEngine:  # noqa: ANN001
        """Start vLLM's engine on the checkpoint's language model (blocks until it is ready)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        apply_environment(config)
        stats = EngineStats()
        llm = AsyncLLM.from_engine_args(engine_args(config, checkpoint), stat_loggers=[stat_logger_factory(stats)])
        engine = cls(llm, ImageTokens.of(tokenizer, checkpoint.format), stats, config.language.max_model_len)
        if config.language.cpus:  # vLLM's CPU workers re-bind their threads to the NUMA node's CPUs
            bind_process_tree(os.getpid(), config.language.cpus)
        log.info("vllm engine ready", extra={"kv_blocks": engine.kv_blocks_total, "model": str(checkpoint.path)})
        return engine

    # ----- the builtin engine's interface ------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.stats.num_running

    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting

    @property
    def kv_usage(self) -> float:
        return self.stats.kv_usage

    @property
    def kv_blocks_used(self) -> int:
        return round(self.stats.kv_usage * self.kv_blocks_total)

    @property
    def num_preemptions(self) -> int:
        return self.stats.num_preemptions

    @property
    def step_counts(self):  # noqa: ANN201 - the scheduler's StepCounts
        return self.stats.step_counts

    async def parameters(self) -> list[tuple[str, int]]:
        """(name, bytes) of every parameter vLLM's workers hold, over all workers."""
        per_worker = await self.llm.collective_rpc("dvd_parameters")
        return [tuple(entry) for worker in per_worker for entry in worker]

    def stop(self) -> None:
        self.llm.shutdown()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yield outputs until the request finishes; leaving early aborts it in vLLM."""
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt_ids, rows = await _prompt_and_rows(request)
        prompt = vllm_prompt(prompt_ids, rows, self.tokens)
        params = self._sampling_params(request.params, len(prompt_ids))
        request_id = f"dvd-{next(self._ids)}"
        completion = 0
        checked = False
        try:
            async for out in self.llm.generate(prompt, params, request_id):
                if not checked:
                    checked = True
                    if list(out.prompt_token_ids or ()) != prompt_ids:
                        raise InternalError("vLLM expanded the image placeholders into a different prompt")
                done = out.outputs[0]
                completion += len(done.token_ids)
                output = EngineOutput(
                    request_id=request.request_id,
                    token_ids=list(done.token_ids),
                    text=done.text,
                    logprobs=_samples(done.token_ids, done.logprobs, request.params.top_logprobs),
                    finish_reason=_finish_reason(done.finish_reason, done.stop_reason),
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=completion,
                )
                if out.finished:
                    _fill_timings(output, out.metrics)
                yield output
        except DvDError:
            raise
        except EngineDeadError as exc:
            raise Unavailable(f"the vLLM engine has stopped: {exc}") from None
        except ValueError as exc:  # vLLM's validation of a request
            raise InvalidRequest(f"vLLM refused the request: {exc}") from None

    def _sampling_params(self, params: SamplingParams, prompt_tokens: int):  # noqa: ANN202 - vllm.SamplingParams
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            n=1,
            max_tokens=new_token_limit(params.max_new_tokens, prompt_tokens, self.max_model_len),
            temperature=0.0 if params.is_greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
            stop=list(params.stop) or None,
            stop_token_ids=[] if params.ignore_eos else list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.top_logprobs or None,
            skip_special_tokens=True,
            include_stop_str_in_output=False,
            output_kind=RequestOutputKind.DELTA,
        )


async def _prompt_and_rows(request: EngineRequest) -> tuple[list[int], torch.Tensor | None]:
    """The prompt and all its feature rows: after the colocated `prepare` hook (run off the event
    loop), and once every part of features still arriving is in."""
    if request.prepare is not None:
        await asyncio.to_thread(request.run_prepare)
    prompt_ids, rows = request.prompt_ids, request.image_rows
    if isinstance(rows, ArrivingRows):
        rows = await _all_rows(rows)
    return list(prompt_ids), rows


async def _all_rows(rows: ArrivingRows) -> torch.Tensor:
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    rows.notify = lambda: loop.call_soon_threadsafe(changed.set)
    while not rows.complete and rows.error is None:
        await changed.wait()  # the request's deadline (the API layer's) bounds this wait
        changed.clear()
    if rows.error is not None:
        raise rows.error
    return rows.tensor


def _finish_reason(reason: str | None, stop_reason: int | str | None) -> str | None:
    if reason is None:
        return None
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop_string" if isinstance(stop_reason, str) else "eos"
    raise InternalError(f"vLLM ended the request: {reason}")


def _samples(token_ids, logprobs, top: int) -> list[SampleOutput]:  # noqa: ANN001 - vLLM's sample logprobs
    """Each new token's log-probability and the `top` most likely alternatives, as the builtin engine
    reports them (vLLM's raw log-probabilities, before any logits processing)."""
    if not top or logprobs is None:
        return []
    samples = []
    for token, position in zip(token_ids, logprobs):
        best = sorted((lp.rank, tid, lp.logprob) for tid, lp in position.items() if lp.rank is not None and lp.rank <= top)
        samples.append(SampleOutput(token, position[token].logprob, [(tid, lp) for _, tid, lp in best]))
    return samples


def _fill_timings(output: EngineOutput, metrics) -> None:  # noqa: ANN001 - vLLM's RequestStateStats
    """Queue, prefill and decode times from vLLM's per-request timestamps (engine-core clock)."""
    if metrics is None or not metrics.scheduled_ts:
        return
    output.queued_s = max(0.0, metrics.scheduled_ts - metrics.queued_ts)
    if metrics.first_token_ts:
        output.prefill_s = max(0.0, metrics.first_token_ts - metrics.scheduled_ts)
        output.decode_s = max(0.0, metrics.last_token_ts - metrics.first_token_ts)
