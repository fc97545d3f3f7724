"""transformers' own InternVL implementation, driven the way its processor drives it: the oracle."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from pipeline.client import image, message
from proto.dvd.v1 import generate_pb2 as pb


class Reference:
    """InternVLForConditionalGeneration with the checkpoint's chat template and GotOcr2 tiling."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu") -> None:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        from pipeline.model.tiny_processors import build_image_processor

        self.model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = build_image_processor()

    def inputs(self, conversation: list[dict]) -> dict[str, torch.Tensor]:
        """input_ids (and pixel_values) for a conversation of {"role", "content": [parts]} turns,
        where parts are {"type": "text", "text": ...} or {"type": "image", "data": encoded bytes}."""
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        images = [
            Image.open(io.BytesIO(p["data"])).convert("RGB")
            for turn in conversation
            for p in turn["content"]
            if p["type"] == "image"
        ]
        pieces = text.split("<IMG_CONTEXT>")
        expanded = pieces[0]
        inputs: dict[str, torch.Tensor] = {}
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            inputs["pixel_values"] = processed["pixel_values"].to(self.model.dtype)
            for tiles, piece in zip(processed["num_patches"].tolist(), pieces[1:]):
                expanded += "<img>" + "<IMG_CONTEXT>" * (256 * tiles) + "</img>" + piece
        inputs["input_ids"] = self.tokenizer(expanded, return_tensors="pt")["input_ids"]
        return inputs

    @torch.inference_mode()
    def generate(self, conversation: list[dict], max_new_tokens: int) -> list[int]:
        inputs = self.inputs(conversation)
        placed = {k: v.to(self.model.device) for k, v in inputs.items()}
        out = self.model.generate(**placed, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    @torch.inference_mode()
    def prefill_logprobs(self, conversation: list[dict]) -> torch.Tensor:
        placed = {k: v.to(self.model.device) for k, v in self.inputs(conversation).items()}
        logits = self.model(**placed).logits[0, -1]
        return logits.float().log_softmax(-1).cpu()


def to_messages(conversation: list[dict]) -> list[pb.Message]:
    """The same conversation as dvd.v1 messages."""
    out = []
    for turn in conversation:
        parts = [p["text"] if p["type"] == "text" else image(p["data"]) for p in turn["content"]]
        out.append(message(turn["role"], *parts))
    return out


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def img(data: bytes) -> dict:
    return {"type": "image", "data": data}
