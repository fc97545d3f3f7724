"""What vLLM's engine reports after each step, kept for DvD's gauges and counters (/metrics)."""

from __future__ import annotations

from language_server.engine.scheduler import StepCounts


class EngineStats:
    """The latest scheduler state and running totals, fed by `StatLogger.record` on the event loop."""

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.num_preemptions = 0
        self.step_counts = StepCounts()

    def record(self, scheduler_stats, iteration_stats) -> None:  # noqa: ANN001 - vLLM's stats types
        if scheduler_stats is not None:
            self.num_running = scheduler_stats.num_running_reqs
            self.num_waiting = scheduler_stats.num_waiting_reqs
            self.kv_usage = scheduler_stats.kv_cache_usage
        if iteration_stats is not None:
            counts = self.step_counts
            counts.steps += 1
            self.num_preemptions += iteration_stats.num_preempted_reqs
            if iteration_stats.num_generation_tokens:
                counts.sampling_steps += 1
                counts.sampled_tokens += iteration_stats.num_generation_tokens


def stat_logger_factory(stats: EngineStats):
    """A vLLM stat-logger factory whose loggers feed `stats` (vLLM's own Prometheus logger stays on)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:  # noqa: ANN001
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:  # noqa: ANN001
            stats.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return StatLogger
