"""The bench report's arithmetic and tables, on closed-loop summaries with known numbers."""

from __future__ import annotations

import math

from benchmarks import comparison


def summary(req_s: float, steady_req_s: float, ttft_p99: float = 1.0, after_first_wave: float = 0.5,
            errors: int = 0, **cpu_cores: float) -> dict:
    return {
        "wall_s": 10.0,
        "completed": round(req_s * 10),
        **{f"{server.replace('_', '-')}_cpu_cores": cores for server, cores in cpu_cores.items()},
        "errors": errors,
        "request_throughput": req_s,
        "steady_request_throughput": steady_req_s,
        "ttft_p99_s": ttft_p99,
        "ttft_p99_after_first_wave_s": after_first_wave,
    }


CLOSED = {
    ("dvd", "896px"): {**summary(1.5, 1.6, ttft_p99=3.0, after_first_wave=2.0, vision_0=0.6, language=0.9),
                       "llm_decode_batch": 6.5},
    ("colocated-a", "896px"): summary(0.75, 0.8, ttft_p99=6.0),
    ("colocated-b", "896px"): summary(1.2, 2.0, ttft_p99=4.0, after_first_wave=2.5),
    ("vision-only", "896px"): summary(2.0, 2.0, vision_0=1.0, language=0.01),
    ("llm-only", "896px"): {**summary(1.6, 3.2, language=1.0), "llm_decode_batch": 7.5},
}


def test_ratios_put_dvd_over_each_colocated_setup() -> None:
    a, b = comparison.ratios(CLOSED, ["896px"])
    assert a["comparison"].startswith("(a)") and b["comparison"].startswith("(b)")
    assert a["throughput_ratio"] == 2.0 and a["steady_throughput_ratio"] == 2.0
    assert b["throughput_ratio"] == 1.25 and b["steady_throughput_ratio"] == 0.8
    assert b["ttft_p99_ratio"] == 0.75
    assert (b["dvd_ttft_p99_after_first_wave_s"], b["colocated_ttft_p99_after_first_wave_s"]) == (2.0, 2.5)


def test_efficiency_divides_by_the_slower_stage_of_each_kind() -> None:
    row = comparison.efficiency(CLOSED, "896px")
    assert row["pipeline_efficiency"] == 1.5 / 1.6  # the LLM is the slower stage over whole runs
    assert row["steady_pipeline_efficiency"] == 1.6 / 2.0  # and vision in the steady state


def test_efficiency_splits_into_busy_cores_and_cpu_per_request() -> None:
    row = comparison.efficiency(CLOSED, "896px")
    assert (row["dvd_vision_cpu_cores"], row["dvd_language_cpu_cores"]) == (0.6, 0.9)
    # 10 s runs: DvD completed 15 requests, vision-only 20, LLM-only 16
    assert math.isclose(row["dvd_language_cpu_s_per_request"], 0.9 * 10 / 15)
    assert math.isclose(row["alone_language_cpu_s_per_request"], 1.0 * 10 / 16)
    assert math.isclose(row["dvd_vision_cpu_s_per_request"], 0.6 * 10 / 15)
    assert math.isclose(row["alone_vision_cpu_s_per_request"], 1.0 * 10 / 20)
    assert (row["dvd_llm_decode_batch"], row["alone_llm_decode_batch"]) == (6.5, 7.5)
    unmeasured = {key: {k: v for k, v in s.items() if not k.endswith(("_cpu_cores", "_decode_batch"))}
                  for key, s in CLOSED.items()}
    row = comparison.efficiency(unmeasured, "896px")
    assert math.isnan(row["dvd_language_cpu_cores"]) and math.isnan(row["alone_vision_cpu_s_per_request"])
    assert math.isnan(row["dvd_llm_decode_batch"])


def test_markdown_pairs_fixed_rate_runs_by_their_fraction() -> None:
    runs = [
        {"setup": setup, "workload": "896px", "load": f"rate-{rate}", "rate_fraction": fraction, "runs": 1,
         "requests": 48, "errors": int(setup == "colocated-a"), "ttft_p50_s": p50, "ttft_p99_s": p99, "e2e_p99_s": 9.0}
        for fraction, rate in ((0.5, 0.7), (1.0, 1.4))
        for setup, p50, p99 in (("dvd", 1.25, 2.5 * fraction), ("colocated-b", 1.5, 3.5 * fraction),
                                ("colocated-a", 2.0, 7.5))
    ]
    report = {"runs": runs, "ratios": comparison.ratios(CLOSED, ["896px"]),
              "efficiency": [comparison.efficiency(CLOSED, "896px")], "args": {"rate_size": "896px"}}
    text = comparison.markdown(report)
    assert "| rate-0.7 | 0.5 | 1 | 1.25 | 1.25 | 1.5 | 1.75 | 7.5 | 9 | 9 |" in text
    assert "| rate-1.4 | 1 | 1 | 1.25 | 2.5 | 1.5 | 3.5 | 7.5 | 9 | 9 |" in text
    assert "| 896px | (b) equal total threads | 0 | 1.5 | 1.2 | 1.25 | 0.8 |" in text
    assert "(48 per run;" in text


def test_a_setup_that_completed_nothing_gives_nan_ratios_and_counts_its_errors() -> None:
    closed = {**CLOSED, ("colocated-b", "896px"): summary(0.0, float("nan"), errors=48),
              ("llm-only", "896px"): summary(0.0, 0.0, errors=48)}
    _, b = comparison.ratios(closed, ["896px"])
    assert math.isnan(b["throughput_ratio"]) and b["errors"] == 48
    row = comparison.efficiency(closed, "896px")
    assert math.isnan(row["pipeline_efficiency"]) and row["errors"] == 48
