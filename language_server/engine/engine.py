"""The engine thread: takes requests, runs model steps, hands outputs to per-request sinks."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Callable

from language_server.engine.sampling import Sampler
from language_server.engine.sequence import EngineOutput, EngineRequest, Sequence, Status
from language_server.engine.serial import SerialRunner
from language_server.model import LanguageModel

log = logging.getLogger(__name__)
Sink = Callable[[EngineOutput], None]
IDLE_WAIT_S = 0.05


class Engine:
    """Runs sequences in its own thread. `add_request` and `abort` may be called from any thread."""

    def __init__(self, model: LanguageModel, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.runner = SerialRunner(model)
        self.sampler = Sampler()
        self._inbox: queue.Queue[tuple[str, object, Sink | None]] = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._current: Sequence | None = None
        self._sinks: dict[str, Sink] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ----- any thread ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def add_request(self, request: EngineRequest, sink: Sink) -> None:
        self._inbox.put(("add", request, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return int(self._current is not None)

    # ----- engine thread --------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=self._current is None and not self._waiting)
            if self._current is None and not self._waiting:
                continue
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - fail the sequence, keep serving
                if self._current is not None:
                    self._finish(self._current, self._current.fail(exc))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload, sink = item
            if kind == "add":
                seq = Sequence(payload, self.tokenizer, self.max_model_len)
                self._sinks[seq.request_id] = sink
                self._waiting.append(seq)
            else:
                self._abort(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _abort(self, request_id: str) -> None:
        self._waiting = deque(s for s in self._waiting if s.request_id != request_id)
        if self._current is not None and self._current.request_id == request_id:
            self.runner.release(self._current)
            self._current = None
        self._sinks.pop(request_id, None)

    def _step(self) -> None:
        if self._current is None:
            seq = self._current = self._waiting.popleft()
            seq.status = Status.RUNNING
            seq.mark_scheduled()
            seq.run_prepare()
            logits = self.runner.prefill(seq)
        else:
            seq = self._current
            logits = self.runner.decode(seq)
        sample = self.sampler.sample(logits[None], [seq.params], [seq.generator], [seq.history()])[0]
        output = seq.append(sample)
        if output.finished:
            self._finish(seq, output)
        else:
            self._emit(seq, output)

    def _finish(self, seq: Sequence, output: EngineOutput) -> None:
        self.runner.release(seq)
        if self._current is seq:
            self._current = None
        self._emit(seq, output)
        self._sinks.pop(seq.request_id, None)

    def _emit(self, seq: Sequence, output: EngineOutput) -> None:
        sink = self._sinks.get(seq.request_id)
        if sink is None:
            return
        try:
            sink(output)
        except RuntimeError:  # the receiving event loop is gone (shutdown)
            self._sinks.pop(seq.request_id, None)
