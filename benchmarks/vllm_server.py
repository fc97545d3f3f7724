"""Plain vLLM in its ordinary serving mode for `make bench`: its OpenAI-compatible HTTP server on
the bench model's HF-format checkpoint, started, health-checked and stopped as a child process group.

The engine settings that DvD with `language.engine: vllm` passes to the same engine are given
here too (dtype, max model length, batch limit, tokens per step, KV-cache GiB on a CPU), so that
plain vLLM and DvD(vLLM) differ only in where the vision encoder runs. Everything else is vLLM's
default. Nothing is downloaded (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.runtime.process import bind_process_tree

HEALTH_ATTEMPT_S = 2.0  # one /health request
POLL_S = 0.5  # between /health attempts, spent waiting on the process (which also notices its exit)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class VllmStartError(RuntimeError):
    """The vLLM server exited, or did not answer /health, during start-up."""


def vllm_import_error(timeout_s: float = 300.0) -> str | None:
    """None when `import vllm` works in this interpreter, else why not (one line). Tried in a
    child process, so that a failed or slow import leaves this one untouched."""
    try:
        done = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"`import vllm` did not finish within {timeout_s:g} s"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"`import vllm` exited with status {done.returncode}"


def kv_cache_gib(model_dir: Path, tokens: int, dtype: str) -> int:
    """Whole GiB of KV cache (VLLM_CPU_KVCACHE_SPACE takes an integer) that hold `tokens` tokens of
    the checkpoint's language model in `dtype`; at least 1."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config") or config.get("llm_config") or config
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    heads = text.get("num_key_value_heads") or text["num_attention_heads"]
    per_token = 2 * text["num_hidden_layers"] * heads * head_dim * DTYPE_BYTES[dtype]  # K and V
    return max(1, math.ceil(tokens * per_token / (1 << 30)))


@dataclass
class VllmServer:
    """One `python -m vllm.entrypoints.openai.api_server` process (and the engine processes it
    starts, all in a process group of their own), bound on a CPU host to `cpus`, one thread each."""

    model: Path
    port: int
    name: str = "vllm"  # served model name: the `model` field of requests
    cpus: tuple[int, ...] = ()  # VLLM_CPU_OMP_THREADS_BIND; () = vLLM's own choice
    dtype: str = "float32"
    max_model_len: int = 8192
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    kv_cache_gib: int = 1
    host: str = "127.0.0.1"
    log_path: Path | None = None
    preload: tuple[str, ...] = ()  # LD_PRELOAD libraries (tcmalloc, Intel OpenMP)
    stop_timeout_s: float = 30.0  # how long stop() waits after SIGTERM before SIGKILL
    process: subprocess.Popen | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model), "--served-model-name", self.name,
            "--host", self.host, "--port", str(self.port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs), "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--seed", "0", "--disable-uvicorn-access-log",
        ]  # fmt: skip

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, self.cpus)) if self.cpus else "auto"}
        if self.preload:
            env["LD_PRELOAD"] = ":".join([*self.preload, *filter(None, [env.get("LD_PRELOAD", "")])])
        return env

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 600.0) -> VllmServer:
        """Start the server and wait until /health answers 200 and /v1/models names it; on failure
        stop it and raise VllmStartError with its log's tail."""
        if self.process is not None:
            raise VllmStartError(f"{self.name}: already started")
        if not port_free(self.host, self.port):
            raise VllmStartError(f"{self.name}: port {self.port} is in use")
        output: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = output = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.argv(), env=self.environment(), stdin=subprocess.DEVNULL, stdout=output,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        if self.cpus:  # its API server and engine core as well as its workers' threads
            bind_process_tree(self.process.pid, self.cpus)
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if http_ok(f"{self.base_url}/health", HEALTH_ATTEMPT_S):
                if self.name not in served_models(self.base_url):
                    raise VllmStartError(f"{self.name}: another server answers at {self.base_url}")
                return
            try:
                code = self.process.wait(POLL_S)
            except subprocess.TimeoutExpired:
                continue
            raise VllmStartError(f"{self.name}: exited with status {code} during start-up\n{self.log_tail()}")
        raise VllmStartError(f"{self.name}: /health did not answer within {timeout_s:g} s\n{self.log_tail()}")

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM the server (it stops its engine processes), wait for its whole process group
        to end, and SIGKILL whatever of the group is left after `timeout_s` (default stop_timeout_s)."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if self.process is not None:
            group = self.process.pid  # start_new_session: the group's id is the server's pid
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + timeout_s
            while group_alive(group) and time.monotonic() < deadline:
                if self.process.poll() is None:
                    try:
                        self.process.wait(POLL_S)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(POLL_S)  # engine processes still exiting; the group is polled, not waited on
            if group_alive(group):
                os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout_s)
            deadline = time.monotonic() + timeout_s
            while group_alive(group) and time.monotonic() < deadline:  # killed processes take a moment to go
                time.sleep(0.05)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def pids(self) -> list[int]:
        """The server's process and every live process of its group (the engine core and workers)."""
        if self.process is None:
            return []
        return group_members(self.process.pid)

    def __enter__(self) -> VllmServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def served_models(base_url: str) -> set[str]:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=HEALTH_ATTEMPT_S * 5) as response:
            return {entry["id"] for entry in json.loads(response.read())["data"]}
    except (OSError, ValueError, KeyError):
        return set()


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # pgrp is field 5 of proc(5), state field 3
            members.append(int(entry.name))
    return members


def group_alive(group: int) -> bool:
    return bool(group_members(group))
