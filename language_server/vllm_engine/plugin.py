"""DvD's vLLM plugin, loaded by every vLLM process (entry point `vllm.general_plugins`).

It lets vLLM open original-format checkpoints (`InternVLChatModel`) offline. transformers has no
config class for their `internvl_chat` model type: published checkpoints ship one as remote code,
which vLLM would run only with `trust_remote_code`, and checkpoints written without it (DvD's
generated ones) have none at all. The class registered here carries what vLLM's InternVL model
reads; the LLM's config is built by the same function the builtin engine uses.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from pipeline.model.checkpoint import llm_text_config

MODEL_TYPE = "internvl_chat"
MODEL_CLASSES = {
    "DvDInternVLChatModel": "language_server.vllm_engine.models:LanguageOnlyInternVLChatModel",
    "DvDInternVLForConditionalGeneration": "language_server.vllm_engine.models:LanguageOnlyInternVLForConditionalGeneration",
}


class InternVLChatConfig(PretrainedConfig):
    """An original InternVL checkpoint's config: `vision_config`, `llm_config` and the InternVL keys."""

    model_type = MODEL_TYPE

    def __init__(self, vision_config: dict | None = None, llm_config: dict | None = None, **kwargs) -> None:
        vision = vision_config.to_dict() if isinstance(vision_config, PretrainedConfig) else dict(vision_config or {})
        llm = llm_config.to_dict() if isinstance(llm_config, PretrainedConfig) else dict(llm_config or {})
        vision.setdefault("initializer_factor", 1.0)  # vLLM's InternViT reads it to initialise layer scales
        self.vision_config = PretrainedConfig(**vision)
        self.llm_config = llm_text_config(llm) if llm else PretrainedConfig()
        self.text_config = self.llm_config
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:  # noqa: ANN002, ANN003 - transformers' signature
        return self.llm_config

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.pop("text_config", None)
        data["vision_config"] = self.vision_config.to_dict()
        data["llm_config"] = self.llm_config.to_dict()
        return data


def register() -> None:
    """vLLM's plugin hook, once per process: make `internvl_chat` known to transformers, and DvD's
    language-only InternVL models (vllm_engine/models.py) known to vLLM."""
    from vllm import ModelRegistry


    try:
        AutoConfig.register(MODEL_TYPE, InternVLChatConfig)
    except ValueError:  # already registered in this process
        pass
    known = set(ModelRegistry.get_supported_archs())
    for architecture, where in MODEL_CLASSES.items():
        if architecture not in known:
            ModelRegistry.register_model(architecture, where)  # imported lazily, where it is used
