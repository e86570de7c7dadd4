"""From a CLIMB record to a chat prompt, and the tokens of each constrained answer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from common.climb.inputs import RecordVisuals
from common.climb.records import Record
from common.config import PromptConfig

__all__ = ["EncodedPrompt", "chat_messages", "encode_prompt", "collate_prompts", "answer_sequences"]

_PLACEHOLDER = re.compile(r"(<image>|<video>|<ecg>)")


@dataclass
class EncodedPrompt:
    """One tokenised prompt with its processed images (no padding)."""

    record_id: str
    input_ids: torch.Tensor  # [L] long
    pixel_values: torch.Tensor | None  # [patches, dim]
    image_grid_thw: torch.Tensor | None  # [images, 3]
    # Constrained decoding: the allowed answer continuations as token-id sequences.
    answer_sequences: list[list[int]] | None
    # Text that the response implicitly starts with (the constrained prefix).
    response_prefix: str = ""
    # (original width, height, model width, height) of the record's first image: the model
    # answers boxes in the resized frame, the record's bbox/mask are in the original one.
    box_frame: tuple[int, int, int, int] | None = None


def chat_messages(record: Record, visuals: RecordVisuals, cfg: PromptConfig, *, multimodal: bool) -> list[dict[str, Any]]:
    """System + user turn; image parts stand where the record's placeholders stand.

    ``visuals.per_placeholder[i]`` images replace the i-th <image>/<video> placeholder (a
    video becomes its sampled frames, as in QoQ-Med); ``visuals.leading`` images (ECG
    renderings) come before the question. A text-only model gets the text alone.
    """
    instruction = "" if cfg.constrained else cfg.format_instruction
    tail = f"\n\n{instruction}" if instruction else ""
    prompt = record.prompt.strip()
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    if not multimodal:
        text = _PLACEHOLDER.sub("", prompt).strip() + tail
        return [*system, {"role": "user", "content": text}]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(visuals.leading)]
    slot = 0
    for piece in _PLACEHOLDER.split(prompt):
        if _PLACEHOLDER.fullmatch(piece):
            n = visuals.per_placeholder[slot] if slot < len(visuals.per_placeholder) else 0
            content.extend({"type": "image"} for _ in range(n))
            slot += 1
        elif piece.strip():
            content.append({"type": "text", "text": piece.strip("\n")})
    if tail:
        content.append({"type": "text", "text": tail})
    return [*system, {"role": "user", "content": content}]


def answer_sequences(tokenizer: Any, options: tuple[str, ...], cfg: PromptConfig, eos_id: int) -> list[list[int]]:
    """Token ids of each allowed constrained answer: option + suffix + end-of-turn."""
    suffix = tokenizer(cfg.constrained_suffix, add_special_tokens=False).input_ids
    seqs = []
    for opt in options:
        ids = tokenizer(opt, add_special_tokens=False).input_ids
        seqs.append(list(ids) + list(suffix) + [eos_id])
    return seqs


def encode_prompt(bundle: Any, record: Record, visuals: RecordVisuals, cfg: PromptConfig) -> EncodedPrompt:
    """Tokenise one record's prompt (and process its images) for ``bundle``'s model."""
    tok = bundle.tokenizer
    images = visuals.images if bundle.multimodal else []
    messages = chat_messages(record, visuals, cfg, multimodal=bundle.multimodal)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = ""
    if cfg.constrained:
        if not record.options:
            raise ValueError(f"{record.id}: prompt.constrained=true needs a multiple-choice record (no options found)")
        prefix = cfg.constrained_prefix
        text += prefix
    pixel_values = grid = None
    if images:
        processed = bundle.image_processor(images=images, return_tensors="pt")
        pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
        merge = bundle.image_processor.merge_size**2
        counts = (grid.prod(-1) // merge).tolist()
        parts = text.split("<|image_pad|>")
        if len(parts) - 1 != len(counts):
            raise ValueError(f"{record.id}: {len(parts) - 1} image slots in the prompt but {len(counts)} images")
        text = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:], strict=True))
    box_frame = None
    if images and record.images and visuals.leading < len(images):
        first = visuals.leading  # ECG renderings come first; then the record's images
        _, gh, gw = (int(x) for x in grid[first].tolist())
        patch = int(bundle.image_processor.patch_size)
        ow, oh = images[first].size
        box_frame = (ow, oh, gw * patch, gh * patch)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    seqs = None
    if cfg.constrained:
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        eos = eos if isinstance(eos, int) and eos != tok.unk_token_id else tok.eos_token_id
        seqs = answer_sequences(tok, record.options, cfg, eos)
    return EncodedPrompt(record.id, ids, pixel_values, grid, seqs, prefix, box_frame)


def collate_prompts(prompts: list[EncodedPrompt], *, pad_id: int, image_token_id: int | None) -> dict[str, torch.Tensor]:
    """Left-pad prompts into one batch (rows in the given order)."""
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p.input_ids) :] = p.input_ids
        mask[i, length - len(p.input_ids) :] = 1
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    pix = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)
        batch["image_grid_thw"] = torch.cat([p.image_grid_thw for p in prompts if p.image_grid_thw is not None])
    if image_token_id is not None:
        batch["mm_token_type_ids"] = (ids == image_token_id).long()
    return batch
