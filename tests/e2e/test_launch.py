"""`make serve`'s launcher: both servers start, a working client command is printed, Ctrl-C (also during
start-up) leaves nothing behind, a killed launcher takes its servers with it, a server that fails to start
says why, and a port answered by another process is not mistaken for a started server."""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

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


def _pid_of(address: str, api_key: str = "") -> int:
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    with grpc.insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        return stub.GetServerInfo(admin_pb2.GetServerInfoRequest(), timeout=30, metadata=metadata).pid


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped
        return False


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


@contextlib.contextmanager
def _launched(overrides: dict) -> Iterator[subprocess.Popen]:
    """`dvd serve` as a child process; killed on the way out if a test left it running."""
    settings = [f"--set={k}={v}" for k, v in overrides.items()]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--config", str(TINY_CONFIG), *settings],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)


def _server_pids(overrides: dict) -> list[int]:
    key = overrides.get("language.api_key", "")
    return [_pid_of(f"127.0.0.1:{overrides[k]}", key) for k in ("vision.grpc_port", "language.grpc_port")]


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().decode(errors="replace")


def test_serve_prints_a_working_client_command_and_ctrl_c_stops_everything():
    key = "s3cret-4c1f7e"
    overrides = {**port_overrides(), "language.api_key": key}
    with _launched(overrides) as launcher:
        lines = _lines(launcher.stdout)
        output = _read_until(lines, "Ctrl-C stops both servers")
        command = next(line.strip() for line in output if " chat " in line)
        # the printed command reads the key from $DVD_API_KEY: it is never printed, nor on a server's command line
        env = {**os.environ, "DVD_API_KEY": key}
        chat = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip(), "the client streamed no answer"
        servers = _descendants(launcher.pid)
        assert len(servers) >= 2 and not [pid for pid in servers if key in _cmdline(pid)]

        pids = _server_pids(overrides)
        assert set(pids) <= set(servers)
        assert all(_running(pid) for pid in pids)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 0
        assert not any(_running(pid) for pid in pids)
        output += iter(lambda: lines.get(timeout=30), None)
    assert output and key not in "".join(output)


def test_servers_go_when_their_launcher_is_killed():
    overrides = port_overrides()
    with _launched(overrides) as launcher:
        _read_until(_lines(launcher.stdout), "Ctrl-C stops both servers")
        pids = _server_pids(overrides)
        assert all(_running(pid) for pid in pids)
        launcher.kill()  # SIGKILL: the launcher cannot stop them itself
        launcher.wait(10)
        assert wait_until(lambda: not any(_running(pid) for pid in pids), timeout_s=60)


def test_a_server_that_fails_to_start_is_reported_with_its_exit_and_log(tmp_path):
    from pipeline.entrypoints.launch import Deployment, LaunchError

    deployment = Deployment(TINY_CONFIG, {**port_overrides(), "model.path": str(tmp_path / "absent")}, log_dir=tmp_path)
    with pytest.raises(LaunchError) as failure:
        deployment.start(timeout_s=START_TIMEOUT_S)
    message = str(failure.value)
    assert message.startswith("vision-0: ") and "(exit status 1)" in message
    assert "absent" in message  # the log tail says what was wrong
    assert all(not server.alive for server in deployment.servers)


def test_deployments_started_together_are_all_stopped_when_one_fails(tmp_path):
    from pipeline.entrypoints.launch import Deployment, LaunchError, start_together

    good = Deployment(TINY_CONFIG, port_overrides(), log_dir=tmp_path / "good")
    bad = Deployment(TINY_CONFIG, {**port_overrides(), "model.path": str(tmp_path / "absent")}, log_dir=tmp_path / "bad")
    with pytest.raises(LaunchError, match="absent"):
        start_together([good, bad], timeout_s=START_TIMEOUT_S)
    servers = good.servers + bad.servers
    assert all(server.process is not None and not server.alive for server in servers)


def test_ctrl_c_during_start_up_stops_the_servers():
    with _launched(port_overrides()) as launcher:
        _read_until(_lines(launcher.stdout), "dvd: starting")
        assert wait_until(lambda: len(_children(launcher.pid)) == 2, timeout_s=30)
        pids = _children(launcher.pid)
        launcher.send_signal(signal.SIGINT)  # the servers are still loading
        assert launcher.wait(timeout=60) == 130
        assert not any(_running(pid) for pid in pids)


def test_a_port_held_by_another_server_fails_start_up(tmp_path):
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from pipeline.entrypoints.launch import Deployment, LaunchError

    other = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, other)
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        overrides = {**port_overrides(), "language.grpc_port": port, "language.vision_servers": ["127.0.0.1:9"]}
        deployment = Deployment(TINY_CONFIG, overrides, log_dir=tmp_path)
        with pytest.raises(LaunchError) as failure:
            deployment.start(timeout_s=START_TIMEOUT_S)
        assert str(failure.value).startswith(f"language: 127.0.0.1:{port} is held by another process")
        assert all(not server.alive for server in deployment.servers)
    finally:
        other.stop(0)


def test_servers_start_only_from_the_main_thread():
    from pipeline.entrypoints.launch import LaunchError, ServerProcess

    server = ServerProcess("probe", [sys.executable, "-c", "pass"], "127.0.0.1:9")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.start(None)
        except LaunchError as exc:
            errors.append(exc)

    worker = threading.Thread(target=start)
    worker.start()
    worker.join(30)
    assert server.process is None
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_stop_sweeps_shm_segments_of_dead_servers():
    from pipeline.entrypoints.launch import Deployment
    from pipeline.transport.shm_segments import PREFIX, SHM_DIR

    stale = SHM_DIR / f"{PREFIX}{os.getpid()}-1-0"  # start time 1 tick: a process that no longer runs
    stale.write_bytes(b"")
    try:
        Deployment(TINY_CONFIG, port_overrides()).stop()
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


def test_a_vision_port_shared_through_so_reuseport_fails_start_up(tmp_path):
    """gRPC sets SO_REUSEPORT by default, which would let the vision server bind beside another."""
    from concurrent import futures

    from pipeline.entrypoints.launch import Deployment, LaunchError

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    other = grpc.server(futures.ThreadPoolExecutor(2))  # SO_REUSEPORT on, as gRPC's default
    servicer = health.HealthServicer()  # answers NOT_SERVING, so the launcher waits for the child
    health_pb2_grpc.add_HealthServicer_to_server(servicer, other)
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        deployment = Deployment(TINY_CONFIG, {**port_overrides(), "vision.grpc_port": port}, log_dir=tmp_path)
        with pytest.raises(LaunchError) as failure:
            deployment.start(timeout_s=START_TIMEOUT_S)
        assert str(failure.value).startswith("vision")
        assert "exited during start-up" in str(failure.value)
        assert f"bind to address 127.0.0.1:{port}" in str(failure.value)  # the log tail says why
        assert all(not server.alive for server in deployment.servers)
    finally:
        other.stop(0)


def test_starting_a_started_deployment_is_refused_and_leaves_it_serving(tmp_path):
    from pipeline.entrypoints.launch import Deployment, LaunchError

    with Deployment(TINY_CONFIG, port_overrides(), log_dir=tmp_path) as deployment:
        pids = [server.process.pid for server in deployment.servers]
        with pytest.raises(LaunchError, match="vision-0, language: already started"):
            deployment.start(timeout_s=START_TIMEOUT_S)
        assert [server.process.pid for server in deployment.servers] == pids
        assert all(_running(pid) for pid in pids)
        assert _pid_of(deployment.address) == pids[-1]
