"""Checkpoint formats, split loading, and agreement with transformers' own modules."""

from __future__ import annotations

import json

import pytest
import torch

from language_server.engine.sequence import check_image_rows, image_positions
from language_server.model import LanguageModel
from pipeline.model.checkpoint import CheckpointError, open_checkpoint, open_model
from pipeline.model.checkpoint_names import hf_to_original
from vision_server.model import VisionEncoder, pixel_shuffle


def test_formats_are_detected(tiny_dirs):
    assert open_checkpoint(tiny_dirs["hf"]).format == "hf"
    assert open_checkpoint(tiny_dirs["original"]).format == "original"
    with pytest.raises(CheckpointError, match="configured format 'original'"):
        open_checkpoint(tiny_dirs["hf"], "original")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="neither HF-native"):
        open_checkpoint(tmp_path)


def test_tiny_model_is_shaped_like_internvl3_5(tiny_dirs):
    checkpoint = open_model("tiny")
    assert checkpoint.llm_architecture == "Qwen3ForCausalLM"
    assert checkpoint.tokens_per_tile == 256 and checkpoint.image_size == 448
    assert checkpoint.downsample_ratio == 0.5
    assert checkpoint.internvl_config.image_token_id == 151667


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_each_side_reads_exactly_its_own_tensors(tiny_dirs, fmt):
    checkpoint = open_checkpoint(tiny_dirs[fmt])
    names = set(checkpoint.tensor_names)
    _, vision_read = VisionEncoder.from_checkpoint(checkpoint, "cpu", torch.float32)
    _, llm_read = LanguageModel.from_checkpoint(checkpoint, "cpu", torch.float32)
    vision_prefixes = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "vision_model.", "mlp1.")
    llm_prefixes = ("language_model.", "model.language_model.", "lm_head.")
    assert set(vision_read) == {n for n in names if n.startswith(vision_prefixes)}
    assert set(llm_read) == {n for n in names if n.startswith(llm_prefixes)}
    assert set(vision_read).isdisjoint(llm_read)
    assert set(vision_read) | set(llm_read) == names


def test_encoder_equals_transformers_get_image_features(tiny_dirs):
    from transformers import InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration.from_pretrained(tiny_dirs["hf"], dtype=torch.float32).eval()
    pixels = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=pixels).pooler_output
    for fmt in ("hf", "original"):
        encoder, _ = VisionEncoder.from_checkpoint(open_checkpoint(tiny_dirs[fmt]), "cpu", torch.float32)
        assert torch.equal(encoder(pixels), expected), fmt


def test_language_model_equals_transformers(tiny_dirs):
    from transformers import InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration.from_pretrained(tiny_dirs["hf"], dtype=torch.float32).eval()
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        for fmt in ("hf", "original"):
            model, _ = LanguageModel.from_checkpoint(open_checkpoint(tiny_dirs[fmt]), "cpu", torch.float32)
            assert torch.equal(model.causal_lm(input_ids=ids).logits, expected), fmt


def test_pixel_shuffle_equals_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    grid = torch.randn(2, 32, 32, 8)
    for scale in (0.5, 0.25):
        assert torch.equal(pixel_shuffle(grid, scale), InternVLModel.pixel_shuffle(None, grid, scale))


def test_original_names_round_trip(tiny_dirs):
    """hf_to_original then the original-format loader gives back the HF tensors."""
    hf = open_checkpoint(tiny_dirs["hf"])
    original = open_checkpoint(tiny_dirs["original"])
    for part in ("vision", "projector", "llm"):
        a, b = hf.read_part(part).tensors, original.read_part(part).tensors
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    fused = hf_to_original({"model.vision_tower.encoder.layer.0.attention.q_proj.weight": torch.zeros(2, 2),
                            "model.vision_tower.encoder.layer.0.attention.k_proj.weight": torch.ones(2, 2),
                            "model.vision_tower.encoder.layer.0.attention.v_proj.weight": torch.full((2, 2), 2.0)})
    qkv = fused["vision_model.encoder.layers.0.attn.qkv.weight"]
    assert qkv.shape == (6, 2) and qkv[:, 0].tolist() == [0, 0, 1, 1, 2, 2]


def _embed(model: LanguageModel, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Token embeddings with `rows` written into the image placeholders' positions, in order, as
    the engine places them (and checks them: one row per placeholder)."""
    positions = image_positions(ids.tolist(), model.image_token_id)
    check_image_rows(positions, rows)
    embeds = model.causal_lm.get_input_embeddings()(ids)
    embeds[positions] = rows.to(embeds.dtype)
    return embeds


def test_embedding_rows_land_on_image_placeholders(tiny_dirs):
    model, _ = LanguageModel.from_checkpoint(open_checkpoint(tiny_dirs["hf"]), "cpu", torch.float32)
    ids = torch.tensor([1, 151667, 151667, 2, 151667])
    rows = torch.arange(3 * model.hidden_size, dtype=torch.float32).reshape(3, -1)
    embeds = _embed(model, ids, rows)
    assert torch.equal(embeds[[1, 2, 4]], rows)
    assert torch.equal(embeds[0], model.causal_lm.get_input_embeddings().weight[1])
    with pytest.raises(ValueError, match="3 image placeholder tokens but 2 feature rows"):
        _embed(model, ids, rows[:2])
