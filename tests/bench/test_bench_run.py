"""`make bench` end to end, shrunk to the tiny model and a few requests: every setup and load
runs against real servers, and the report holds every figure the full run reports."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest

from benchmarks import bench, report, vllm_phase
from benchmarks.setups import PORT_BASE, PORTS_PER_SETUP, Setup
from benchmarks.workloads import Workload
from tests.conftest import free_ports

SETUPS = ("dvd", "colocated-a", "colocated-b")


def test_bench_runs_every_setup_and_writes_the_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    argv = ["--model", "tiny", "--sizes", "448px,896px", "--rate-size", "448px", "--requests", "4",
            "--other-size-requests", "3", "--concurrency", "3", "--max-num-seqs", "2",
            "--rate-requests", "2", "--unloaded-requests", "1",
            "--rate-fractions", "1.0", "--no-vllm", "--port-base", str(free_ports(60, consecutive=True)[0])]
    bind = len(os.sched_getaffinity(0)) >= 2
    argv += ["--bind-cpus"] if bind else []
    assert bench.main(argv) == 0

    (path,) = tmp_path.glob("bench-*.json")
    result = json.loads(path.read_text())
    assert path.with_suffix(".md").read_text().startswith("## Runs")
    assert path.with_suffix(".png").stat().st_size > 0

    loads = {(run["setup"], run["load"]) for run in result["runs"]}
    for setup in SETUPS:
        assert {(setup, "closed-3"), (setup, "closed-1")} <= loads
        assert any(s == setup and load.startswith("rate-") for s, load in loads)
    assert {("vision-only", "closed-3"), ("llm-only", "closed-3")} <= loads
    for run in result["runs"]:
        assert run["errors"] == 0 and run["completed"] == run["requests"], run
        assert run["request_throughput"] > 0
    closed_requests = {(run["workload"], run["requests"]) for run in result["runs"] if run["load"] == "closed-3"}
    assert closed_requests == {("448px", 4), ("896px", 3)}  # --requests at the rate size, fewer elsewhere
    assert {run["requests"] for run in result["runs"] if run["load"].startswith("rate-")} == {2}

    assert [row["comparison"][:3] for row in result["ratios"]] == ["(a)", "(b)"] * 2
    for row in result["ratios"]:
        assert math.isclose(row["throughput_ratio"], row["dvd_req_s"] / row["colocated_req_s"])
    assert [row["workload"] for row in result["efficiency"]] == ["448px", "896px"]
    for efficiency in result["efficiency"]:
        assert 0 < efficiency["pipeline_efficiency"] < math.inf
        # each DvD server did work during DvD's run, and no process can use more cores than exist
        assert 0 < efficiency["dvd_vision_cpu_cores"] <= os.cpu_count()
        assert 0 < efficiency["dvd_language_cpu_cores"] <= os.cpu_count()
        for key in ("dvd_vision", "alone_vision", "dvd_language", "alone_language"):
            assert 0 < efficiency[f"{key}_cpu_s_per_request"] < math.inf
        # three requests in flight and a batch limit of two: a sampling step holds one or two of them
        assert 1 <= efficiency["dvd_llm_decode_batch"] <= 2 and 1 <= efficiency["alone_llm_decode_batch"] <= 2
    cpu = {(run["setup"], run["workload"], run["load"]): run for run in result["runs"]}
    assert cpu[("llm-only", "448px", "closed-3")]["language_cpu_cores"] > 0
    assert cpu[("colocated-b", "448px", "closed-3")]["colocated_cpu_cores"] > 0
    assert "## CPU cores busy per server process" in path.with_suffix(".md").read_text()
    assert 1 <= cpu[("colocated-b", "448px", "closed-3")]["llm_decode_batch"] <= 2
    assert result["args"]["bind_cpus"] == bind and result["args"]["max_num_seqs"] == 2
    assert result["vllm"] == {"enabled": False, "reason": "--no-vllm"} and result["vllm_ratios"] == []
    assert "Not run: --no-vllm." in path.with_suffix(".md").read_text()


def test_bench_refuses_a_rate_size_it_does_not_run(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main(["--sizes", "448px", "--rate-size", "896px"])
    assert stop.value.code == 2
    assert "--rate-size 896px is not one of --sizes 448px" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--requests", "--other-size-requests", "--rate-requests"])
def test_bench_refuses_runs_without_requests(flag, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main([flag, "0"])
    assert stop.value.code == 2
    assert "--requests, --other-size-requests and --rate-requests must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--concurrency", "--max-num-seqs"])
def test_bench_refuses_an_empty_batch_or_loop(flag, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main([flag, "0"])
    assert stop.value.code == 2
    assert "--concurrency and --max-num-seqs must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("fractions", ["0", "0.5,-1", "fast"])
def test_bench_refuses_rate_fractions_that_are_not_positive(fractions, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main(["--rate-fractions", fractions])
    assert stop.value.code == 2
    assert "--rate-fractions must be numbers > 0" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "expected"), [(True, ((3,), (5, 7))), (False, ((), ()))])
def test_bench_binds_dvd_servers_to_disjoint_cpus(monkeypatch, flag, expected) -> None:
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {7, 3, 5})
    args = argparse.Namespace(vision_threads=1, llm_threads=2, bind_cpus=flag)
    assert bench._cpus(args, argparse.ArgumentParser()) == expected


def test_bench_refuses_binding_without_enough_cpus(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(SystemExit) as stop:
        bench.main(["--bind-cpus", "--sizes", "448px"])
    assert stop.value.code == 2
    assert "--bind-cpus needs 2 CPUs (vision + llm threads); this process may use 1" in capsys.readouterr().err


def test_default_ports_lie_below_the_ephemeral_range() -> None:
    """A fixed port inside the kernel's ephemeral range can be held by any outgoing connection
    (it once stopped `make bench` when the vision-only receiver bound one)."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    setups = 7  # dvd, colocated-a and -b, dvd-vllm, dvd-vllm-vir, vllm-b, vllm-a
    assert PORT_BASE + setups * PORTS_PER_SETUP <= low



