"""Identical rollouts of a prompt are scored once: the update equals the one over every row."""

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
from client.trainer import LocalTrainer, inverse_first, unique_rows
from common.climb.records import load_records
from common.config import load_config
from common.modeling.loader import load_base_model
from common.modeling.policy import Policy, Rollouts


def test_unique_rows_by_prompt_and_response_tokens() -> None:
    pad = 0
    responses = torch.tensor([[5, 6, 0], [5, 6, 9], [5, 6, 0], [7, 0, 0], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    # rows 0-2 belong to prompt 0, rows 3-4 to prompt 1; row 1 differs from row 0 only after its end
    rollouts = Rollouts([], torch.tensor([0, 0, 0, 1, 1]), responses.masked_fill(mask == 0, pad), mask, [""] * 5)
    unique, inverse = unique_rows(rollouts, [0, 1, 2, 3, 4])
    assert unique == [0, 3, 4]  # row 4 has prompt 0's tokens but is prompt 1's: distinct
    assert inverse.tolist() == [0, 0, 0, 1, 2]
    assert inverse_first(inverse).tolist() == [0, 3, 4]
    assert unique_rows(rollouts, [4, 3])[0] == [4, 3]


def _records(root: Path) -> None:
    folder = root / "chest_xray" / "toy"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, answer in enumerate(["Normal", "Opacity", "Opacity", "Normal"]):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({
            "conversations": [{"from": "human", "value": "<image>\nFinding? Answer with one phrase from the following:\nNormal\nOpacity"},
                              {"from": "gpt", "value": answer}],
            "images": [f"chest_xray/toy/images/{i}.png"]}))
    (folder / "annotation_train.jsonl").write_text("\n".join(lines) + "\n")


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradients it was asked to apply (Adam's first step divides by
    |g|, so compare gradients, not weights)."""

    seen: list[list[torch.Tensor]] = []

    def step(self, closure: Any = None) -> Any:
        _RecordingAdamW.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _one_step(tmp_path: Path, dp: bool, merge: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], int, int]:
    cfg = load_config(overrides=[
        "privacy=off", "prompt.constrained=true", "lora.init_b_std=0.1", "train.kl_coef=0.0", "train.ppo_epochs=1",
        "rollout.num_rollouts=8", "rollout.batch_prompts=4", "rollout.temperature=1.0", "train.micro_batch=2",
        "model.device=cpu", "model.precision=fp32", f"model.cache_dir={tmp_path / 'cache'}",
    ])
    trainer = LocalTrainer(Policy(load_base_model(cfg.model), cfg.lora), cfg)
    records = trainer.usable(load_records(tmp_path / "data", "train"))
    counts = [0, 0]
    real = trainer_module.unique_rows

    def spy(rollouts: Rollouts, rows: Any) -> Any:
        unique, inverse = real(rollouts, rows) if merge else (list(rows), torch.arange(len(rows)))
        counts[0] += len(rows)
        counts[1] += len(unique)
        return unique, inverse

    monkeypatch.setattr(trainer_module, "unique_rows", spy)
    monkeypatch.setattr(trainer_module.torch.optim, "AdamW", _RecordingAdamW)
    _RecordingAdamW.seen = []
    settings = DPSettings(noise_multiplier=0.0, sample_rate=1.0, max_grad_norm=0.05, unit="record") if dp else None
    trainer.train(records, steps=1, seed=3, dp=settings)
    (grads,) = _RecordingAdamW.seen
    return grads, counts[0], counts[1]


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_merged_update_equals_update_over_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dp: bool) -> None:
    torch.set_num_threads(1)
    _records(tmp_path / "data")
    merged, rows, scored = _one_step(tmp_path, dp, True, monkeypatch)
    full, rows_full, scored_full = _one_step(tmp_path, dp, False, monkeypatch)
    assert rows == rows_full == scored_full == 4 * 8  # 4 prompts x 8 rollouts
    assert scored <= 4 * 2  # at most one row per option and prompt was run
    assert sum(float(g.abs().sum()) for g in full) > 0
    for a, b in zip(merged, full, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)


def test_reference_logprobs_of_merged_rows_equal_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DRPO's damping and the KL penalty score the rollouts before the update with the policy and
    the reference: identical rows are scored once there too, with the same values."""
    torch.set_num_threads(1)
    _records(tmp_path / "data")
    cfg = load_config(overrides=[
        "privacy=off", "prompt.constrained=true", "lora.init_b_std=0.1", "train.kl_coef=0.1",
        "rollout.num_rollouts=8", "rollout.batch_prompts=4", "rollout.temperature=1.0",
        "model.device=cpu", "model.precision=fp32", f"model.cache_dir={tmp_path / 'cache'}",
    ])
    trainer = LocalTrainer(Policy(load_base_model(cfg.model), cfg.lora), cfg)
    records = trainer.usable(load_records(tmp_path / "data", "train"))
    trainer.policy.set_reference(trainer._start_adapter())
    rollouts = trainer.policy.generate([trainer.encode(r) for r in records], num_rollouts=8, temperature=1.0,
                                       max_new_tokens=8, seed=5)
    assert len(unique_rows(rollouts, list(range(rollouts.num_rows)))[0]) < rollouts.num_rows
    merged = trainer._reference_logprobs(rollouts, dp=False)
    monkeypatch.setattr(trainer_module, "unique_rows", lambda ro, rows: (list(rows), torch.arange(len(rows))))
    full = trainer._reference_logprobs(rollouts, dp=False)
    assert merged[1] is not None  # the reference's log-probs (the KL penalty needs them)
    for a, b in zip(merged, full, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape == rollouts.mask.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
