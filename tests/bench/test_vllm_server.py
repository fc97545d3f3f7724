"""Plain vLLM's launcher: its command line and environment, the KV-cache size, and its start, health
wait and stop, on a stand-in HTTP server (starting vLLM itself takes minutes)."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.vllm_server import VllmServer, VllmStartError, group_alive, kv_cache_gib
from tests.conftest import free_ports

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads Linux /proc")


def test_argv_and_environment_carry_the_engine_settings(tmp_path) -> None:
    server = VllmServer(model=tmp_path / "hf", port=26100, name="vllm-b", cpus=(0, 1), dtype="float32",
                        max_model_len=8192, max_num_seqs=8, max_num_batched_tokens=2048, kv_cache_gib=2,
                        preload=("/lib/libtcmalloc.so",))
    argv = server.argv()
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options["--model"] == str(tmp_path / "hf") and options["--served-model-name"] == "vllm-b"
    assert (options["--port"], options["--max-num-seqs"], options["--max-num-batched-tokens"]) == ("26100", "8", "2048")
    assert (options["--dtype"], options["--max-model-len"]) == ("float32", "8192")
    env = server.environment({"PATH": "/bin", "LD_PRELOAD": "/lib/other.so"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1" and env["PATH"] == "/bin"
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc.so:/lib/other.so"
    assert VllmServer(model=tmp_path, port=1).environment({})["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


@pytest.mark.parametrize(("config", "tokens", "dtype", "gib"), [
    # the bench's small model: 4 layers x 2 KV heads x 64 x K and V x 4 bytes = 4 KiB a token
    ({"text_config": {"num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64,
                      "hidden_size": 384}}, 2064 * 16, "float32", 1),
    ({"text_config": {"num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64,
                      "hidden_size": 384}}, 262145, "float32", 2),
    # original format, no head_dim: hidden / heads; 36 x 8 x 128 x 2 x 2 bytes = 144 KiB a token
    ({"llm_config": {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "hidden_size": 4096}}, 8 * 4128, "bfloat16", 5),
])
def test_kv_cache_gib_holds_the_tokens(tmp_path, config, tokens, dtype, gib) -> None:
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    assert kv_cache_gib(tmp_path, tokens, dtype) == gib


# Answers /health and /v1/models like vLLM's server, after starting a child that stands in for
# vLLM's engine process (same process group) and ignores SIGTERM.
STAND_IN = textwrap.dedent("""
    import http.server, json, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE)
    child.stdout.readline()
    name, port = sys.argv[1], int(sys.argv[2])
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"" if self.path == "/health" else json.dumps({"data": [{"id": name}]}).encode()
            self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
            self.end_headers()
            self.wfile.write(body)
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")


class StandIn(VllmServer):
    script: str = STAND_IN

    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.script, self.name, str(self.port)]


def test_start_waits_for_health_and_stop_ends_the_whole_process_group(tmp_path) -> None:
    server = StandIn(model=tmp_path, port=free_ports(1)[0], name="vllm-a", log_path=tmp_path / "logs" / "vllm.log")
    server.start(timeout_s=60)
    try:
        assert server.alive and len(server.pids()) == 2  # the server and its engine stand-in
        group = server.process.pid
    finally:
        server.stop(timeout_s=1)
    assert server.process.returncode is not None and not group_alive(group)  # the stand-in ignored SIGTERM and was killed
    assert server.log_path.exists()


def test_a_server_that_exits_during_start_up_raises_with_its_log(tmp_path) -> None:
    server = StandIn(model=tmp_path, port=free_ports(1)[0], log_path=tmp_path / "vllm.log")
    server.script = "import sys; print('no model here', flush=True); sys.exit(3)"
    with pytest.raises(VllmStartError, match="exited with status 3 during start-up\nno model here"):
        server.start(timeout_s=60)
    assert not server.alive


def test_start_times_out_and_stops_a_server_that_never_answers(tmp_path) -> None:
    server = StandIn(model=tmp_path, port=free_ports(1)[0])
    server.script = "import time; time.sleep(600)"  # a server that never binds its port
    with pytest.raises(VllmStartError, match="/health did not answer within 1 s"):
        server.start(timeout_s=1)
    assert not server.alive


def test_start_refuses_a_port_in_use_and_another_server_answering(tmp_path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(VllmStartError, match="is in use"):
            VllmServer(model=tmp_path, port=held.getsockname()[1]).start(timeout_s=5)
    server = StandIn(model=tmp_path, port=free_ports(1)[0], name="theirs", stop_timeout_s=1)
    server.script = STAND_IN.replace("name, port = sys.argv[1]", "name, port = 'someone-else'")
    with pytest.raises(VllmStartError, match="another server answers"):
        server.start(timeout_s=60)
    assert not server.alive


def test_stop_without_start_does_nothing(tmp_path) -> None:
    VllmServer(model=Path(tmp_path), port=1).stop()
