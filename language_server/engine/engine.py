"""The engine: continuous batching over a paged KV cache, driven by its own thread or by `step()`."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Callable

import torch

from language_server.engine import cpu_linear
from language_server.engine.attention import select_backend, use_paged_attention, windows_or_sinks
from language_server.engine.block_manager import BlockManager
from language_server.engine.kv_cache import KVCache, KVCacheSpec, plan_num_blocks
from language_server.engine.model_runner import ModelRunner
from language_server.engine.sampling import Sampler
from language_server.engine.scheduler import ScheduledBatch, Scheduler, StepCounts
from language_server.engine.sequence import EngineOutput, EngineRequest, Sequence, check_image_rows
from language_server.limits import check_prompt_length
from language_server.model import LanguageModel
from pipeline.config import LanguageConfig
from pipeline.errors import InvalidRequest

log = logging.getLogger(__name__)
Sink = Callable[[EngineOutput], None]
IDLE_WAIT_S = 0.05
_NO_HISTORY = torch.empty(0, dtype=torch.long)


class Engine:
    """Runs every active request in every step.

    `add_request` and `abort` may be called from any thread. `start()` runs steps in the engine
    thread; tests may instead call `step()` themselves. Requests are keyed by the engine's own
    handle (what `add_request` returns), never by the client's request_id, so two requests that
    share an id cannot touch each other. Taking the model over switches its
    attention implementation to the engine's paged attention.
    """

    def __init__(self, model: LanguageModel, tokenizer, config: LanguageConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        spec = KVCacheSpec.of(model.config, model.dtype)
        num_blocks = plan_num_blocks(config, spec, model.device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.kv_cache = KVCache(spec, num_blocks, config.block_size, model.device)
        self.backend = select_backend(config.attn_backend, model.device, model.dtype, windows_or_sinks(model.config))
        use_paged_attention(model.causal_lm)
        fast_linear = config.linear_kernel == "auto" and cpu_linear.install(model.causal_lm) > 0
        self.runner = ModelRunner(model, self.kv_cache, self.backend, fast_linear)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.blocks, self._admit)
        self.sampler = Sampler()
        self._inbox: queue.SimpleQueue[tuple[str, object, Sink | None]] = queue.SimpleQueue()
        self._sinks: dict[int, Sink] = {}
        self._handles = itertools.count(1)
        self._outputs: list[EngineOutput] = []
        self._lock = threading.Lock()  # held by whoever is stepping or draining the inbox
        self._wakeup = threading.Event()
        self._stalled = False  # the last step found nothing it could run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        log.info(
            "engine ready",
            extra={
                "kv_blocks": num_blocks,
                "block_size": config.block_size,
                "attn_backend": self.backend.name,
                "fast_linear": fast_linear,
            },
        )

    # ----- any thread ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the engine thread, then apply requests and aborts still in the inbox."""
        self._stop.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._lock.acquire(timeout=timeout_s):
            try:
                self._drain_inbox()
            finally:
                self._lock.release()

    def add_request(self, request: EngineRequest, sink: Sink) -> int:
        """Queue a request; `sink` receives its outputs (on the engine thread). Returns the
        request's handle, unique in this engine, for `abort`."""
        handle = next(self._handles)
        self._inbox.put(("add", (handle, request), sink))
        self._wakeup.set()
        return handle

    def abort(self, handle: int) -> None:
        """Drop a request (by the handle `add_request` returned) and free its KV blocks: now when
        the engine is idle, else right after the step in progress. Its sink gets nothing more."""
        self._inbox.put(("abort", handle, None))
        self._wakeup.set()
        if self._lock.acquire(blocking=False):
            try:
                self._drain_inbox()
            finally:
                self._lock.release()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_blocks_used(self) -> int:
        return self.blocks.num_used

    @property
    def kv_blocks_total(self) -> int:
        return self.blocks.num_total

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def step_counts(self) -> StepCounts:
        """Steps, sampling steps and sampled tokens so far (a live view)."""
        return self.scheduler.counts

    # ----- the stepping thread ------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        """Take in new requests and aborts, run one batched model step, and return (as well as
        hand to the sinks) every output it produced."""
        with self._lock:
            self._drain_inbox()
            self._fail_starved()
            batch = self.scheduler.schedule()
            self._stalled = not batch
            if batch:
                self._run(batch)
            outputs, self._outputs = self._outputs, []
            return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.has_work() or self._stalled:  # stalled: every sequence waits for image rows
                self._stalled = False
                self._wakeup.wait(IDLE_WAIT_S)
                self._wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug in one step must not end the engine thread
                log.exception("engine step failed")

    def _run(self, batch: ScheduledBatch) -> None:
        try:
            logits = self.runner.run(batch.chunks)
            for chunk in batch.chunks:
                chunk.seq.num_computed_tokens = chunk.stop
            sampling = [c.seq for c in batch.chunks if c.samples]
            samples = self.sampler.sample(
                logits,
                [seq.params for seq in sampling],
                [seq.generator for seq in sampling],
                [seq.history() if seq.params.repetition_penalty != 1.0 else _NO_HISTORY for seq in sampling],
            )
        except Exception as exc:  # noqa: BLE001 - the step's sequences fail, the engine keeps serving
            log.exception("model step failed", extra={"sequences": len(batch.chunks)})
            for chunk in batch.chunks:
                self._finish(chunk.seq, chunk.seq.fail(exc))
            return
        for seq, sample in zip(sampling, samples):
            output = seq.append(sample)
            if output.finished:
                self._finish(seq, output)
            else:
                self._emit(seq, output)

    def _admit(self, seq: Sequence) -> bool:
        """Right before a waiting sequence is first scheduled (or rescheduled after preemption):
        run its `prepare` hook once and check that it can run at all. Time spent in `prepare`
        counts as queueing, not prefill. A sequence that has outgrown the whole KV pool ends with
        finish reason "length"."""
        try:
            seq.run_prepare()
            if seq.output_ids and not self._fits_pool(seq):
                self._emit(seq, seq.end_for_length())
                self._sinks.pop(seq.handle, None)
                return False
            self._check_runnable(seq)
        except Exception as exc:  # noqa: BLE001 - fails this request only
            self._emit(seq, seq.fail(exc))
            self._sinks.pop(seq.handle, None)
            return False
        seq.mark_scheduled()
        return True

    def _fits_pool(self, seq: Sequence) -> bool:
        return self.blocks.blocks_for(seq.num_tokens + 1) <= self.blocks.num_total

    def _check_runnable(self, seq: Sequence) -> None:
        """InvalidRequest for a request too large for this server; ValueError for an inconsistent
        one (a fault of the caller, not the client)."""
        if not seq.prompt_ids:
            raise InvalidRequest("the prompt is empty")
        check_prompt_length(len(seq.prompt_ids), self.config.max_model_len)
        check_image_rows(seq.image_positions, seq.image_rows)
        if seq.image_positions and seq.image_rows.shape[1] != self.model.hidden_size:
            raise ValueError(f"image rows are {seq.image_rows.shape[1]} wide; the LLM's hidden size is {self.model.hidden_size}")
        if not self._fits_pool(seq):
            needed = self.blocks.blocks_for(seq.num_tokens + 1)
            raise InvalidRequest(
                f"the prompt ({seq.num_tokens} tokens) needs {needed} KV blocks; the pool has {self.blocks.num_total}"
            )

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload, sink = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                handle, request = payload
                self._add(handle, request, sink)
            else:
                self.scheduler.abort(payload)
                self._sinks.pop(payload, None)

    def _add(self, handle: int, request: EngineRequest, sink: Sink) -> None:
        seq = Sequence(request, self.tokenizer, self.config.max_model_len, handle, self.model.image_token_id)
        self._sinks[handle] = sink
        if seq.arriving is not None:
            seq.arriving.notify = self._wakeup.set
        self.scheduler.add(seq)

    def _fail_starved(self) -> None:
        """End the sequences whose image rows will not all arrive (the vision side failed)."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.arriving is not None and seq.arriving.error is not None:
                self._finish(seq, seq.fail(seq.arriving.error))

    def _finish(self, seq: Sequence, output: EngineOutput) -> None:
        self.scheduler.finish(seq)
        self._emit(seq, output)
        self._sinks.pop(seq.handle, None)

    def _emit(self, seq: Sequence, output: EngineOutput) -> None:
        sink = self._sinks.get(seq.handle)
        if sink is not None and not self._deliver(sink, output):
            self._sinks.pop(seq.handle, None)

    def _deliver(self, sink: Sink, output: EngineOutput) -> bool:
        self._outputs.append(output)
        try:
            sink(output)
        except RuntimeError:  # the receiving event loop is gone (shutdown)
            return False
        return True
