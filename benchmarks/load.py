"""Load generation against a running DvD (or colocated) server: closed loop or fixed arrival rate."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import grpc

from pipeline.stages import Spans
from proto.dvd.v1 import generate_pb2 as pb
from proto.dvd.v1 import generate_pb2_grpc


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    sent: float
    first_token: float | None = None
    done: float | None = None
    output_tokens: int = 0
    error: str | None = None
    timings: pb.Timings | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and self.done is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e_s(self) -> float | None:
        return None if self.done is None else self.done - self.sent


@dataclass
class LoadResult:
    """Records of one load run and the summary numbers reports use."""

    records: list[RequestRecord] = field(default_factory=list)  # in send order
    started: float = 0.0
    finished: float = 0.0
    first_wave: int = 0  # requests sent together at the start (a closed loop's concurrency)
    server_cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per server process during the run
    engine_counters: dict[str, float] = field(default_factory=dict)  # the LLM engine's step counters during the run
    vir_tiles: dict[str, float] = field(default_factory=dict)  # tiles routed by ViR during the run, by tokens per tile

    def summary(self) -> dict[str, float | list[float | None]]:
        return summarize([self])


def summarize(results: list[LoadResult]) -> dict[str, float | list[float | None]]:
    """Summary numbers of one or more runs of the same load, pooled: throughput over their summed
    wall time, percentiles over all their requests.

    A closed loop of C workers and N requests also gets a steady-state throughput: completions
    per second between its C-th and its (N-C)-th completion. The latter is when the last request
    is sent, so in that window C requests are always in flight; the fill before it and the drain
    after it (where a pipeline's first stage idles while the last requests finish the second)
    are properties of a finite run, not of the server.
    """
    records = [r for result in results for r in result.records]
    ok = [r for r in records if r.completed]
    wall = max(sum(result.finished - result.started for result in results), 1e-9)
    ttft = sorted(r.ttft_s for r in ok)
    steady_ttft = sorted(r.ttft_s for result in results for r in result.records[result.first_wave :] if r.completed)
    e2e = sorted(r.e2e_s for r in ok)
    return {
        "runs": len(results),
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "wall_s": wall,
        "request_throughput": len(ok) / wall,
        "steady_request_throughput": _steady_throughput(results),
        "output_token_throughput": sum(r.output_tokens for r in ok) / wall,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "ttft_p99_after_first_wave_s": _percentile(steady_ttft, 99),
        "e2e_p50_s": _percentile(e2e, 50),
        "e2e_p99_s": _percentile(e2e, 99),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else float("nan"),
        "ttft_by_send_order_s": [r.ttft_s for r in records],
        **_span_means(ok),
        **_cpu_cores(results, wall),
        **_engine_steps(results),
        **_vir_share(results),
    }


SPANS = tuple(f.name for f in fields(Spans))  # as named in the responses' Timings, with "_ms"


def _span_means(records: list[RequestRecord]) -> dict[str, float]:
    """Mean seconds per request in each server-side stage (`<span>_mean_s`), from the timings
    in the final responses; a request without images has zeros in the vision spans."""
    timed = [r.timings for r in records if r.timings is not None]
    return {
        f"{span}_mean_s": statistics.fmean(getattr(t, f"{span}_ms") for t in timed) / 1000 if timed else float("nan")
        for span in SPANS
    }


def _cpu_cores(results: list[LoadResult], wall: float) -> dict[str, float]:
    """`<server>_cpu_cores`: the CPU seconds each server process spent over the runs' wall time."""
    names = {name for result in results for name in result.server_cpu_s}
    return {f"{name}_cpu_cores": sum(r.server_cpu_s.get(name, 0.0) for r in results) / wall for name in sorted(names)}


def _engine_steps(results: list[LoadResult]) -> dict[str, float]:
    """`llm_steps` and `llm_decode_batch` (tokens sampled per sampling step: the mean number of
    sequences that shared the LM head), over the runs whose engine counters were read."""
    counted = [r.engine_counters for r in results if r.engine_counters]
    if not counted:
        return {}
    total = {name: sum(c.get(name, 0.0) for c in counted) for name in counted[0]}
    sampling = total.get("dvd_engine_sampling_steps_total", 0.0)
    return {
        "llm_steps": total.get("dvd_engine_steps_total", float("nan")),
        "llm_decode_batch": total.get("dvd_engine_sampled_tokens_total", 0.0) / sampling if sampling else float("nan"),
    }


def _vir_share(results: list[LoadResult]) -> dict[str, float]:
    """`vir_tiles`, `vir_compressed_tiles` (sent with 64 tokens) and `vir_compressed_fraction`,
    over the runs whose vision servers routed tiles."""
    tiles = {tokens: sum(r.vir_tiles.get(tokens, 0.0) for r in results) for r in results for tokens in r.vir_tiles}
    total = sum(tiles.values())
    if not total:
        return {}
    return {"vir_tiles": total, "vir_compressed_tiles": tiles.get("64", 0.0),
            "vir_compressed_fraction": tiles.get("64", 0.0) / total}


def _steady_throughput(results: list[LoadResult]) -> float:
    completions = span = 0.0
    for result in results:
        done = sorted(r.done for r in result.records if r.completed)
        first, last = result.first_wave, len(result.records) - result.first_wave
        if result.first_wave == 0 or len(done) < len(result.records) or last <= first:
            continue
        completions += last - first
        span += done[last - 1] - done[first - 1]
    return completions / span if span > 0 else float("nan")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def _one(stub, request: pb.GenerateRequest, record: RequestRecord, timeout_s: float) -> None:
    try:
        async for event in stub.Generate(request, timeout=timeout_s):
            if event.HasField("delta") and event.delta.token_ids and record.first_token is None:
                record.first_token = time.perf_counter()
            if event.HasField("result"):
                record.done = time.perf_counter()
                record.output_tokens = len(event.result.token_ids)
                record.timings = event.result.timings
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"


async def run_load(
    address: str,
    make_request: Callable[[int], pb.GenerateRequest],
    total: int,
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    timeout_s: float = 600.0,
    progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Send `total` requests: `concurrency` closed-loop workers, or Poisson arrivals at `rate` req/s."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    if (rate is not None and not rate > 0) or (concurrency is not None and concurrency < 1):
        raise ValueError(f"the rate must be > 0 and the concurrency >= 1, got rate={rate} concurrency={concurrency}")
    result = LoadResult(first_wave=concurrency or 0)
    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        counter = iter(range(total))
        done_count = 0

        async def send(index: int, arrival: float | None = None) -> None:
            nonlocal done_count
            record = RequestRecord(sent=time.perf_counter() if arrival is None else arrival)
            result.records.append(record)
            await _one(stub, make_request(index), record, timeout_s)
            done_count += 1
            if progress is not None:
                progress(done_count)

        result.started = time.perf_counter()
        if concurrency is not None:

            async def worker() -> None:
                for index in counter:
                    await send(index)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(seed)
            tasks = []
            next_at = time.perf_counter()
            for index in counter:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(index, arrival=next_at)))  # a late start still counts
                next_at += rng.expovariate(rate)
            await asyncio.gather(*tasks)
        result.finished = time.perf_counter()
    return result
