"""One-sequence-at-a-time execution on a Hugging Face cache (the walking-skeleton runner)."""

from __future__ import annotations

import torch

from language_server.engine.sequence import Sequence
from language_server.model import LanguageModel


class SerialRunner:
    """Prefill and decode for one sequence, keeping its cache between steps."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self._caches: dict[str, object] = {}

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> torch.Tensor:
        ids = torch.tensor(seq.prompt_ids, dtype=torch.long)
        embeds = self.model.embed(ids, seq.image_rows).unsqueeze(0)
        out = self.model.causal_lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        self._caches[seq.request_id] = out.past_key_values
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, seq: Sequence) -> torch.Tensor:
        ids = torch.tensor([[seq.output_ids[-1]]], dtype=torch.long, device=self.model.device)
        out = self.model.causal_lm(
            input_ids=ids, past_key_values=self._caches[seq.request_id], use_cache=True, logits_to_keep=1
        )
        self._caches[seq.request_id] = out.past_key_values
        return out.logits[0, -1].float()

    def release(self, seq: Sequence) -> None:
        self._caches.pop(seq.request_id, None)

    @property
    def active(self) -> int:
        return len(self._caches)
