"""The reference pass (adapter disabled) must not change which tensors train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.climb.inputs import RecordVisuals
from common.climb.records import parse_record
from common.config import load_config
from common.modeling.loader import load_base_model
from common.modeling.policy import Policy
from common.modeling.prompts import encode_prompt


def test_reference_pass_keeps_lora_a_frozen_in_ffa(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = load_config(overrides=[f"model.cache_dir={tmp_path}"])
    bundle = load_base_model(cfg.model)
    policy = Policy(bundle, cfg.lora, freeze_a=True)
    before = [n for n, p in policy.peft.named_parameters() if p.requires_grad]
    assert before and all("lora_B" in n for n in before)
    record = parse_record(
        {"conversations": [{"from": "human", "value": "<image>\nWhich? Answer with one phrase from the following:\nA\nB"},
                           {"from": "gpt", "value": "A"}], "images": ["x.png"]},
        root=tmp_path, file="m/d/annotation_train.jsonl", line=1, split="train")
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    prompt = encode_prompt(bundle, record, RecordVisuals([image], [1], 0), cfg.prompt)
    rollouts = policy.generate([prompt], num_rollouts=2, temperature=1.0, max_new_tokens=8, seed=0)
    policy.token_logprobs(rollouts, [0, 1], temperature=1.0, adapter=False)
    after = [n for n, p in policy.peft.named_parameters() if p.requires_grad]
    assert after == before  # PEFT's disable_adapter() would otherwise re-enable lora_A
    assert [id(p) for p in policy.trainable_parameters()] == [id(p) for n, p in policy.peft.named_parameters() if n in before]
