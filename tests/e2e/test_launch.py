"""`make serve`'s launcher: both servers start, a working client command is printed, Ctrl-C leaves nothing
behind, a killed launcher takes its servers with it, and a server that fails to start says why."""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading

import grpc
import pytest

from proto.dvd.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import ROOT, TINY_CONFIG, port_overrides
from tests.waiting import wait_until

START_TIMEOUT_S = 180


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_until(lines: queue.Queue, marker: str) -> list[str]:
    seen = []
    while True:
        line = lines.get(timeout=START_TIMEOUT_S)
        assert line is not None, "launcher exited early:\n" + "".join(seen)
        seen.append(line)
        if marker in line:
            return seen


def _pid_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return admin_pb2_grpc.AdminStub(channel).GetServerInfo(admin_pb2.GetServerInfoRequest(), timeout=30).pid


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def _launch(overrides: dict) -> subprocess.Popen:
    settings = [f"--set={k}={v}" for k, v in overrides.items()]
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--config", str(TINY_CONFIG), *settings],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _server_pids(overrides: dict) -> list[int]:
    return [_pid_of(f"127.0.0.1:{overrides[key]}") for key in ("vision.grpc_port", "language.grpc_port")]


def test_serve_prints_a_working_client_command_and_ctrl_c_stops_everything():
    overrides = port_overrides()
    launcher = _launch(overrides)
    try:
        lines = _lines(launcher.stdout)
        output = _read_until(lines, "Ctrl-C stops both servers")
        command = next(line.strip() for line in output if " chat " in line)
        chat = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip(), "the client streamed no answer"

        pids = _server_pids(overrides)
        assert all(_running(pid) for pid in pids)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 0
        assert not any(_running(pid) for pid in pids)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)


def test_servers_go_when_their_launcher_is_killed():
    overrides = port_overrides()
    launcher = _launch(overrides)
    try:
        _read_until(_lines(launcher.stdout), "Ctrl-C stops both servers")
        pids = _server_pids(overrides)
        assert all(_running(pid) for pid in pids)
        launcher.kill()  # SIGKILL: the launcher cannot stop them itself
        launcher.wait(10)
        assert wait_until(lambda: not any(_running(pid) for pid in pids), timeout_s=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)


def test_a_server_that_fails_to_start_is_reported_with_its_exit_and_log(tmp_path):
    from pipeline.launch import Deployment, LaunchError

    deployment = Deployment(TINY_CONFIG, {**port_overrides(), "model.path": str(tmp_path / "absent")}, log_dir=tmp_path)
    with pytest.raises(LaunchError) as failure:
        deployment.start(timeout_s=START_TIMEOUT_S)
    message = str(failure.value)
    assert message.startswith("vision-0: ") and "(exit status 1)" in message
    assert "absent" in message  # the log tail says what was wrong
    assert all(not server.alive for server in deployment.servers)
