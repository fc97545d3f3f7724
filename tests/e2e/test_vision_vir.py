"""ViR through the real servers equals the released InternVL3.5-Flash algorithm, and per-job modes work.

The oracle (tests/vision_server/vir_reference.py) builds the full 256-per-tile prompt, routes
the tiles with the released forward order and deletes positions 64..255 of each compressed
tile's block, in one process. DvD instead sends only the kept rows and emits that many
<IMG_CONTEXT>; greedy tokens must be identical.
"""

from __future__ import annotations

import urllib.request

import pytest
import torch
from safetensors import safe_open

from pipeline.model.checkpoint_names import hf_to_original
from pipeline.client import sampling
from pipeline.model.tiny_model import tiny_model_dir
from tests.conftest import photo_bytes
from tests.reference import Reference, img, text, to_messages
from tests.vision_server.helpers import JobClient
from tests.vision_server.vir_reference import ReleasedFlash

MAX_NEW_TOKENS = 12
CASES = {
    "single_image": [{"role": "user", "content": [img(photo_bytes("coffee")), text("What is in this image?")]}],
    "two_images": [
        {"role": "user", "content": [img(photo_bytes("chelsea")), img(photo_bytes("rocket")), text("Compare them.")]}
    ],
}


@pytest.fixture(scope="module")
def flash_deployment(start_deployment, tiny_dirs):
    return start_deployment(
        {"model.path": str(tiny_model_dir("flash")), "vision.dtype": "float32", "language.dtype": "float32"},
        name="flash",
    )


@pytest.fixture(scope="module")
def released(tiny_dirs) -> ReleasedFlash:
    return ReleasedFlash(Reference(tiny_dirs["hf"], torch.float32), tiny_model_dir("flash"))


@pytest.fixture(scope="module")
def job_client(flash_deployment):
    vc = flash_deployment.config.vision
    client = JobClient(f"{vc.host}:{vc.job_port}")
    yield client
    client.close()


def test_the_flash_checkpoint_is_the_tiny_model_plus_the_router(released):
    """The oracle runs transformers' model from the HF directory; the Flash checkpoint must hold the same weights."""
    shared = hf_to_original(released.model.state_dict())
    with safe_open(tiny_model_dir("flash") / "model.safetensors", framework="pt") as flash:
        names = set(flash.keys())
        assert set(shared) <= names
        assert all(torch.equal(flash.get_tensor(n), shared[n]) for n in shared)
    assert {n.split(".")[0] for n in names - set(shared)} == {"mlp2", "pooling_before_gating", "gating"}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_the_released_flash_algorithm(case, flash_deployment, client_for, released):
    """The released algorithm as is: for several images the quantile pools every tile of the request."""
    conversation = CASES[case]
    expected, prompt_tokens, flags = released.generate(conversation, MAX_NEW_TOKENS)
    assert 0 < sum(flags) < len(flags)  # the router kept some tiles and compressed others
    if case == "two_images":  # this case tells a per-request quantile from a per-image one
        assert released.generate(conversation, 1, quantile_per_image=True)[2] != flags
    result = client_for(flash_deployment).generate(
        to_messages(conversation), sampling(max_new_tokens=MAX_NEW_TOKENS)
    )
    assert list(result.token_ids) == expected
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.image_tiles == len(flags)
    assert result.usage.image_tokens == sum(64 if f else 256 for f in flags)


def test_per_job_modes_send_only_the_kept_rows(job_client):
    data = photo_bytes("coffee")
    modes = ("all_256", "router", "all_64")
    answers = dict(zip(modes, job_client.run(*(job_client.job(data, vir_mode=m, max_tiles=12) for m in modes))))
    full, routed, small = (answers[m][0] for m in modes)
    assert full.tile_tokens == (256,) * 7 and small.tile_tokens == (64,) * 7
    assert set(routed.tile_tokens) == {64, 256}
    bytes_per_row = 64 * 4  # hidden 64, float32
    for header, rows in answers.values():
        assert header.ok and rows.shape == (sum(header.tile_tokens), 64)
        assert header.payload_bytes == sum(header.tile_tokens) * bytes_per_row
    assert small.payload_bytes < routed.payload_bytes < full.payload_bytes


def test_vir_metrics_are_exported(flash_deployment, job_client):
    job_client.run(job_client.job(photo_bytes("chelsea"), vir_mode="router"))
    vc = flash_deployment.config.vision
    with urllib.request.urlopen(f"http://{vc.host}:{vc.metrics_port}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    compressed = _value(scraped, 'dvd_vision_vir_tiles_total{tokens="64"}')
    kept = _value(scraped, 'dvd_vision_vir_tiles_total{tokens="256"}')
    assert compressed > 0 and kept > 0
    assert _value(scraped, "dvd_vision_vir_compression_ratio_count") >= 1
    assert _value(scraped, "dvd_vision_bytes_sent_total") > 0


def _value(scraped: str, series: str) -> float:
    return next(float(line.split()[-1]) for line in scraped.splitlines() if line.startswith(series))
