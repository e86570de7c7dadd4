"""Rewards on localisation records compare boxes in the frame the model sees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.trainer import LocalTrainer
from common.climb.records import load_records
from common.config import load_config
from common.modeling.loader import load_base_model
from common.modeling.policy import Policy, Rollouts


def test_targets_are_scaled_into_the_model_image_frame(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder = tmp_path / "data" / "chest_xray" / "toy"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "images" / "a.png")
    record = {"conversations": [{"from": "human", "value": "<image>\\nWhere? Answer with one phrase from the following:\\nNormal\\nOpacity"},
                                {"from": "gpt", "value": "Opacity"}],
              "images": ["chest_xray/toy/images/a.png"], "bbox": [16, 16, 48, 32]}
    (folder / "annotation_train.jsonl").write_text(json.dumps(record) + "\n")
    cfg = load_config(overrides=["privacy=off", "prompt.constrained=false", f"model.cache_dir={tmp_path / 'cache'}"])
    bundle = load_base_model(cfg.model)
    trainer = LocalTrainer(Policy(bundle, cfg.lora), cfg)
    rec = load_records(tmp_path / "data", "train")[0]
    ow, oh, mw, mh = trainer.encode(rec).box_frame  # type: ignore[misc]
    assert (ow, oh) == (64, 64) and mw == mh == int(round(cfg.model.max_pixels**0.5))  # 168 x 168
    s = mw / 64  # 2.625
    in_model_frame = f'```json\\n[{{"bbox_2d": [{16 * s}, {16 * s}, {48 * s}, {32 * s}], "label": "Opacity"}}]\\n```'
    in_original_frame = '```json\\n[{"bbox_2d": [16, 16, 48, 32], "label": "Opacity"}]\\n```'
    right = trainer.score(rec, f"<think>x</think>{in_model_frame}\\\\boxed{{Opacity}}")
    wrong = trainer.score(rec, f"<think>x</think>{in_original_frame}\\\\boxed{{Opacity}}")
    assert right.iou == pytest.approx(1.0)
    # the unscaled box [16, 16, 48, 32] misses the scaled target [42, 42, 126, 84]: y-ranges
    # [16, 32] and [42, 84] do not overlap
    assert wrong.iou == 0.0


def test_a_correct_compound_answer_scores_one_in_training_and_in_evaluation(tmp_path: Path) -> None:
    """CLIMB's "Actinic keratoses and intraepithelial carcinoma" is one option: the reward
    and the evaluation metrics both count the same answer as that one, correct class."""
    torch.set_num_threads(1)
    folder = tmp_path / "data" / "dermatology" / "toy"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "images" / "a.png")
    akiec = "Actinic keratoses and intraepithelial carcinoma"
    record = {"conversations": [{"from": "human", "value": f"<image>\\nWhich lesion? Answer with one phrase from the following:\\n{akiec}\\nMelanoma"},
                                {"from": "gpt", "value": akiec}],
              "images": ["dermatology/toy/images/a.png"]}
    (folder / "annotation_train.jsonl").write_text(json.dumps(record) + "\n")
    cfg = load_config(overrides=["privacy=off", "prompt.constrained=false", f"model.cache_dir={tmp_path / 'cache'}"])
    trainer = LocalTrainer(Policy(load_base_model(cfg.model), cfg.lora), cfg)
    rec = load_records(tmp_path / "data", "train")[0]
    assert rec.answers == (akiec,)
    text = f"<think>scaly patch</think>\\boxed{{{akiec}}}"

    # Training: the accuracy reward of this answer.
    assert trainer.score(rec, text).accuracy == 1.0

    # Evaluation: the same answer, through the metrics (generation replaced by the text).
    trainer.policy.generate = lambda prompts, **_: Rollouts(  # type: ignore[method-assign]
        list(prompts), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), [text]
    )
    result = trainer.evaluate([rec], seed=0).domains[rec.domain]
    assert result.accuracy == 1.0
    assert result.balanced_accuracy == 1.0 and result.macro_f1 == 1.0
    assert result.predictions == {akiec.casefold(): 1}


def test_records_of_two_roots_with_the_same_id_keep_their_own_prompts(tmp_path: Path) -> None:
    """A record id is ``file:line`` inside its root, so every simulated hospital repeats
    the others' ids. One trainer scoring several roots (the --compare scorer, the report's
    explanations) must encode each record from its own root, not from a cached namesake."""
    torch.set_num_threads(1)
    roots = []
    for name, value in (("a", "Glucose: 250 mg/dL (H)"), ("b", "Glucose: 80 mg/dL")):
        folder = tmp_path / name / "lab" / "panel"
        folder.mkdir(parents=True)
        answer = "Diabetes" if "(H)" in value else "No diabetes"
        record = {"conversations": [{"from": "human", "value": f"{value}\nDiabetes? Answer with one phrase from the following:\nNo diabetes\nDiabetes"},
                                    {"from": "gpt", "value": answer}]}
        (folder / "annotation_test.jsonl").write_text(json.dumps(record) + "\n")
        roots.append(tmp_path / name)
    cfg = load_config(overrides=["privacy=off", f"model.cache_dir={tmp_path / 'cache'}"])
    policy = Policy(load_base_model(cfg.model), cfg.lora)
    trainer = LocalTrainer(policy, cfg)
    a, b = (load_records(root, "test")[0] for root in roots)
    assert a.id == b.id and a.root != b.root
    first, second = trainer.encode(a), trainer.encode(b)
    assert first.input_ids.tolist() != second.input_ids.tolist()
    # each encodes exactly as a fresh trainer that never saw the other root
    fresh = LocalTrainer(policy, cfg)
    assert fresh.encode(b).input_ids.tolist() == second.input_ids.tolist()
    assert trainer.encode(a).input_ids.tolist() == first.input_ids.tolist()
