"""`keep_freed_memory`: a server process reuses the large blocks it frees instead of faulting
fresh pages in for each one (counted as minor page faults in a child process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

CHILD = """
import json, resource, sys
import torch
from pipeline.runtime.process import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
logits = torch.ones(8, 151675)
(logits - 1.0).sum()  # first use of the block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    (logits - 1.0).sum()  # a 4.8 MB temporary, freed at once
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def child(mode: str, env: dict[str, str] | None = None) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})}, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults() -> None:
    default, tuned = child("default"), child("tuned")
    assert tuned["applied"]
    # 50 temporaries of 1,185 pages each: glibc's default faults every one in afresh; kept in
    # the heap, a few blocks' worth are faulted in while it grows and then reused
    assert default["faults"] > 50 * 1000
    assert tuned["faults"] < 10 * 1185


def test_the_environment_s_own_malloc_settings_are_left_alone() -> None:
    assert not child("tuned", {"MALLOC_TRIM_THRESHOLD_": "131072"})["applied"]


def test_bind_process_tree_binds_every_thread_of_a_child_and_its_children():
    import os
    import subprocess
    import sys

    from pipeline.runtime.process import bind_process_tree

    allowed = sorted(os.sched_getaffinity(0))
    code = (
        "import subprocess, sys, threading\n"
        "threading.Thread(target=sys.stdin.read, daemon=True).start()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(parent.stdout.readline())
        assert bind_process_tree(parent.pid, (allowed[-1],)) >= 3  # two threads of the child, one of its child
        for pid in (parent.pid, grandchild):
            for thread in os.listdir(f"/proc/{pid}/task"):
                assert os.sched_getaffinity(int(thread)) == {allowed[-1]}
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)
