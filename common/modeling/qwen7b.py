"""Qwen2.5-VL-7B-Instruct's published architecture, optionally narrowed and made shallower.

The ``qwen2_5_vl_7b`` preset loads the real weights (about 16 GB) from the hub or a local
folder. Where they cannot be had (CI, a laptop), this module builds a random-init model
folder with every setting of the published config (vocabulary, head counts, rotary
settings, vision patching and windowing, untied embeddings, special token ids) and only
the widths and depths reduced, so the preset's code path runs for real. With
``width_divisor=1`` and the published depths it is the full-size architecture (random
weights), which is what ``bench/gpu_smoke.py --model qwen7b`` measures on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["QWEN2_5_VL_7B_TEXT", "QWEN2_5_VL_7B_VISION", "QWEN2_5_VL_7B_TOKENS", "qwen7b_config", "build_qwen7b_folder"]

# Qwen/Qwen2.5-VL-7B-Instruct config.json (text part), as published.
QWEN2_5_VL_7B_TEXT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "mrope_section": [16, 24, 24],
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
# Its vision tower.
QWEN2_5_VL_7B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
    "tokens_per_second": 2,
}
# Its special token ids.
QWEN2_5_VL_7B_TOKENS = {"bos": 151643, "eos": 151645, "pad": 151643, "image": 151655, "video": 151656,
                        "vision_start": 151652, "vision_end": 151653}


def qwen7b_config(*, width_divisor: int = 1, layers: int = 28, vision_depth: int = 32, tokenizer: Any = None) -> Any:
    """A ``Qwen2_5_VLConfig`` with the 7B's settings; widths divided by ``width_divisor``.

    Head counts stay (so head sizes shrink), the rotary sections scale with the head size,
    the vision tower keeps a full-attention block every quarter of its depth (its width
    rounded down to a multiple of 64 so its heads stay rotary-compatible). With a
    ``tokenizer`` (a stand-in for Qwen's, which is not available offline) the special
    token ids are the tokenizer's; the vocabulary stays the 7B's 152,064 rows.
    """
    from transformers import Qwen2_5_VLConfig

    t, v = QWEN2_5_VL_7B_TEXT, QWEN2_5_VL_7B_VISION
    heads = t["num_attention_heads"]
    hidden = t["hidden_size"] // width_divisor
    head_dim = hidden // heads
    if hidden % heads or head_dim % 2:
        raise ValueError(f"width_divisor={width_divisor}: hidden size {hidden} must split into {heads} even-sized heads")
    scale = head_dim / (t["hidden_size"] // heads)
    mrope = [max(1, round(s * scale)) for s in t["mrope_section"]]
    mrope[-1] = head_dim // 2 - sum(mrope[:-1])
    # Vision rotary embeddings split each head in (h, w) halves of even size: round the
    # narrowed width down to a multiple of 4 x heads (1280 / 8 = 160 -> 128).
    step = 4 * v["num_heads"]
    v_hidden = max(step, v["hidden_size"] // width_divisor // step * step)
    quarter = max(vision_depth // 4, 1)
    full = sorted({min(i * quarter - 1, vision_depth - 1) for i in range(1, 5)} | {vision_depth - 1})
    if tokenizer is not None:
        tid = tokenizer.convert_tokens_to_ids
        ids = {"bos": tid("<|endoftext|>"), "eos": tid("<|im_end|>"), "pad": tid("<|endoftext|>"),
               "image": tid("<|image_pad|>"), "video": tid("<|video_pad|>"),
               "vision_start": tid("<|vision_start|>"), "vision_end": tid("<|vision_end|>")}
    else:
        ids = dict(QWEN2_5_VL_7B_TOKENS)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t["vocab_size"], hidden_size=hidden, intermediate_size=t["intermediate_size"] // width_divisor,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=t["num_key_value_heads"],
            max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=t["rms_norm_eps"],
            hidden_act=t["hidden_act"], tie_word_embeddings=t["tie_word_embeddings"],
            rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"], "mrope_section": mrope},
            bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=v_hidden, intermediate_size=v["intermediate_size"] // width_divisor,
            num_heads=v["num_heads"], out_hidden_size=hidden, patch_size=v["patch_size"],
            spatial_merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"],
            window_size=v["window_size"], fullatt_block_indexes=full, hidden_act=v["hidden_act"],
            tokens_per_second=v["tokens_per_second"],
        ),
        image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=t["tie_word_embeddings"],
    )


def build_qwen7b_folder(folder: str | Path, *, width_divisor: int = 1, layers: int = 28, vision_depth: int = 32,
                        seed: int = 0) -> Path:
    """Write a random-init model folder (safetensors + the offline stand-in tokenizer) that
    ``model=qwen2_5_vl_7b model.name_or_path=FOLDER`` loads."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from common.modeling.tokenizer import train_tiny_tokenizer

    folder = Path(folder)
    tok = train_tiny_tokenizer(4096)
    config = qwen7b_config(width_divisor=width_divisor, layers=layers, vision_depth=vision_depth, tokenizer=tok)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
