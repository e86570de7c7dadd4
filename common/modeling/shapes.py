"""Adapter tensor names and shapes without loading any weights (meta device).

The server needs them to build the deterministic initial adapter; for a 7B model this
takes seconds and no memory, since nothing is materialised.
"""

from __future__ import annotations

from typing import Any

import torch

from common.config import LoraSettings, ModelConfig

__all__ = ["model_folder", "adapter_shapes_for"]


def model_folder(cfg: ModelConfig) -> Any:
    """Where the base model's config lives (building/converting the cache if needed)."""
    from common.modeling import loader

    if cfg.source == "tiny":
        return loader._tiny_folder(cfg)  # noqa: SLF001 - same package family
    if cfg.source == "gguf":
        return loader._gguf_folder(cfg)  # noqa: SLF001
    return cfg.name_or_path


def adapter_shapes_for(model_cfg: ModelConfig, lora: LoraSettings) -> dict[str, tuple[int, ...]]:
    """PEFT state-dict key -> shape of every LoRA tensor for this model and LoRA setting."""
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from common.modeling.lora import peft_lora_config

    config = AutoConfig.from_pretrained(model_folder(model_cfg))
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
        peft_model = get_peft_model(model, peft_lora_config(lora))
    state = get_peft_model_state_dict(peft_model)
    return {k: tuple(v.shape) for k, v in sorted(state.items())}
