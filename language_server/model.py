"""The language half of InternVL: the causal LM alone, with image features as input rows."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from pipeline.model.checkpoint import Checkpoint, CheckpointError, materialize


class LanguageModel(nn.Module):
    """A Hugging Face causal LM plus the InternVL image-token id."""

    def __init__(self, causal_lm: nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.image_token_id = image_token_id

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def device(self) -> torch.device:
        return self.causal_lm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.causal_lm.lm_head.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.causal_lm.config.hidden_size

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, device: str | torch.device, dtype: torch.dtype
    ) -> tuple[LanguageModel, list[str]]:
        """Load only the LLM tensors; returns the model and the names read."""
        text_config = checkpoint.text_config
        text_config._attn_implementation = "sdpa" if _supports_sdpa(text_config) else "eager"  # the engine replaces it
        part = checkpoint.read_part("llm")
        tied = "lm_head.weight" not in part.tensors
        if tied and not getattr(text_config, "tie_word_embeddings", False):
            raise CheckpointError(f"{checkpoint.path}: no lm_head weight and embeddings are not tied")
        lm = materialize(
            lambda: AutoModelForCausalLM.from_config(text_config),
            part.tensors,
            device,
            dtype,
            allow_missing=("lm_head.weight",) if tied else (),
        )
        if tied:
            lm.lm_head.weight = lm.get_input_embeddings().weight
        image_token_id = checkpoint.internvl_config.image_token_id
        return cls(lm, image_token_id), sorted(part.source_names)


def _supports_sdpa(text_config) -> bool:  # noqa: ANN001 - any transformers text config
    """Whether transformers builds this LLM class with SDPA attention (GPT-OSS, for one, refuses it)."""
    model_class = AutoModelForCausalLM._model_mapping.get(type(text_config), None)
    return bool(getattr(model_class, "_supports_sdpa", False))
