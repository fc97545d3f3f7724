"""Prometheus metrics of a language server."""

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("dvd_requests_total", "Generation requests by outcome", ["outcome"])
PROMPT_TOKENS = Counter("dvd_prompt_tokens_total", "Prompt tokens of finished requests")
COMPLETION_TOKENS = Counter("dvd_completion_tokens_total", "Generated tokens")
TTFT_S = Histogram("dvd_time_to_first_token_seconds", "Arrival to first generated token", buckets=_S)
TPOT_S = Histogram(
    "dvd_time_per_output_token_seconds", "Mean time between output tokens of a request",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
E2E_S = Histogram("dvd_e2e_latency_seconds", "Arrival to final message", buckets=_S)
TRANSFER_BYTES = Counter("dvd_transfer_bytes_total", "Feature payload bytes received")
RUNNING = Gauge("dvd_running_requests", "Requests being generated")
WAITING = Gauge("dvd_waiting_requests", "Requests queued in the engine")
KV_BLOCKS_USED = Gauge("dvd_kv_cache_used_blocks", "KV-cache blocks held by sequences")
KV_BLOCKS_TOTAL = Gauge("dvd_kv_cache_blocks", "KV-cache blocks in the pool")
KV_USAGE = Gauge("dvd_kv_cache_usage", "Fraction of the KV-cache blocks held by sequences")
IN_FLIGHT = Gauge("dvd_requests_in_flight", "Requests admitted by the API (any stage)")


class _EngineCounters:
    """Counters the engine keeps itself, read at scrape time."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        engine = self.engine
        yield CounterMetricFamily(
            "dvd_engine_preemptions", "Sequences preempted (KV blocks freed, recomputed later)",
            value=engine.num_preemptions,
        )
        counts = engine.step_counts
        yield CounterMetricFamily("dvd_engine_steps", "Batched model steps", value=counts.steps)
        yield CounterMetricFamily(
            "dvd_engine_sampling_steps", "Model steps that sampled at least one token", value=counts.sampling_steps
        )
        yield CounterMetricFamily(
            "dvd_engine_sampled_tokens",
            "Tokens sampled, one per sequence per sampling step (/ sampling steps = mean decode batch)",
            value=counts.sampled_tokens,
        )


def watch_engine(engine) -> None:
    """Point the engine's gauges and counters at a running Engine."""
    RUNNING.set_function(lambda: engine.num_running)
    WAITING.set_function(lambda: engine.num_waiting)
    KV_BLOCKS_USED.set_function(lambda: engine.kv_blocks_used)
    KV_BLOCKS_TOTAL.set(engine.kv_blocks_total)
    KV_USAGE.set_function(lambda: engine.kv_usage)
    REGISTRY.register(_EngineCounters(engine))
