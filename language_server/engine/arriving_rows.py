"""Image feature rows that are still arriving when their request enters the engine.

A vision server answers a job that spans several encoder chunks in parts, chunk by chunk. The
language server builds the prompt from the first part (every part describes the whole job's
layout) and hands the engine an `ArrivingRows`: a buffer the size of all rows, filled part by
part. The engine prefills a prompt only as far as the rows received so far reach, so the first
tiles are prefilled while the vision server still encodes the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Placement:
    """Rows [job_row, job_row + length) of one job's answer go to rows [row, row + length) of the prompt's."""

    job_row: int
    row: int
    length: int


def place_rows(dest: torch.Tensor, placements: list[Placement], job_row: int, rows: torch.Tensor) -> None:
    """Copy rows [job_row, job_row + len(rows)) of one job's answer to where `placements` put them in `dest`."""
    stop = job_row + rows.shape[0]
    for place in placements:
        first, last = max(job_row, place.job_row), min(stop, place.job_row + place.length)
        if first < last:
            to = place.row + first - place.job_row
            dest[to : to + last - first] = rows[first - job_row : last - job_row]


class ArrivingRows:
    """Feature rows in prompt order, received part by part.

    `put` (any one producer thread or event loop) copies a part into place; `fail` ends the
    wait with an error. The engine thread reads `ready_tokens` and `error`; `notify`, when set,
    is called after every change so that an idle engine wakes up.
    """

    def __init__(
        self, tensor: torch.Tensor, placements: list[list[Placement]], positions: list[int],
        received: list[int] | None = None,
    ) -> None:
        """`positions`: the prompt index of each row's placeholder token (the engine checks that
        there is one per row). `received`: rows of each job's answer already in `tensor` (default none)."""
        self.tensor = tensor
        self.placements = placements
        self.positions = positions  # prompt index of each row's placeholder token
        # rows of each job's answer in place (parts come in row order)
        self.received = list(received) if received is not None else [0] * len(placements)
        self.error: BaseException | None = None
        self.notify: Callable[[], None] | None = None
        self._order = sorted(
            ((p.row, p.length, job, p.job_row) for job, places in enumerate(placements) for p in places)
        )
        self.ready_rows = self._count_ready()  # leading rows, in prompt order, all in place

    @property
    def complete(self) -> bool:
        return self.ready_rows == self.tensor.shape[0]

    def ready_tokens(self, prompt_length: int) -> int:
        """How many leading prompt tokens can be computed: up to the first placeholder whose row
        has not arrived."""
        return prompt_length if self.complete else self.positions[self.ready_rows]

    def put(self, job: int, job_row: int, rows: torch.Tensor) -> None:
        """Place rows [job_row, job_row + len(rows)) of job `job`'s answer."""
        if job_row != self.received[job]:
            raise ValueError(f"job {job}: rows from {job_row} arrived, expected {self.received[job]}")
        place_rows(self.tensor, self.placements[job], job_row, rows)
        self.received[job] = job_row + rows.shape[0]
        self.ready_rows = self._count_ready()
        self._changed()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._changed()

    def _count_ready(self) -> int:
        """Leading rows, in prompt order, whose jobs have sent them."""
        ready = 0
        for row, length, job, job_row in self._order:
            filled = min(max(self.received[job] - job_row, 0), length)
            ready = row + filled
            if filled < length:
                break
        return ready

    def _changed(self) -> None:
        if self.notify is not None:
            self.notify()