def vllm_args(**changes) -> argparse.Namespace:
    defaults = dict(vllm=None, device="cpu", vision_device=None, vision_threads=1, llm_threads=1, model="small",
                    dtype="float32", kv_blocks=2064, max_num_seqs=8, vllm_kv_cache_gib=None, port_base=26000)
    return argparse.Namespace(**(defaults | changes))


def test_vllm_setups_are_skipped_with_a_reason(monkeypatch) -> None:
    monkeypatch.setattr(vllm_phase, "vllm_import_error", lambda: "ModuleNotFoundError: No module named 'vllm'")
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1})
    assert vllm_phase.skip_reason(vllm_args(vllm=False)) == "--no-vllm"
    assert "CPU runs" in vllm_phase.skip_reason(vllm_args(device="cuda:0"))
    assert "needs 3 CPUs" in vllm_phase.skip_reason(vllm_args(llm_threads=2))
    assert vllm_phase.skip_reason(vllm_args()) == "ModuleNotFoundError: No module named 'vllm'"
    monkeypatch.setattr(vllm_phase, "vllm_import_error", lambda: None)
    assert vllm_phase.skip_reason(vllm_args()) is None


def test_bench_refuses_vllm_it_cannot_run(monkeypatch, capsys) -> None:
    monkeypatch.setattr(vllm_phase, "vllm_import_error", lambda: "ModuleNotFoundError: No module named 'vllm'")
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(SystemExit) as stop:
        bench.main(["--vllm", "--sizes", "448px"])
    assert stop.value.code == 2
    assert "--vllm: ModuleNotFoundError" in capsys.readouterr().err


def test_vllm_plan_gives_each_setup_its_cpus_and_ports(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {4, 2, 6, 8})
    model = tmp_path / "hf"
    model.mkdir()
    model.joinpath("config.json").write_text(json.dumps({"text_config": {
        "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64,
        "hidden_size": 384}}))
    monkeypatch.setattr(vllm_phase, "bench_flash_model", lambda name, device: tmp_path / "flash")
    setups, servers, info = vllm_phase.plan(vllm_args(llm_threads=2), model)
    assert [s.name for s in setups] == ["dvd-vllm", "dvd-vllm-vir"]
    assert all(s.engine == "vllm" and s.vision_cpus == (2,) and s.llm_cpus == (4, 6) for s in setups)
    assert [s.flash for s in setups] == [False, True] and info["flash_model"] == str(tmp_path / "flash")
    assert [(s.name, s.cpus) for s in servers] == [("vllm-b", (2, 4, 6)), ("vllm-a", (4, 6))]
    # port blocks 5 and 6: after dvd, colocated-a, colocated-b, dvd-vllm and dvd-vllm-vir
    assert [s.port for s in servers] == [26000 + 5 * PORTS_PER_SETUP, 26000 + 6 * PORTS_PER_SETUP]
    assert all(s.max_num_seqs == 8 and s.kv_cache_gib == 1 and s.model == model for s in servers)
    assert info["kv_cache_gib"] == 1 and "vllm-a: plain vLLM on cpus [4, 6]" in info["setups"]

    monkeypatch.setattr(vllm_phase, "bench_flash_model", lambda name, device: None)
    setups, servers, info = vllm_phase.plan(vllm_args(vllm_kv_cache_gib=3), model)
    assert [s.name for s in setups] == ["dvd-vllm"] and "dvd-vllm-vir: not run" in info["setups"]
    assert [s.port for s in servers] == [26000 + 4 * PORTS_PER_SETUP, 26000 + 5 * PORTS_PER_SETUP]
    assert {s.kv_cache_gib for s in [*setups, *servers]} == {3}


