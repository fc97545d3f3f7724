"""Which KV-cache blocks belong to which sequence."""

from __future__ import annotations

from collections import deque

from language_server.engine.sequence import Sequence


class BlockManager:
    """A pool of fixed-size KV blocks handed out to sequences and taken back whole.

    A sequence's `block_table` lists its blocks in order: token t lives in block
    `block_table[t // block_size]` at offset `t % block_size`.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_total = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences."""
        return self.num_used / self.num_total

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can grow to hold its first `num_tokens` tokens."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold its first `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > len(self._free):
            raise RuntimeError(f"{missing} KV blocks needed, {len(self._free)} free")
        for _ in range(missing):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks to the pool."""
        self._free.extend(seq.block_table)
        seq.block_table = []
