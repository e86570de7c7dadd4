"""The reference policy: the adapter the run started from; reference passes change nothing that trains."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import client.trainer as trainer_module
from client.trainer import LocalTrainer, start_adapter
from common.climb.inputs import RecordVisuals
from common.climb.records import load_records, parse_record
from common.config import load_config
from common.modeling.loader import load_base_model
from common.modeling.lora import adapter_shapes, init_adapter, save_peft_folder
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


# ---------------------------------------------------------------------------- start adapter


def _setup(tmp_path: Path, *overrides: str):
    torch.set_num_threads(1)
    cfg = load_config(overrides=[f"model.cache_dir={tmp_path / 'cache'}", "model.device=cpu", "model.precision=fp32",
                                 *overrides])
    bundle = load_base_model(cfg.model)
    return cfg, bundle, Policy(bundle, cfg.lora)


def _prompt(bundle, cfg, tmp_path: Path):
    record = parse_record(
        {"conversations": [{"from": "human", "value": "<image>\nWhich? Answer with one phrase from the following:\nA\nB"},
                           {"from": "gpt", "value": "A"}], "images": ["x.png"]},
        root=tmp_path, file="m/d/annotation_train.jsonl", line=1, split="train")
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    return encode_prompt(bundle, record, RecordVisuals([image], [1], 0), replace(cfg.prompt, constrained=False))


def test_reference_is_the_start_adapter_not_the_bare_base(tmp_path: Path) -> None:
    """With a non-zero start adapter, adapter=False scores under that adapter; the current
    adapter and the trainable set come back exactly."""
    cfg, bundle, policy = _setup(tmp_path)
    shapes = adapter_shapes(policy.peft)
    start = init_adapter(shapes, seed=5, b_std=0.3)
    current = init_adapter(shapes, seed=6, b_std=0.3)
    prompt = _prompt(bundle, cfg, tmp_path)
    rollouts = policy.generate([prompt], num_rollouts=3, temperature=1.0, max_new_tokens=6, seed=0)
    rows = [0, 1, 2]
    with torch.no_grad():
        policy.set_adapter(start)
        under_start = policy.token_logprobs(rollouts, rows, temperature=1.0)
        policy.set_adapter(current)
        with policy.peft.disable_adapter():
            bare = policy.token_logprobs(rollouts, rows, temperature=1.0)
        policy.set_reference(start)
        reference = policy.token_logprobs(rollouts, rows, temperature=1.0, adapter=False)
    mask = rollouts.mask > 0
    torch.testing.assert_close(reference, under_start, atol=1e-6, rtol=0)
    assert float((reference - bare)[mask].abs().max()) > 1e-2  # the start adapter matters
    after = policy.get_adapter()
    assert all(torch.equal(after[k], current[k]) for k in current)
    assert {n for n, p in policy.peft.named_parameters() if p.requires_grad} == policy._trainable  # noqa: SLF001


def test_zero_start_adapter_reference_is_the_bare_base(tmp_path: Path) -> None:
    cfg, bundle, policy = _setup(tmp_path)
    shapes = adapter_shapes(policy.peft)
    policy.set_adapter(init_adapter(shapes, seed=6, b_std=0.3))
    rollouts = policy.generate([_prompt(bundle, cfg, tmp_path)], num_rollouts=2, temperature=1.0, max_new_tokens=4,
                               seed=1)
    with torch.no_grad():
        with policy.peft.disable_adapter():
            bare = policy.token_logprobs(rollouts, [0, 1], temperature=1.0)
        policy.set_reference(init_adapter(shapes, seed=5, b_std=0.0))  # B = 0: adds nothing
        reference = policy.token_logprobs(rollouts, [0, 1], temperature=1.0, adapter=False)
    assert torch.equal(reference, bare)


def test_trainer_kl_pulls_toward_server_init_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With server.init_adapter set, the reference log-probs the loss gets are the start
    adapter's, not the bare base model's."""
    folder = tmp_path / "data" / "chest_xray" / "toy"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "images" / "a.png")
    (folder / "annotation_train.jsonl").write_text(json.dumps(
        {"conversations": [{"from": "human", "value": "<image>\nFinding? Answer with one phrase from the following:\nNormal\nOpacity"},
                           {"from": "gpt", "value": "Normal"}], "images": ["chest_xray/toy/images/a.png"]}) + "\n")
    cfg, bundle, policy = _setup(tmp_path, "privacy=off", "prompt.constrained=false", "train.kl_coef=0.1",
                                 "rollout.num_rollouts=2", "rollout.batch_prompts=1", "rollout.max_new_tokens=5")
    start = init_adapter(adapter_shapes(policy.peft), seed=9, b_std=0.3)
    save_peft_folder(tmp_path / "start", start, cfg.lora, base_model_name="tiny")
    cfg.server.init_adapter = str(tmp_path / "start")
    trainer = LocalTrainer(policy, cfg)
    policy.set_adapter(start)  # round 1 starts from it
    records = trainer.usable(load_records(tmp_path / "data", "train"))
    seen: dict[str, torch.Tensor] = {}
    generate = policy.generate

    def spy_generate(*args: Any, **kwargs: Any) -> Any:
        seen["rollouts"] = generate(*args, **kwargs)
        return seen["rollouts"]

    def spy_loss(logp: torch.Tensor, old: torch.Tensor, ref: Any, *args: Any, **kwargs: Any) -> Any:
        seen["ref"] = ref.clone()
        return real_loss(logp, old, ref, *args, **kwargs)

    real_loss = trainer_module.ppo_token_losses
    monkeypatch.setattr(policy, "generate", spy_generate)
    monkeypatch.setattr(trainer_module, "ppo_token_losses", spy_loss)
    trainer.train(records, steps=1, seed=0)

    rollouts = seen["rollouts"]
    policy.set_adapter(start)
    policy.peft.eval()
    with torch.no_grad():
        under_start = policy.token_logprobs(rollouts, [0, 1], temperature=cfg.rollout.temperature)
        with policy.peft.disable_adapter():
            bare = policy.token_logprobs(rollouts, [0, 1], temperature=cfg.rollout.temperature)
    mask = rollouts.mask > 0
    torch.testing.assert_close(seen["ref"], under_start, atol=1e-5, rtol=0)
    assert float((under_start - bare)[mask].abs().max()) > 1e-2


def test_unreadable_init_adapter_names_the_key(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"server.init_adapter={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="server.init_adapter"):
        start_adapter(cfg, {})
