"""vision_server.vir: checkpoint key layout, the routing decision, and the router against the released forward order."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from pipeline.model.checkpoint import open_checkpoint
from pipeline.wire import JobStatus, VisionJob
from tests.conftest import photo_bytes
from tests.vision_server.conftest import vision_config
from tests.vision_server.vir_reference import ReleasedFlash
from vision_server.model import pixel_shuffle
from vision_server.vir import Thresholds, VirModules, compress_decisions
from vision_server.worker import VisionWorker


def spec_key_names() -> set[str]:
    """The Flash-only tensor names, written out from docs/vir.md."""
    names = {f"mlp2.{i}.{p}" for i in (0, 1, 4, 7) for p in ("weight", "bias")}
    names.add("pooling_before_gating.query_token")
    for i in range(1, 5):
        names |= {f"pooling_before_gating.attn{i}.{p}" for p in ("in_proj_weight", "in_proj_bias")}
        names |= {f"pooling_before_gating.attn{i}.out_proj.{p}" for p in ("weight", "bias")}
        names |= {f"pooling_before_gating.norm{i}.{p}" for p in ("weight", "bias")}
        names |= {f"gating.block{i}.{j}.{p}" for j in (0, 3, 5) for p in ("weight", "bias")}
    names |= {f"gating.gate.{j}.{p}" for j in (0, 1) for p in ("weight", "bias")}
    return names


def test_module_keys_are_the_original_checkpoint_names(flash_dir):
    modules = VirModules(vit_hidden=64, llm_hidden=64)
    ours = {name: tuple(t.shape) for name, t in modules.state_dict().items()}
    assert set(ours) == spec_key_names()
    with safe_open(flash_dir / "model.safetensors", framework="pt") as handle:
        stored = {n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys() if n in ours}
    assert stored == ours
    checkpoint = open_checkpoint(flash_dir)
    assert checkpoint.is_flash and set(checkpoint.part_names("vir")) == set(ours)


def test_mlp2_layout_and_compressed_shapes():
    modules = VirModules(vit_hidden=64, llm_hidden=32)
    kinds = [type(layer).__name__ for layer in modules.mlp2]
    assert kinds == ["LayerNorm", "Linear", "GELU", "Dropout", "Linear", "GELU", "Dropout", "Linear"]
    assert modules.mlp2[1].in_features == 16 * 64 and modules.mlp2[1].out_features == 2 * 32
    grid = torch.randn(3, 32, 32, 64)
    assert pixel_shuffle(grid, 0.25).shape == (3, 8, 8, 1024)
    assert pixel_shuffle(grid, 0.5).shape == (3, 16, 16, 256)


def test_decision_uses_the_quantile_strictly_and_the_absolute_floor():
    thresholds = Thresholds(relative=0.5, absolute=0.3)
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2])  # median 0.5
    assert compress_decisions(scores, thresholds) == [True, False, False, True, False]
    low = torch.tensor([0.25, 0.1, 0.2, 0.29, 0.05])  # above the median but under the absolute floor
    assert compress_decisions(low, thresholds) == [False] * 5
    assert compress_decisions(torch.tensor([0.8]), thresholds) == [False]  # a lone tile is its own quantile
    interpolated = torch.tensor([0.4, 0.6, 0.8, 1.0])  # torch.quantile at 0.5 interpolates to 0.7
    assert compress_decisions(interpolated, thresholds) == [False, False, True, True]
    assert compress_decisions(scores, Thresholds(relative=0.0, absolute=0.0)) == [True, False, True, True, True]


def test_router_scores_follow_the_released_forward_order(flash_worker, flash_dir, tiny_dirs):
    from tests.reference import Reference

    released = ReleasedFlash(Reference(tiny_dirs["hf"], torch.float32), flash_dir)
    job = VisionJob("j", "r", "image", photo_bytes("chelsea"), "x")
    prepared = flash_worker.prepare(job)
    grid = flash_worker.encoder.vit_grid(prepared.pixels)
    with torch.inference_mode():
        expected = released.gate_probabilities(grid)[:, 0]
        ours = flash_worker.router.scores(grid)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert ours.max() - ours.min() > 0.05  # the tiny router tells tiles apart

    # attn3 / attn4 are loaded but never used
    pooling = flash_worker.router.flash.pooling_before_gating
    saved = pooling.attn3.out_proj.weight.clone()
    with torch.no_grad():
        pooling.attn3.out_proj.weight.add_(1.0)
        pooling.attn4.out_proj.weight.add_(1.0)
        unchanged = flash_worker.router.scores(grid)
        pooling.attn4.out_proj.weight.sub_(1.0)
        pooling.attn3.out_proj.weight.copy_(saved)
    assert torch.equal(unchanged, ours)


def test_tiny_flash_router_compresses_about_half_of_photo_tiles(flash_worker):
    jobs = [VisionJob(n, "r", "image", photo_bytes(n), "x") for n in ("coffee", "chelsea", "rocket", "coins")]
    answers = flash_worker.encode(jobs)
    tiles = [t for header, _ in answers for t in header.tile_tokens]
    assert set(tiles) == {64, 256}
    assert 0.3 <= tiles.count(64) / len(tiles) <= 0.6
    for header, rows in answers:
        assert rows.shape[0] == sum(header.tile_tokens)


def test_modes_and_per_job_override(flash_worker):
    data = photo_bytes("coffee")
    modes = {mode: VisionJob(mode, "r", "image", data, "x", vir_mode=mode) for mode in ("router", "all_256", "all_64")}
    answers = dict(zip(modes, flash_worker.encode(list(modes.values()))))
    assert answers["all_256"][0].tile_tokens == (256,) * 7
    assert answers["all_64"][0].tile_tokens == (64,) * 7
    routed = answers["router"][0].tile_tokens
    assert set(routed) == {64, 256}
    # each routed tile's rows are exactly that tile's rows under the fixed modes
    rows = {mode: answers[mode][1] for mode in modes}
    start = {"router": 0, "all_256": 0, "all_64": 0}
    for tokens in routed:
        source = "all_64" if tokens == 64 else "all_256"
        tile = slice(start[source], start[source] + tokens)
        assert torch.equal(rows["router"][start["router"] : start["router"] + tokens], rows[source][tile])
        start["router"] += tokens
        start["all_64"] += 64
        start["all_256"] += 256


def test_configured_mode_applies_when_the_job_says_config(flash_dir):
    worker = VisionWorker(vision_config(**{"model.path": str(flash_dir), "vision.vir_mode": "all_64"}))
    try:
        (header, rows), = worker.encode([VisionJob("j", "r", "image", photo_bytes("astronaut"), "x")])
        assert header.tile_tokens == (64,) and rows.shape == (64, 64)
    finally:
        worker.close()


def test_non_flash_checkpoints_ignore_the_router_and_refuse_all_64(worker):
    data = photo_bytes("astronaut")
    jobs = [VisionJob("a", "r", "image", data, "x", vir_mode="router"), VisionJob("b", "r", "image", data, "x", vir_mode="all_64")]
    (routed, _), (refused, rows) = worker.encode(jobs)
    assert routed.tile_tokens == (256,)
    assert refused.status == JobStatus.INVALID_INPUT and "Flash" in refused.error_message and rows is None
    with pytest.raises(ValueError, match="all_64 needs a -Flash"):
        VisionWorker(vision_config(**{"vision.vir_mode": "all_64"}))