def test_the_vllm_phase_runs_each_pair_side_by_side_with_two_engines_at_most(monkeypatch, tmp_path) -> None:
    events: list[str] = []
    up: set[str] = set()
    most = 0

    def started(name: str) -> None:
        nonlocal most
        events.append(f"start {name}")
        up.add(name)
        most = max(most, len(up))

    class FakeDeployment:
        def __init__(self, config, overrides, log_dir) -> None:
            self.name, self.overrides = log_dir.name, overrides

        def start(self, timeout_s):
            started(self.name)
            return self

        def stop(self) -> None:
            events.append(f"stop {self.name}")
            up.discard(self.name)

    def server_start(self, timeout_s):
        started(self.name)
        self.process = object()
        return self

    def server_stop(self, timeout_s=None) -> None:
        events.append(f"stop {self.name}")
        up.discard(self.name)

    monkeypatch.setattr(vllm_phase, "Deployment", FakeDeployment)
    monkeypatch.setattr(vllm_phase.VllmServer, "start", server_start)
    monkeypatch.setattr(vllm_phase.VllmServer, "stop", server_stop)
    monkeypatch.setattr(vllm_phase, "warm", lambda deployment, workload, count: None)
    monkeypatch.setattr(vllm_phase, "warm_vllm", lambda server, workload, count: None)
    monkeypatch.setattr(vllm_phase, "run_vllm", lambda server, *a: events.append(f"run {server.name}") or server.name)
    monkeypatch.setattr(vllm_phase, "run_metered", lambda d, *a, **k: events.append(f"run {d.name}") or d.name)
    setups = [Setup(name, "decoupled", 1, 1, engine="vllm", flash=name.endswith("vir"))
              for name in ("dvd-vllm", "dvd-vllm-vir")]
    servers = [vllm_phase.VllmServer(model=tmp_path, port=1, name=name) for name in ("vllm-b", "vllm-a")]
    args = argparse.Namespace(dtype="float32", vision_batch_tiles=1, kv_blocks=64, max_num_seqs=2, port_base=26000,
                              rounds=2, requests=4, concurrency=3)
    workload = Workload("896px", 896, (b"jpeg",), 8)
    results, error = vllm_phase.run_phase(args, workload=workload, model_path=tmp_path / "hf", setups=setups,
                                       servers=servers, info={"flash_model": "/flash"}, log_dir=tmp_path)
    assert error is None and most == 2 and not up
    assert {name: len(runs) for name, runs in results.items()} == {
        "dvd-vllm": 4, "vllm-b": 4, "vllm-a": 4, "dvd-vllm-vir": 4}
    assert [e for e in events if not e.startswith("run")] == [
        "start dvd-vllm", "start vllm-b", "stop vllm-b", "start vllm-a", "stop dvd-vllm", "start dvd-vllm-vir",
        "stop vllm-a", "start vllm-b", "stop dvd-vllm-vir", "stop vllm-b"]
    first_stage = events[2:6]
    assert first_stage == ["run dvd-vllm", "run vllm-b", "run dvd-vllm", "run vllm-b"]


def test_a_vllm_phase_that_fails_reports_why_and_stops_what_it_started(monkeypatch, tmp_path) -> None:
    stopped = []

    class FakeDeployment:
        def __init__(self, config, overrides, log_dir) -> None:
            self.name = log_dir.name

        def start(self, timeout_s):
            return self

        def stop(self) -> None:
            stopped.append(self.name)

    def server_start(self, timeout_s):
        raise vllm_phase.VllmStartError(f"{self.name}: exited with status 1 during start-up\nlog tail")

    monkeypatch.setattr(vllm_phase, "Deployment", FakeDeployment)
    monkeypatch.setattr(vllm_phase.VllmServer, "start", server_start)
    monkeypatch.setattr(vllm_phase, "warm", lambda deployment, workload, count: None)
    args = argparse.Namespace(dtype="float32", vision_batch_tiles=1, kv_blocks=64, max_num_seqs=2, port_base=26000,
                              rounds=1, requests=4, concurrency=3)
    results, error = vllm_phase.run_phase(
        args, workload=None, model_path=tmp_path, setups=[Setup("dvd-vllm", "decoupled", 1, 1, engine="vllm")],
        servers=[vllm_phase.VllmServer(model=tmp_path, port=1, name="vllm-b")], info={}, log_dir=tmp_path)
    assert error == "VllmStartError: vllm-b: exited with status 1 during start-up"
    assert stopped == ["dvd-vllm"] and not results
