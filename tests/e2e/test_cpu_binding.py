"""`vision.cpus` / `language.cpus`: each server process, every thread of it, runs on its own CPUs
only and still serves; CPUs the process may not use stop start-up with a message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.client import DvDClient, message
from pipeline.entrypoints.launch import Deployment, LaunchError
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import TINY_CONFIG, port_overrides

ALLOWED = sorted(os.sched_getaffinity(0))


def _allowed_cpus_of_every_thread(pid: int) -> set[str]:
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.add(line.split(":", 1)[1].strip())
    return lists


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs to give each server its own")
@pytest.mark.parametrize("mode", ["decoupled", "colocated"])
def test_each_server_runs_on_its_cpus_only(tmp_path, tiny_dirs, mode):
    vision_cpu, language_cpu = ALLOWED[0], ALLOWED[1]
    overrides = {**port_overrides(), "mode": mode, "language.cpus": [language_cpu]}
    if mode == "decoupled":
        overrides["vision.cpus"] = [vision_cpu]
    with Deployment(TINY_CONFIG, overrides, log_dir=tmp_path) as deployment:
        expected = [str(vision_cpu), str(language_cpu)] if mode == "decoupled" else [str(language_cpu)]
        pids = [server.process.pid for server in deployment.servers]
        assert [_allowed_cpus_of_every_thread(pid) for pid in pids] == [{cpu} for cpu in expected]
        with DvDClient(deployment.address) as client:
            answer = client.generate([message("user", "Hello")], pb.SamplingParameters(max_new_tokens=4, temperature=0))
        assert answer.usage.completion_tokens == 4


def test_cpus_the_process_may_not_use_stop_start_up(tmp_path, tiny_dirs):
    absent = max(ALLOWED) + 1
    overrides = {**port_overrides(), "language.cpus": [absent]}
    deployment = Deployment(TINY_CONFIG, overrides, log_dir=tmp_path)
    with pytest.raises(LaunchError) as failure:
        deployment.start(timeout_s=180)
    assert "(exit status 2)" in str(failure.value)
    assert f"cpus [{absent}]: this process may use only CPUs {ALLOWED}" in str(failure.value)
    assert all(not server.alive for server in deployment.servers)
