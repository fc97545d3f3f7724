"""A real vision server process, driven with raw VisionJobs: cross-request batching, per-job errors,
a full queue, the feature cache and the metrics."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
import torch

from pipeline.wire import JobStatus
from tests.conftest import TINY_CONFIG, free_ports, photo_bytes
from tests.vision_server.helpers import JobClient, start_vision_server
from tests.waiting import wait_until

GOOD = ("coffee", "chelsea", "rocket")
QUEUE_LIMIT = 4
BURSTS = 3


@pytest.fixture(scope="module")
def slow_batching_server(tmp_path_factory, tiny_dirs):
    """Batches wait up to 1.5 s for more tiles, at most 4 jobs may queue, no cache."""
    server, settings = start_vision_server(
        {
            "vision.dtype": "float32",
            "vision.max_wait_ms": 1500,
            "vision.max_queued_jobs": QUEUE_LIMIT,
            "vision.feature_cache_bytes": 0,
        },
        tmp_path_factory.mktemp("vision-alone"),
    )
    client = JobClient(f"127.0.0.1:{settings['vision.job_port']}")
    yield client, settings
    client.close()
    server.stop(15)


def test_jobs_of_different_requests_share_a_batch_and_a_bad_one_fails_alone(slow_batching_server):
    client, settings = slow_batching_server
    batch_counts = []
    for _ in range(BURSTS):  # a slow machine may preprocess one burst's jobs more than max_wait_ms apart
        before = _scrape(settings)
        burst = [client.job(photo_bytes(name)) for name in GOOD] + [client.job(b"\x89PNG\r\n\x1a\n broken png")]
        answers = client.run(*burst)
        for header, rows in answers[:3]:
            assert header.ok and rows.shape == (sum(header.tile_tokens), 64)
        bad, no_rows = answers[3]
        assert bad.status == JobStatus.INVALID_INPUT and "corrupt PNG" in bad.error_message and no_rows is None

        after = _scrape(settings)
        assert _delta(before, after, "dvd_vision_batch_jobs_sum") == 3
        batch_counts.append(_delta(before, after, "dvd_vision_batch_jobs_count"))
        if batch_counts[-1] < 3:
            break
    assert min(batch_counts) < 3, batch_counts  # some batch held jobs of several requests

    for name, (header, rows) in zip(GOOD, answers):
        ((alone, alone_rows),) = client.run(client.job(photo_bytes(name)))
        assert alone.tile_tokens == header.tile_tokens
        assert torch.equal(alone_rows, rows)  # float32: identical alone and in a mixed batch


def test_a_full_queue_answers_resource_exhausted_and_recovers(slow_batching_server):
    client, _ = slow_batching_server
    flood = [client.job(photo_bytes("coffee")) for _ in range(10)]
    statuses = [header.status for header, _ in client.run(*flood, timeout_s=120)]
    ok, exhausted = statuses.count(JobStatus.OK), statuses.count(JobStatus.RESOURCE_EXHAUSTED)
    assert ok + exhausted == len(flood)
    assert ok >= QUEUE_LIMIT and exhausted >= 1
    ((after, rows),) = client.run(client.job(photo_bytes("astronaut")))
    assert after.ok and rows.shape == (256, 64)


def test_metrics_cover_queue_batches_encode_time_and_bytes(slow_batching_server):
    _, settings = slow_batching_server
    scraped = _scrape(settings)
    for series in (
        "dvd_vision_queue_depth",
        "dvd_vision_batch_tiles_count",
        "dvd_vision_encode_ms_count",
        "dvd_vision_bytes_sent_total",
        "dvd_vision_cache_hits_total",
        "dvd_vision_cache_misses_total",
        "dvd_vision_vir_compression_ratio_count",
    ):
        assert series in scraped, series
    # every admitted job was answered (the gauge may trail the last answer by a moment)
    assert wait_until(lambda: _scrape(settings)["dvd_vision_queue_depth"] == 0, 10.0)
    assert scraped["dvd_vision_bytes_sent_total"] > 0
    assert scraped['dvd_vision_jobs_total{status="resource_exhausted"}'] >= 1


def test_a_transport_that_cannot_send_stops_start_up_with_a_clear_message(tiny_dirs):
    job_port, grpc_port = free_ports(2)
    argv = [sys.executable, "-m", "vision_server", "--config", str(TINY_CONFIG), "--set=vision.metrics_port=0"]
    argv += [f"--set=vision.job_port={job_port}", f"--set=vision.grpc_port={grpc_port}"]
    argv += ["--set=transport.backend=nixl", "--set=transport.rdma_plugin=NO_SUCH_PLUGIN"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "transport: cannot create a 'nixl' feature sender" in done.stderr


def test_the_feature_cache_answers_a_repeated_image(fp32_deployment):
    vc = fp32_deployment.config.vision
    client = JobClient(f"{vc.host}:{vc.job_port}")
    try:
        before = _scrape({"vision.metrics_port": vc.metrics_port})
        data = _unique_png()
        ((first, rows),) = client.run(client.job(data))
        ((second, cached_rows),) = client.run(client.job(data))
        ((other, _),) = client.run(client.job(data, max_tiles=4))  # other tiling: not the cached entry
    finally:
        client.close()
    after = _scrape({"vision.metrics_port": vc.metrics_port})
    assert second.cached_tiles == len(second.tile_tokens) == len(first.tile_tokens)
    assert first.cached_tiles == 0 and other.cached_tiles == 0
    assert torch.equal(cached_rows, rows)
    assert _delta(before, after, "dvd_vision_cache_hits_total") >= 1
    assert _delta(before, after, "dvd_vision_tiles_total") == len(first.tile_tokens) + len(other.tile_tokens)


def _unique_png() -> bytes:
    """An image no other test sends (so the cache cannot already hold it): 900x600 noise, 7 tiles."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(20260).integers(0, 256, (600, 900, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _scrape(settings: dict) -> dict[str, float]:
    url = f"http://127.0.0.1:{settings['vision.metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and not line.startswith("#")}


def _delta(before: dict[str, float], after: dict[str, float], series: str) -> float:
    return after.get(series, 0.0) - before.get(series, 0.0)
