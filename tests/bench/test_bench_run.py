"""`make bench` end to end, shrunk to the tiny model and a few requests: every setup and load
runs against real servers, and the report holds every figure the full run reports."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket

import pytest

from benchmarks import bench, report

SETUPS = ("dvd", "colocated-a", "colocated-b")


def free_port_base(span: int) -> int:
    """A base port with `span` free ports after it (the bench lays its setups' ports out in blocks)."""
    for _ in range(50):
        base = random.randrange(20000, 30000)
        sockets = []
        try:
            for port in range(base, base + span):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free port range")


def test_bench_runs_every_setup_and_writes_the_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    argv = ["--model", "tiny", "--sizes", "448px,896px", "--rate-size", "448px", "--requests", "4",
            "--other-size-requests", "3", "--concurrency", "3", "--max-num-seqs", "2",
            "--rate-requests", "2", "--unloaded-requests", "1",
            "--rate-fractions", "1.0", "--port-base", str(free_port_base(60))]
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
    setups = 3
    assert bench.PORT_BASE + setups * bench.PORTS_PER_SETUP <= low

