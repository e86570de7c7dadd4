"""train.keep_optimizer: AdamW's moments carried from one round to the next at a hospital."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from client.rounds import Instruction, train_round
from client.runtime import Runtime
from client.site import Site
from client.trainer import resume_moments, saved_moments
from common import keys
from common.config import FedClimbConfig, HospitalConfig, load_config
from common.modeling.lora import adapter_shapes, init_adapter
from simulation.synth import generate_federation

torch.set_num_threads(1)

SITE = "hospital-0"
STEPS = 2


# --------------------------------------------------------------------------- the pure helpers


def _linear_steps(opt: torch.optim.Optimizer, layer: torch.nn.Linear, seeds: range) -> None:
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        opt.zero_grad()
        (layer(torch.randn(3, 4, generator=g)) ** 2).sum().backward()
        opt.step()


def test_resumed_moments_continue_the_optimizer_exactly() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 2)
    b = torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.05)
    _linear_steps(opt_a, a, range(3))
    saved = saved_moments(opt_a)
    assert {int(v["step"]) for v in saved["state"].values()} == {3}
    b.load_state_dict(a.state_dict())
    # A fresh optimizer built with another learning rate keeps its own after the resume.
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.01)
    resume_moments(opt_b, saved)
    assert opt_b.param_groups[0]["lr"] == 0.01
    opt_b.param_groups[0]["lr"] = 0.05
    _linear_steps(opt_a, a, range(3, 5))
    _linear_steps(opt_b, b, range(3, 5))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # The copy is the CPU state at save time, not a view of the optimizer's tensors.
    assert int(saved["state"][0]["step"]) == 3


def test_a_fresh_optimizer_forgets_the_gradient_size_resumed_moments_keep_it() -> None:
    """Why the option exists: AdamW's first step is lr * g / |g| on every value, so a tiny
    gradient and one a thousand times larger move the adapter alike."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.0)
    _linear_steps(opt, layer, range(20))
    saved = saved_moments(opt)
    start = [p.detach().clone() for p in layer.parameters()]

    def step(scale: float, *, resume: bool) -> torch.Tensor:
        with torch.no_grad():
            for p, s in zip(layer.parameters(), start, strict=True):
                p.copy_(s)
        fresh = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.0)
        if resume:
            resume_moments(fresh, saved)
        fresh.zero_grad()
        (scale * layer(torch.ones(1, 4)).sum()).backward()  # the same gradient, scaled
        fresh.step()
        return torch.cat([(p - s).detach().flatten() for p, s in zip(layer.parameters(), start, strict=True)])

    tiny, large = step(1e-3, resume=False), step(1.0, resume=False)
    assert torch.allclose(tiny.abs(), torch.full_like(tiny, 0.01), rtol=1e-3)
    assert torch.allclose(tiny, large, rtol=1e-3)
    assert float((step(1.0, resume=True) - step(1e-3, resume=True)).abs().max()) > 1e-3


def test_moments_that_do_not_fit_are_refused() -> None:
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01)
    _linear_steps(opt, layer, range(1))
    other = torch.optim.AdamW(torch.nn.Linear(5, 2).parameters(), lr=0.01)
    with pytest.raises(ValueError, match="does not fit shape"):
        resume_moments(other, saved_moments(opt))
    fewer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 4))], lr=0.01)
    with pytest.raises(ValueError, match="one entry per trainable parameter"):
        resume_moments(fewer, saved_moments(opt))
    bad = saved_moments(opt)
    bad["state"][0]["exp_avg_sq"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="exp_avg_sq"):
        resume_moments(torch.optim.AdamW(layer.parameters(), lr=0.01), bad)


# --------------------------------------------------------------------------- hospital rounds


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Runtime, dict[str, torch.Tensor]]:
    base = tmp_path_factory.mktemp("optimizer-state")
    root = generate_federation(base / "fed", hospitals=1, seed=0, scale=0.25).hospital_roots[0]
    runtime = Runtime()
    start = init_adapter(adapter_shapes(runtime.policy(_cfg(root)).peft), seed=1, b_std=0.05)
    return root, runtime, start


def _cfg(root: Path, *overrides: str) -> FedClimbConfig:
    return load_config(overrides=[f"data.root={root}", "model.device=cpu", "model.precision=fp32",
                                  "aggregation.mode=fedit", "rollout.batch_prompts=4", f"train.steps={STEPS}",
                                  "privacy=off", *overrides])


