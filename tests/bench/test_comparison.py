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


def vllm_summary(req_s: float, steady: float, p50: float, p99: float, **extra: float) -> dict:
    return {**summary(req_s, steady, ttft_p99=p99, after_first_wave=p99 / 2), "ttft_p50_s": p50, **extra}


VLLM_CLOSED = {
    ("dvd-vllm", "896px"): vllm_summary(1.8, 2.0, 0.5, 2.0),
    ("dvd-vllm-vir", "896px"): vllm_summary(2.4, 3.0, 0.4, 1.5, vir_compressed_fraction=0.4),
    ("vllm-b", "896px"): vllm_summary(1.5, 1.6, 0.6, 4.0),
    ("vllm-a", "896px"): vllm_summary(1.0, 1.0, 1.0, 5.0),
}


def test_vllm_ratios_put_dvd_with_vllms_engine_over_plain_vllm_at_both_budgets() -> None:
    rows = comparison.vllm_ratios(VLLM_CLOSED, "896px")
    assert [(r["dvd_setup"], r["vllm_setup"], r["target"]) for r in rows] == [
        ("dvd-vllm", "vllm-b", 1.1), ("dvd-vllm", "vllm-a", 1.6), ("dvd-vllm-vir", "vllm-b", None),
        ("dvd-vllm-vir", "vllm-a", None)]
    equal, added, vir_equal, vir_added = rows
    assert math.isclose(equal["throughput_ratio"], 1.8 / 1.5) and equal["steady_throughput_ratio"] == 2.0 / 1.6
    assert added["throughput_ratio"] == 1.8 and added["steady_throughput_ratio"] == 2.0
    assert math.isclose(vir_equal["throughput_ratio"], 1.6) and vir_added["steady_throughput_ratio"] == 3.0
    assert (equal["dvd_ttft_p50_s"], equal["vllm_ttft_p50_s"], equal["dvd_ttft_p99_s"], equal["vllm_ttft_p99_s"]) == (
        0.5, 0.6, 2.0, 4.0)
    assert equal["ttft_p99_ratio"] == 0.5 and vir_added["vir_compressed_fraction"] == 0.4
    assert math.isnan(equal["vir_compressed_fraction"])


def test_vllm_ratios_leave_out_setups_that_did_not_run() -> None:
    closed = {key: value for key, value in VLLM_CLOSED.items() if key[0] != "dvd-vllm-vir"}
    assert [r["dvd_setup"] for r in comparison.vllm_ratios(closed, "896px")] == ["dvd-vllm", "dvd-vllm"]
    assert comparison.vllm_ratios(closed, "448px") == []


def report(**vllm) -> dict:
    closed = {**CLOSED, **VLLM_CLOSED}
    runs = [{"setup": setup, "workload": workload, "load": "closed-12", "runs": 1, "requests": 12,
             **{k: 1.0 for k in ("ttft_p50_s", "e2e_p50_s", "e2e_p99_s", "output_token_throughput", "ttft_mean_s")},
             **value} for (setup, workload), value in closed.items()]
    return {"args": {"rate_size": "896px"}, "runs": runs, "ratios": comparison.ratios(closed, ["896px"]),
            "efficiency": [comparison.efficiency(closed, "896px")], "vllm": vllm,
            "vllm_ratios": comparison.vllm_ratios(closed, "896px") if vllm.get("enabled") else []}


def test_the_markdown_report_has_the_vllm_rows_or_why_they_did_not_run() -> None:
    text = comparison.markdown(report(enabled=True, reason=None, setups="vllm-b: plain vLLM on cpus [0, 1]"))
    section = text.split("## DvD(vLLM) vs plain vLLM (closed loop, 896px)")[1].split("\n## ")[0]
    assert "vllm-b: plain vLLM on cpus [0, 1]" in section
    rows = [line for line in section.splitlines() if line.startswith("| DvD(vLLM)")]
    assert len(rows) == 4
    assert rows[0].startswith("| DvD(vLLM) / vLLM, (b) equal total threads | 1.1 | 0 | 1.8 | 1.5 | 1.2 | 1.25 |")
    assert rows[3].startswith("| DvD(vLLM)+ViR / vLLM, (a) vision threads added |  | 0 | 2.4 | 1 | 2.4 | 3 |")
    assert rows[3].endswith("| 0.4 |")
    assert "## DvD vs colocated (closed loop)" in text  # the existing figures stay
    skipped = comparison.markdown(report(enabled=False, reason="--no-vllm"))
    assert "## DvD(vLLM) vs plain vLLM (closed loop, 896px)\n\nNot run: --no-vllm.\n" in skipped


def test_plain_vllms_cpu_counts_as_the_language_side() -> None:
    vision, language = comparison.server_cores({"vllm_cpu_cores": 1.5})
    assert math.isnan(vision) and language == 1.5


def test_a_vllm_phase_that_stopped_early_says_so_above_what_it_measured() -> None:
    text = comparison.markdown(report(enabled=True, reason=None, setups="", error="VllmStartError: vllm-a: exited"))
    assert "The phase stopped early: VllmStartError: vllm-a: exited.\n\n| comparison |" in text
