"""Import the ML stack once, under a lock, before several threads need it.

Flower's simulation engine loads the ServerApp (in a thread) and the ClientApp (in the
main thread) of the same process at the same time. transformers resolves its public
names lazily, and two threads resolving them at once can fail with
"cannot import name 'AutoModel' from 'transformers'". Both apps call :func:`preload`
when they are imported, so every name fedclimb uses is resolved exactly once.
"""

from __future__ import annotations

import threading

__all__ = ["preload"]

_LOCK = threading.Lock()
_DONE = False


def preload() -> None:
    """Resolve torch, transformers (the names fedclimb uses), peft and opacus."""
    global _DONE
    with _LOCK:
        if _DONE:
            return
        import torch  # noqa: F401
        import transformers
        from transformers.generation import logits_process  # noqa: F401
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil  # noqa: F401

        for name in (
            "AutoConfig",
            "AutoModel",
            "AutoModelForCausalLM",
            "AutoModelForImageTextToText",
            "AutoTokenizer",
            "PreTrainedTokenizerFast",
            "Qwen2_5_VLConfig",
            "Qwen2_5_VLForConditionalGeneration",
        ):
            getattr(transformers, name)
        import peft  # noqa: F401
        from peft import LoraConfig, PeftModel, get_peft_model  # noqa: F401
        import opacus  # noqa: F401

        _DONE = True
