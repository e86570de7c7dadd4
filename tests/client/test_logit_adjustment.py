"""train.logit_adjustment at a hospital: rollouts adjusted by its own answer prior, evaluation not."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from client.runtime import Runtime
from client.site import Site
from common.config import HospitalConfig, load_config
from common.modeling.policy import Policy
from simulation.synth import generate_federation

torch.set_num_threads(1)

SITE = "hospital-0"
TAU = 1.5


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    base = tmp_path_factory.mktemp("logit-adjustment")
    root = generate_federation(base / "fed", hospitals=1, seed=0, scale=0.25).hospital_roots[0]
    cfg = load_config(overrides=[f"data.root={root}", "model.device=cpu", "model.precision=fp32", "privacy=off",
                                 "prompt.constrained=true", "rollout.batch_prompts=6",
                                 f"train.logit_adjustment={TAU}"])
    site = Site(SITE, HospitalConfig(name=SITE, data_root=str(root), state_dir=str(base / "state")), simulated=True)
    return cfg, Runtime().hospital_data(site, cfg)


def test_rollouts_carry_the_hospital_prior_and_evaluation_does_not(hospital: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, data = hospital
    seen: list[tuple[list[Any], Any]] = []
    real = Policy.generate

    def spy(self: Policy, prompts: Any, **kwargs: Any) -> Any:
        seen.append((list(prompts), kwargs.get("first_bias")))
        return real(self, prompts, **kwargs)

    monkeypatch.setattr(Policy, "generate", spy)
    data.trainer.train(data.train, steps=2, seed=0)
    assert len(seen) == 2
    counts: dict[str, Counter[str]] = {}
    for r in data.train:
        counts.setdefault(r.domain, Counter()).update(r.answers)
    by_id = {r.id: r for r in data.train}
    checked = 0
    for prompts, bias in seen:
        assert bias is not None and len(bias) == len(prompts)
        for p, b in zip(prompts, bias, strict=True):
            r = by_id[p.record_id]
            c = counts[r.domain]
            total = sum(c[o] for o in r.options) + len(r.options)
            mass: dict[int, float] = {}
            for opt, seq in zip(r.options, p.answer_sequences, strict=True):
                mass[seq[0]] = mass.get(seq[0], 0.0) + (c[opt] + 1) / total
            assert b == pytest.approx({t: TAU * math.log(m) for t, m in mass.items()})
            checked += 1
    assert checked == 12
    # Some domain is skewed at this hospital, so the biases are not all alike.
    assert len({round(v, 6) for _, bias in seen for b in bias for v in b.values()}) > 2
    seen.clear()
    data.trainer.evaluate(data.evaluation[:4], seed=0)
    assert seen and all(b is None for _, b in seen)

