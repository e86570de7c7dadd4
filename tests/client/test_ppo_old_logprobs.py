"""PPO's old log-probs: the first epoch's ratio is exactly 1, with LoRA dropout on, with or without DP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import client.trainer as trainer_module
from client.dp_step import DPSettings
from client.trainer import LocalTrainer
from common.climb.records import load_records
from common.config import load_config
from common.modeling.loader import load_base_model
from common.modeling.policy import Policy


def _records(root: Path) -> None:
    folder = root / "chest_xray" / "toy"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, answer in enumerate(["Normal", "Opacity", "Opacity"]):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({
            "conversations": [{"from": "human", "value": "<image>\nFinding? Answer with one phrase from the following:\nNormal\nOpacity"},
                              {"from": "gpt", "value": answer}],
            "images": [f"chest_xray/toy/images/{i}.png"]}))
    (folder / "annotation_train.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_first_epoch_ratio_is_exactly_one_with_lora_dropout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dp: bool) -> None:
    """With dropout (and a non-zero B) the training pass differs from an eval-mode pass; the old log-probs of
    the first epoch are that training pass's own, so exp(logp - old) is 1 for every token,
    and later epochs divide by the same stored values."""
    torch.set_num_threads(1)
    _records(tmp_path / "data")
    cfg = load_config(overrides=[
        "privacy=off", "prompt.constrained=false", "lora.dropout=0.5", "lora.init_b_std=0.1", "train.ppo_epochs=2", "train.micro_batch=1",
        "rollout.num_rollouts=2", "rollout.batch_prompts=3", "rollout.max_new_tokens=6", "train.kl_coef=0.0",
        "model.device=cpu", "model.precision=fp32", f"model.cache_dir={tmp_path / 'cache'}",
    ])
    trainer = LocalTrainer(Policy(load_base_model(cfg.model), cfg.lora), cfg)
    records = trainer.usable(load_records(tmp_path / "data", "train"))
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = trainer_module.ppo_token_losses

    def spy(logp: torch.Tensor, old: torch.Tensor, ref: Any, adv: torch.Tensor, mask: torch.Tensor, **kw: Any) -> Any:
        seen.append((logp.detach().clone(), old.detach().clone(), mask.clone()))
        return real(logp, old, ref, adv, mask, **kw)

    monkeypatch.setattr(trainer_module, "ppo_token_losses", spy)
    settings = DPSettings(noise_multiplier=0.0, sample_rate=1.0, max_grad_norm=1.0, unit="record") if dp else None
    trainer.train(records, steps=1, seed=0, dp=settings)

    # 3 prompts, micro-batches of 1 prompt (2 rows), 2 epochs
    assert len(seen) == 6
    first, second = seen[:3], seen[3:]
    for logp, old, mask in first:
        ratio = torch.exp(logp - old)[mask > 0]
        assert ratio.numel() > 0 and torch.equal(ratio, torch.ones_like(ratio))
    for (logp0, _, mask), (_, old1, _) in zip(first, second, strict=True):
        assert torch.equal(old1[mask > 0], logp0[mask > 0])
