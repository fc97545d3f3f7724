"""vLLM's InternVL models as DvD's language server runs them: language model only, images as embeddings.

vLLM builds neither the vision tower nor the projector here (every modality's limit is 0), so the
only image input is `image_embeds`, one tensor of N rows per image. Where they differ from vLLM's
own classes:
- vLLM checks that all images' embeddings in a batch have the same shape. InternVL's images have
  as many rows as their tiles give (and ViR makes tiles differ), so two images of different sizes
  would fail that check inside the engine core and stop it. Here each image's rows are checked
  alone: 2-D, of the LLM's hidden size.
- Original checkpoints whose LLM carries InternLM2-style names (`attention.wqkv` ...) are renamed
  to the llama names of the model vLLM builds for them (pipeline/model/checkpoint_names.py).
- HF-format checkpoints get their transformers processor (which vLLM asks for several times per
  process, and which transformers builds by loading the tokenizer again each time) built once per
  process around the tokenizer vLLM has already loaded: the same processor, seconds sooner.
- -Flash checkpoints carry the Visual Resolution Router (`mlp2`, `pooling_before_gating`,
  `gating`), which vLLM's InternVL model does not know and would refuse at load time. DvD runs ViR
  in its vision servers, so these tensors are skipped like the rest of the vision side.
"""

from __future__ import annotations

from typing import Iterable

import torch
from transformers import AutoImageProcessor, InternVLProcessor
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
from vllm.config import ModelConfig
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1ImageEmbeddingInputs,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.model_executor.models.internvl import InternVLChatModel, InternVLImageEmbeddingInputs
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.transformers_utils.processor import (
    cached_video_processor_from_config,
    get_processor_kwargs_keys,
    get_processor_kwargs_type,
)

from pipeline.model.checkpoint_names import internlm_llm_names

VIR_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")


def _image_embeds(schema: type, kwargs: dict, hidden_size: int):  # noqa: ANN205 - vLLM's TensorSchema
    embeds = kwargs.pop("image_embeds", None)
    if embeds is None:
        return None
    items = list(embeds) if isinstance(embeds, (list, tuple)) or embeds.dim() == 3 else [embeds]
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor) or item.dim() != 2 or item.shape[1] != hidden_size:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"image_embeds[{i}] is {shape}; expected (rows, {hidden_size})")
    return schema(type="image_embeds", data=items, validate=False)


class LanguageOnlyInternVLChatModel(InternVLChatModel):
    """Original-format checkpoints (`InternVLChatModel`), -Flash included."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={**InternVLChatModel.hf_to_vllm_mapper.orig_to_new_prefix, **dict.fromkeys(VIR_PREFIXES)}
    )

    def _parse_and_validate_image_input(self, **kwargs: object):  # noqa: ANN202
        return _image_embeds(InternVLImageEmbeddingInputs, kwargs, self.config.text_config.hidden_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        rename = internlm_llm_names(self.config.text_config)
        return super().load_weights(pair for name, tensor in weights for pair in rename(name, tensor))


def _hf_processor(model_config: ModelConfig, tokenizer: object) -> InternVLProcessor:
    """What `InternVLProcessor.from_pretrained` builds, around vLLM's tokenizer, with the video
    processor vLLM's InternS1 info gives it (sized like the image processor)."""
    processor_dict, instantiation_kwargs = InternVLProcessor.get_processor_dict(model_config.model)
    image_processor = AutoImageProcessor.from_pretrained(model_config.model)
    video_processor = cached_video_processor_from_config(
        model_config, processor_cls=InternVLVideoProcessor, size=image_processor.size
    )
    parts = {"image_processor": image_processor, "tokenizer": tokenizer, "video_processor": video_processor}
    args = [parts[name] for name in InternVLProcessor.get_attributes()]
    return InternVLProcessor.from_args_and_dict(args, processor_dict, **instantiation_kwargs)


class LanguageOnlyInternS1Info(InternS1ProcessingInfo):
    """vLLM's InternS1 processing info, with the transformers processor built once per process."""

    _processors: dict[str, InternVLProcessor] = {}  # model path -> processor, for this process

    def get_hf_processor(self, **kwargs: object) -> InternVLProcessor:
        model_config = self.ctx.model_config
        processor = self._processors.get(model_config.model)
        if processor is None:
            processor = self._processors[model_config.model] = _hf_processor(model_config, self.ctx.tokenizer)
        call_options = get_processor_kwargs_keys(get_processor_kwargs_type(processor))
        if any(key not in call_options for key in self.ctx.get_merged_mm_kwargs(kwargs)):
            return super().get_hf_processor(**kwargs)  # options that change how the processor is built
        return processor


@MULTIMODAL_REGISTRY.register_processor(
    InternS1MultiModalProcessor, info=LanguageOnlyInternS1Info, dummy_inputs=InternS1DummyInputsBuilder
)
class LanguageOnlyInternVLForConditionalGeneration(InternS1ForConditionalGeneration):
    """HF-format checkpoints (`InternVLForConditionalGeneration`)."""

    def _parse_and_validate_image_input(self, **kwargs: object):  # noqa: ANN202
        return _image_embeds(InternS1ImageEmbeddingInputs, kwargs, self.config.text_config.hidden_size)
