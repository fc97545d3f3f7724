"""DvD with features sent in parts (`vision.stream_features`) against one answer per job.

Two DvD deployments of `make bench`'s model and thread budget, one with each setting, measured
in alternation (closed loop, then one request at a time) so that a slow spell of the machine
falls on both. Reports throughput, time to first token and each server's CPU seconds per
request, as JSON and a Markdown table in benchmarks/results/.

    python -m benchmarks.feature_parts --rounds 3
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.setups import BASE_CONFIG, PORT_BASE, PORTS_PER_SETUP, Setup, run_metered, setup_ports, warm
from benchmarks.load import LoadResult, summarize
from benchmarks.models import bench_model
from benchmarks.report import RESULTS, markdown_table, write_json
from benchmarks.workloads import workloads
from pipeline.config import LanguageConfig
from pipeline.entrypoints.launch import Deployment

SETTINGS = {"parts": True, "whole": False}
COLUMNS = [
    ("setting", "features"), ("load", "load"), ("requests", "requests"), ("request_throughput", "req/s"),
    ("ttft_p50_s", "TTFT p50 s"), ("ttft_p99_s", "TTFT p99 s"), ("ttft_p99_after_first_wave_s", "TTFT p99 after 1st wave s"),
    ("e2e_p99_s", "e2e p99 s"), ("vision_cpu_s", "vision CPU s/request"), ("language_cpu_s", "language CPU s/request"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="896px")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48, help="per closed-loop run")
    parser.add_argument("--unloaded-requests", type=int, default=8, help="per one-at-a-time run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--port-base", type=int, default=PORT_BASE + 4 * PORTS_PER_SETUP)
    args = parser.parse_args(argv)

    model_path = bench_model("small", "cpu")
    (workload,) = workloads(args.output_tokens, [args.size])
    kv_blocks = args.concurrency * -(-(4096 + args.output_tokens) // LanguageConfig.block_size)
    deployments: dict[str, Deployment] = {}
    runs: dict[tuple[str, str], list[LoadResult]] = {}
    try:
        for index, (name, stream) in enumerate(SETTINGS.items()):
            overrides = {
                **Setup("dvd", "decoupled", 1, 1).overrides(str(model_path), "float32", 1, kv_blocks),
                **setup_ports(index, args.port_base),
                "vision.stream_features": stream,
            }
            deployments[name] = Deployment(BASE_CONFIG, overrides, log_dir=RESULTS / "logs" / f"parts-{name}").start(600)
            warm(deployments[name], workload, 2)
        loads = {f"closed-{args.concurrency}": (args.requests, args.concurrency), "closed-1": (args.unloaded_requests, 1)}
        for round_index in range(args.rounds):
            names = list(SETTINGS) if round_index % 2 == 0 else list(reversed(SETTINGS))
            for load, (count, concurrency) in loads.items():
                for name in names:
                    label = f"{name} {load} ({round_index + 1}/{args.rounds})"
                    runs.setdefault((name, load), []).append(
                        run_metered(deployments[name], workload, count, label, concurrency=concurrency))
    finally:
        for deployment in deployments.values():
            deployment.stop()

    rows = [_row(name, load, results) for (name, load), results in runs.items()]
    path = write_json("feature-parts", {"args": vars(args), "runs": rows})
    table = markdown_table(rows, COLUMNS)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {path} (+ .md)")
    return 0


def _row(name: str, load: str, results: list[LoadResult]) -> dict[str, Any]:
    completed = sum(1 for result in results for record in result.records if record.completed)
    cpu: dict[str, float] = {}
    for result in results:
        for server, seconds in result.server_cpu_s.items():
            cpu[server] = cpu.get(server, 0.0) + seconds
    return {
        "setting": name, "load": load, "requests": completed, **summarize(results),
        "vision_cpu_s": cpu.get("vision-0", 0.0) / max(completed, 1),
        "language_cpu_s": cpu.get("language", 0.0) / max(completed, 1),
    }


if __name__ == "__main__":
    raise SystemExit(main())
