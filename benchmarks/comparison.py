"""The DvD-vs-colocated report of `make bench`: ratios, pipeline efficiency, tables and plot.

`closed` maps (setup, workload name) to a closed-loop summary (`load.summarize`); setups are
"dvd", "colocated-a", "colocated-b", "vision-only" and "llm-only", and with vLLM at the rate size
"dvd-vllm" (DvD, `language.engine: vllm`), "dvd-vllm-vir" (the same on the -Flash checkpoint,
ViR routing), "vllm-b" (plain vLLM's HTTP server bound to DvD's vision + LLM CPUs) and "vllm-a"
(plain vLLM bound to DvD's LLM CPUs alone).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.load import SPANS
from benchmarks.report import bar_plot, markdown_table


def efficiency(closed: dict, workload: str) -> dict[str, Any]:
    """DvD req/s over its slower stage's, over whole runs and in the closed loops' steady state."""
    row: dict[str, Any] = {"workload": workload}
    for kind, key in (("", "request_throughput"), ("steady_", "steady_request_throughput")):
        dvd, vision, llm = (closed[(setup, workload)][key] for setup in ("dvd", "vision-only", "llm-only"))
        row |= {f"{kind}dvd_req_s": dvd, f"{kind}vision_only_req_s": vision, f"{kind}llm_only_req_s": llm,
                f"{kind}pipeline_efficiency": _ratio(dvd, min(vision, llm))}
    row["errors"] = sum(closed[(setup, workload)]["errors"] for setup in ("dvd", "vision-only", "llm-only"))
    dvd = closed[("dvd", workload)]
    dvd_cores = server_cores(dvd)
    # CPU seconds per completed request of each stage, inside DvD and alone: with the busy cores
    # they split a shortfall into pipeline bubbles and stages slowed by running side by side
    for stage, alone, index in (("vision", "vision-only", 0), ("language", "llm-only", 1)):
        single = closed[(alone, workload)]
        row[f"dvd_{stage}_cpu_cores"] = dvd_cores[index]
        row[f"dvd_{stage}_cpu_s_per_request"] = _per_request(dvd, dvd_cores[index])
        row[f"alone_{stage}_cpu_s_per_request"] = _per_request(single, server_cores(single)[index])
    row["dvd_llm_decode_batch"] = dvd.get("llm_decode_batch", float("nan"))
    row["alone_llm_decode_batch"] = closed[("llm-only", workload)].get("llm_decode_batch", float("nan"))
    return row


def _per_request(summary: dict[str, Any], cores: float) -> float:
    """CPU seconds per completed request; NaN where the CPU was not measured."""
    return float("nan") if math.isnan(cores) else _ratio(cores * summary["wall_s"], summary["completed"])


def server_cores(summary: dict[str, Any]) -> tuple[float, float]:
    """(vision servers', language or colocated server's) CPU cores busy over a run; NaN where unmeasured."""
    vision = [v for k, v in summary.items() if k.startswith("vision-") and k.endswith("_cpu_cores")]
    language = [v for k, v in summary.items() if k in ("language_cpu_cores", "colocated_cpu_cores", "vllm_cpu_cores")]
    return (sum(vision) if vision else float("nan"), sum(language) if language else float("nan"))


def ratios(closed: dict, workloads: list[str]) -> list[dict[str, Any]]:
    """DvD against each colocated setup, per workload: throughput ratios and TTFT p99 side by side."""
    rows = []
    for workload in workloads:
        dvd = closed[("dvd", workload)]
        for setup, label in (("colocated-a", "(a) same LLM threads"), ("colocated-b", "(b) equal total threads")):
            base = closed[(setup, workload)]
            rows.append({
                "workload": workload,
                "comparison": label,
                "dvd_req_s": dvd["request_throughput"],
                "colocated_req_s": base["request_throughput"],
                "errors": dvd["errors"] + base["errors"],
                "throughput_ratio": _ratio(dvd["request_throughput"], base["request_throughput"]),
                "steady_throughput_ratio": _ratio(dvd["steady_request_throughput"], base["steady_request_throughput"]),
                "dvd_ttft_p99_s": dvd["ttft_p99_s"],
                "colocated_ttft_p99_s": base["ttft_p99_s"],
                "ttft_p99_ratio": _ratio(dvd["ttft_p99_s"], base["ttft_p99_s"]),
                "dvd_ttft_p99_after_first_wave_s": dvd["ttft_p99_after_first_wave_s"],
                "colocated_ttft_p99_after_first_wave_s": base["ttft_p99_after_first_wave_s"],
            })
    return rows


# (DvD setup, plain vLLM setup, label, target of the whole-run req/s ratio or None)
VLLM_COMPARISONS = (
    ("dvd-vllm", "vllm-b", "DvD(vLLM) / vLLM, (b) equal total threads", 1.1),
    ("dvd-vllm", "vllm-a", "DvD(vLLM) / vLLM, (a) vision threads added", 1.6),
    ("dvd-vllm-vir", "vllm-b", "DvD(vLLM)+ViR / vLLM, (b) equal total threads", None),
    ("dvd-vllm-vir", "vllm-a", "DvD(vLLM)+ViR / vLLM, (a) vision threads added", None),
)


def vllm_ratios(closed: dict, workload: str) -> list[dict[str, Any]]:
    """DvD with vLLM's engine (and with ViR) against plain vLLM at both thread budgets, at one
    workload: req/s ratios over whole runs and in the steady state, TTFT p50/p99 side by side.
    Comparisons whose setups did not run are left out."""
    rows = []
    for dvd_setup, vllm_setup, label, target in VLLM_COMPARISONS:
        if (dvd_setup, workload) not in closed or (vllm_setup, workload) not in closed:
            continue
        dvd, base = closed[(dvd_setup, workload)], closed[(vllm_setup, workload)]
        rows.append({
            "workload": workload,
            "comparison": label,
            "dvd_setup": dvd_setup,
            "vllm_setup": vllm_setup,
            "target": target,
            "errors": dvd["errors"] + base["errors"],
            "dvd_req_s": dvd["request_throughput"],
            "vllm_req_s": base["request_throughput"],
            "throughput_ratio": _ratio(dvd["request_throughput"], base["request_throughput"]),
            "steady_dvd_req_s": dvd["steady_request_throughput"],
            "steady_vllm_req_s": base["steady_request_throughput"],
            "steady_throughput_ratio": _ratio(dvd["steady_request_throughput"], base["steady_request_throughput"]),
            "dvd_ttft_p50_s": dvd["ttft_p50_s"],
            "vllm_ttft_p50_s": base["ttft_p50_s"],
            "dvd_ttft_p99_s": dvd["ttft_p99_s"],
            "vllm_ttft_p99_s": base["ttft_p99_s"],
            "ttft_p99_ratio": _ratio(dvd["ttft_p99_s"], base["ttft_p99_s"]),
            "dvd_ttft_p99_after_first_wave_s": dvd["ttft_p99_after_first_wave_s"],
            "vllm_ttft_p99_after_first_wave_s": base["ttft_p99_after_first_wave_s"],
            "vir_compressed_fraction": dvd.get("vir_compressed_fraction", float("nan")),
        })
    return rows


def vllm_section(report: dict[str, Any]) -> str:
    """The Markdown section of the vLLM comparison, or why it did not run."""
    vllm = report.get("vllm") or {}
    title = f"## DvD(vLLM) vs plain vLLM (closed loop, {report['args']['rate_size']})\n\n"
    if not vllm.get("enabled"):
        return title + f"Not run: {vllm.get('reason', 'not requested')}.\n"
    table = markdown_table(
        report.get("vllm_ratios", []),
        [("comparison", "comparison"), ("target", "target"), ("errors", "errors"), ("dvd_req_s", "DvD req/s"),
         ("vllm_req_s", "vLLM req/s"), ("throughput_ratio", "DvD/vLLM"),
         ("steady_throughput_ratio", "steady state DvD/vLLM"),
         ("dvd_ttft_p50_s", "DvD TTFT p50"), ("vllm_ttft_p50_s", "vLLM TTFT p50"),
         ("dvd_ttft_p99_s", "DvD TTFT p99"), ("vllm_ttft_p99_s", "vLLM TTFT p99"),
         ("dvd_ttft_p99_after_first_wave_s", "DvD TTFT p99 after 1st wave"),
         ("vllm_ttft_p99_after_first_wave_s", "vLLM TTFT p99 after 1st wave"),
         ("vir_compressed_fraction", "tiles compressed by ViR")],
    )
    stopped = f"The phase stopped early: {vllm['error']}.\n\n" if vllm.get("error") else ""
    return (title + f"{vllm.get('setups', '')}\n\n{stopped}{table}\n\n"
            "Targets apply to the whole-run ratio. TTFT of plain vLLM is its first streamed content chunk; "
            "of DvD, its first streamed token.\n")


def _ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0 (a setup that completed nothing), so the report is still written."""
    return a / b if b else float("nan")


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: every run, the closed-loop ratios, fixed rates, efficiency, stage spans."""
    runs = markdown_table(
        report["runs"],
        [("setup", "setup"), ("workload", "images"), ("load", "load"), ("runs", "runs"), ("completed", "ok"),
         ("errors", "errors"),
         ("request_throughput", "req/s"), ("steady_request_throughput", "steady req/s"),
         ("output_token_throughput", "out tok/s"), ("ttft_p50_s", "TTFT p50 s"),
         ("ttft_p99_s", "TTFT p99 s"), ("e2e_p50_s", "e2e p50 s"), ("e2e_p99_s", "e2e p99 s")],
    )
    ratio_table = markdown_table(
        report["ratios"],
        [("workload", "images"), ("comparison", "comparison"), ("errors", "errors"), ("dvd_req_s", "DvD req/s"),
         ("colocated_req_s", "colocated req/s"), ("throughput_ratio", "DvD/colocated"),
         ("steady_throughput_ratio", "steady state DvD/colocated"),
         ("dvd_ttft_p99_s", "DvD TTFT p99"), ("colocated_ttft_p99_s", "colocated TTFT p99"),
         ("dvd_ttft_p99_after_first_wave_s", "DvD TTFT p99 after 1st wave"),
         ("colocated_ttft_p99_after_first_wave_s", "colocated TTFT p99 after 1st wave")],
    )
    efficiency_table = markdown_table(
        report["efficiency"],
        [("workload", "images"), ("errors", "errors"), ("dvd_req_s", "DvD req/s"),
         ("vision_only_req_s", "vision-only req/s"),
         ("llm_only_req_s", "LLM-only req/s"), ("pipeline_efficiency", "efficiency"),
         ("steady_dvd_req_s", "steady DvD req/s"), ("steady_vision_only_req_s", "steady vision-only req/s"),
         ("steady_llm_only_req_s", "steady LLM-only req/s"), ("steady_pipeline_efficiency", "steady efficiency")],
    )
    stage_cpu = markdown_table(
        report["efficiency"],
        [("workload", "images"), ("dvd_vision_cpu_cores", "DvD vision server busy (cores)"),
         ("dvd_vision_cpu_s_per_request", "vision CPU s/request in DvD"),
         ("alone_vision_cpu_s_per_request", "vision-only"),
         ("dvd_language_cpu_cores", "DvD language server busy (cores)"),
         ("dvd_language_cpu_s_per_request", "LLM CPU s/request in DvD"),
         ("alone_language_cpu_s_per_request", "LLM-only"),
         ("dvd_llm_decode_batch", "LLM decode batch in DvD"), ("alone_llm_decode_batch", "LLM-only")],
    )
    cpu = markdown_table(
        [{"setup": run["setup"], "workload": run["workload"], "load": run["load"],
          **dict(zip(("vision", "language"), server_cores(run))),
          "decode_batch": run.get("llm_decode_batch", float("nan"))} for run in report["runs"]],
        [("setup", "setup"), ("workload", "images"), ("load", "load"), ("vision", "vision server(s)"),
         ("language", "language or colocated server"), ("decode_batch", "LLM decode batch")],
    )
    fixed_rate = markdown_table(
        _rate_rows(report["runs"]),
        [("load", "load"), ("rate_fraction", "of capacity"), ("errors", "errors"), ("dvd_ttft_p50_s", "DvD TTFT p50"),
         ("dvd_ttft_p99_s", "DvD TTFT p99"), ("colocated-b_ttft_p50_s", "(b) TTFT p50"),
         ("colocated-b_ttft_p99_s", "(b) TTFT p99"), ("colocated-a_ttft_p99_s", "(a) TTFT p99"),
         ("dvd_e2e_p99_s", "DvD e2e p99"), ("colocated-b_e2e_p99_s", "(b) e2e p99")],
    )
    stages = markdown_table(
        [run for run in report["runs"] if run["workload"] == report["args"]["rate_size"]
         and run["setup"] != "vision-only"],
        [("setup", "setup"), ("load", "load"), ("ttft_mean_s", "TTFT (client)"),
         *((f"{span}_mean_s", span.replace("_", " ")) for span in SPANS)],
    )
    counts = sorted({run["requests"] // run["runs"] for run in report["runs"]})
    sample_note = (f"Percentiles are over every completed request of a run ({', '.join(map(str, counts))} per run; "
                   "errors counts the failed ones, which the percentiles leave out): with fewer than 100 "
                   "requests, p99 is close to the slowest one.")
    return (f"## Runs\n\n{runs}\n\n{sample_note}\n\n## DvD vs colocated (closed loop)\n\n{ratio_table}\n\n"
            f"{vllm_section(report)}\n"
            f"## Fixed arrival rate (capacity = mean of DvD's and (b)'s closed-loop req/s)\n\n{fixed_rate}\n\n"
            f"## Pipeline efficiency\n\n{efficiency_table}\n\n"
            "Each stage's CPU in DvD's closed loop and alone (CPU seconds of every thread of a server "
            "process): busy cores = CPU seconds / wall seconds; with one thread per server, the slower "
            "stage's figure is how much of the run the pipeline kept it at work. CPU seconds per request "
            "higher in DvD than alone mean the stage ran slower beside the other one (shared caches, "
            "memory bandwidth, or a slow spell between the runs) or, for the LLM, with fewer sequences per "
            "step: the decode batch is the mean number of sequences sampled per engine step, and in a "
            "closed loop the requests still at DvD's vision stage are missing from it, while each step "
            f"pays for the whole LM head whatever its batch.\n\n{stage_cpu}\n\n"
            "## CPU cores busy per server process during each run, and the LLM's decode batch\n\n"
            f"{cpu}\n\n"
            f"## Where the time goes at {report['args']['rate_size']} (mean seconds per request, server-side "
            f"spans)\n\n{stages}\n")


def _rate_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per fixed-rate load, with every setup's latency figures side by side."""
    rows: dict[float, dict[str, Any]] = {}
    for run in runs:
        if "rate_fraction" not in run:
            continue
        row = rows.setdefault(run["rate_fraction"],
                              {"load": run["load"], "rate_fraction": run["rate_fraction"], "errors": 0})
        row["errors"] += run["errors"]
        for key in ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s"):
            row[f"{run['setup']}_{key}"] = run[key]
    return list(rows.values())


def plot(path: Path, closed: dict, workloads: list[str]) -> None:
    series = {
        setup: [closed[(setup, workload)]["request_throughput"] for workload in workloads]
        for setup in ("dvd", "colocated-a", "colocated-b")
    }
    bar_plot(path, "Request throughput, closed loop", workloads, series, "requests / s")

