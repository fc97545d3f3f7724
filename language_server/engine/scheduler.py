"""Which sequences run in the next step, and how many of their tokens."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from language_server.engine.block_manager import BlockManager
from language_server.engine.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    """Tokens [start, start + length) of `seq` are computed in this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so the step yields its next token."""
        return self.stop == self.seq.num_tokens


@dataclass
class StepCounts:
    """What the scheduler has scheduled so far; sampled_tokens / sampling_steps is the mean decode batch."""

    steps: int = 0  # batches scheduled
    sampling_steps: int = 0  # of them, those that sample at least one token
    sampled_tokens: int = 0  # one per sequence per sampling step (rows of the LM head)


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    def drop(self, seq: Sequence) -> None:
        self.chunks = [c for c in self.chunks if c.seq is not seq]

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    """First come, first served under a token budget, with chunked prefill and preemption by recompute.

    Each step first gives every running sequence its share, decoding ones (one token each) before
    those still prefilling (a chunk each, as much as the budget and the image rows received so
    far allow). When a running sequence
    needs a block and none is free, the newest running sequence is preempted: its blocks are freed
    and it goes back to the front of the waiting queue, to be recomputed from its first token.
    Waiting sequences are admitted in arrival order while the budget, `max_num_seqs` and the
    free blocks allow, and never in a step that had to preempt.

    `admit(seq)` is called for a waiting sequence right before it is scheduled; it returns False
    when the sequence cannot run, and the scheduler then drops it.
    """

    def __init__(
        self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager,
        admit: Callable[[Sequence], bool],
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.blocks = blocks
        self.admit = admit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_partial_prefills = 0  # chunks that stopped short of a prompt's end
        self.counts = StepCounts()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        preemptions_before = self.num_preemptions
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            budget = self.max_num_batched_tokens - batch.num_tokens
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this step
            length = min(seq.num_uncomputed_tokens, budget, seq.num_ready_tokens - seq.num_computed_tokens)
            if length <= 0:
                continue  # waits for image rows still arriving
            if self._reserve(seq, seq.num_computed_tokens + length, batch):
                batch.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, length))
        if self.num_preemptions == preemptions_before:
            self._admit_waiting(batch)
        sampled = sum(1 for c in batch.chunks if c.samples)
        self.num_partial_prefills += len(batch.chunks) - sampled
        self.counts.steps += bool(batch)
        self.counts.sampling_steps += bool(sampled)
        self.counts.sampled_tokens += sampled
        return batch

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or failed) sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED

    def abort(self, handle: int) -> Sequence | None:
        """Remove the sequence with this engine handle wherever it is and free its blocks at once."""
        for seq in [*self.running, *self.waiting]:
            if seq.handle == handle:
                self.finish(seq)
                return seq
        return None

    def _admit_waiting(self, batch: ScheduledBatch) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            budget = self.max_num_batched_tokens - batch.num_tokens
            if budget == 0:
                return
            seq = self.waiting[0]
            if not self.admit(seq):
                self.finish(seq)
                continue
            length = min(seq.num_uncomputed_tokens, budget, seq.num_ready_tokens - seq.num_computed_tokens)
            if length <= 0 or not self.blocks.can_allocate(seq, seq.num_computed_tokens + length):
                return
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed_tokens + length)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, length))

    def _reserve(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Give `seq` blocks for `num_tokens` tokens, preempting the newest running sequences as
        needed; False when `seq` itself had to go."""
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        batch.drop(seq)
        self.blocks.free(seq)
        seq.preempt()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
