"""The bench's per-server CPU meter reads what the kernel accounts to a process."""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest

from benchmarks import server_cpu

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads Linux /proc")


def test_a_busy_process_is_charged_its_cpu_time_and_an_idle_one_is_not() -> None:
    # the busy child waits for a go, spins 0.6 s of CPU, says so, then waits to be told to exit
    busy = subprocess.Popen([sys.executable, "-c", "import sys, time\nsys.stdin.readline()\n"
                             "end = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
                             "print('spun', flush=True)\nsys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pids = {"busy": busy.pid, "idle": idle.pid}
    try:
        before = server_cpu.snapshot(pids)
        busy.stdin.write(b"go\n")
        busy.stdin.flush()
        ready, _, _ = select.select([busy.stdout], [], [], 60)
        assert ready and busy.stdout.readline() == b"spun\n"
        spent = server_cpu.spent(before, server_cpu.snapshot(pids))
        assert 0.5 <= spent["busy"] < 5  # clock ticks round the 0.6 s a little
        assert spent["idle"] < 0.2
    finally:
        for process in (busy, idle):
            process.stdin.close()
            process.wait(timeout=30)


def test_a_process_that_is_gone_is_left_out() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    assert server_cpu.process_cpu_s(process.pid) is None
    assert server_cpu.snapshot({"gone": process.pid}) == {}
    assert server_cpu.spent({"gone": 1.0}, {}) == {}


def test_a_servers_cpu_includes_its_child_processes() -> None:
    """vLLM's engine runs in a child of the server process (DvD's language server or plain vLLM's)."""
    child = ("import sys, time\nsys.stdin.readline()\nend = time.process_time() + 0.6\n"
             "while time.process_time() < end: pass\nprint('spun', flush=True)\nsys.stdin.read()")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys\n"
         f"child = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
         "print(child.pid, flush=True)\nchild.wait()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child_pid = int(parent.stdout.readline())
        assert server_cpu.descendants(parent.pid) == [child_pid]
        before = server_cpu.snapshot({"server": parent.pid})
        parent.stdin.write(b"go\n")  # the child shares the parent's stdin and stdout
        parent.stdin.flush()
        ready, _, _ = select.select([parent.stdout], [], [], 60)
        assert ready and parent.stdout.readline() == b"spun\n"
        spent = server_cpu.spent(before, server_cpu.snapshot({"server": parent.pid}))
        assert 0.5 <= spent["server"] < 5
        assert server_cpu.process_cpu_s(parent.pid) < 0.5 * spent["server"]  # the parent itself idled
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)