def _round(fed: tuple[Path, Runtime, dict[str, torch.Tensor]], state: Path, server_round: int,
           *overrides: str) -> Any:
    root, runtime, start = fed
    state.mkdir(parents=True, exist_ok=True)
    site = Site(SITE, HospitalConfig(name=SITE, data_root=str(root), state_dir=str(state)), simulated=True)
    ins = Instruction(server_round=server_round, seed=0, planned_rounds=4, domain_names=[])
    out = train_round(runtime, site, _cfg(root, *overrides), ins, start)
    assert out.status == keys.STATUS_OK
    return out


def _steps_saved(path: Path) -> set[int]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state"]
    return {int(s["step"]) for s in state.values()}


def test_rounds_carry_the_moments_and_keep_two_files(fed: Any, tmp_path: Path) -> None:
    keep = "train.keep_optimizer=true"
    folder = tmp_path / "optimizer"
    first = _round(fed, tmp_path, 1, keep)
    assert _steps_saved(folder / "round-0001.pt") == {STEPS}
    assert (os.stat(folder / "round-0001.pt").st_mode & 0o777) == 0o600
    second = _round(fed, tmp_path, 2, keep)
    assert _steps_saved(folder / "round-0002.pt") == {2 * STEPS}
    _round(fed, tmp_path, 3, keep)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["round-0002.pt", "round-0003.pt"]
    # A retried round 3 resumes from round 2's moments, not from its own first try.
    _round(fed, tmp_path, 3, keep)
    assert _steps_saved(folder / "round-0003.pt") == {3 * STEPS}
    # Without the option: the same round from the same adapter starts the moments at zero,
    # which changes the update, and nothing is written.
    plain = _round(fed, tmp_path / "plain", 2)
    assert not (tmp_path / "plain" / "optimizer").exists()
    assert first.adapter is not None and second.adapter is not None and plain.adapter is not None
    assert any(not torch.equal(second.adapter[k], plain.adapter[k]) for k in plain.adapter)


def test_a_damaged_or_foreign_state_costs_the_moments_not_the_round(fed: Any, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    keep = "train.keep_optimizer=true"
    folder = tmp_path / "optimizer"
    folder.mkdir(parents=True)
    (folder / "round-0001.pt").write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        _round(fed, tmp_path, 2, keep)
    assert "cannot read the optimizer state" in caplog.text
    assert _steps_saved(folder / "round-0002.pt") == {STEPS}
    # Moments of another LoRA setting (rank 8, not the preset's) are refused with a warning.
    torch.save({"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(8, 8),
                              "exp_avg_sq": torch.zeros(8, 8)}}}, folder / "round-0002.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _round(fed, tmp_path, 3, keep)
    assert "starting AdamW's moments at zero" in caplog.text
    assert _steps_saved(folder / "round-0003.pt") == {STEPS}


def test_moments_are_kept_under_dp_too(fed: Any, tmp_path: Path) -> None:
    """Under DP the moments are functions of the noised gradients only, and never leave."""
    dp = ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.noise_multiplier=1.0",
          "privacy.planned_rounds=2", "train.keep_optimizer=true"]
    out = _round(fed, tmp_path, 1, *dp)
    assert _steps_saved(tmp_path / "optimizer" / "round-0001.pt") == {STEPS}
    assert out.adapter is not None and not any(k.startswith("optimizer") for k in out.adapter)
    _round(fed, tmp_path, 2, *dp)
    assert _steps_saved(tmp_path / "optimizer" / "round-0002.pt") == {2 * STEPS}


def test_the_drpo_history_resumes_from_the_latest_earlier_round(tmp_path: Path) -> None:
    """The DRPO history (advantage.history=run) and the moments share the round-file rule."""
    from client.rounds import _load_drpo_state, _save_drpo_state

    site = Site(SITE, HospitalConfig(name=SITE, data_root=str(tmp_path), state_dir=str(tmp_path)), simulated=True)
    assert _load_drpo_state(site, 5) is None
    _save_drpo_state(site, 1, {"round": 1})
    _save_drpo_state(site, 3, {"round": 3})
    (tmp_path / "drpo" / "round-0002.json.tmp").write_text("{}")  # not a round file
    assert _load_drpo_state(site, 1) is None
    assert _load_drpo_state(site, 3) == {"round": 1}
    assert _load_drpo_state(site, 9) == {"round": 3}
