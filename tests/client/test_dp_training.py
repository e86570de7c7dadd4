"""DP-SGD inside the local trainer (client.trainer + client.dp_step) on the tiny model.

Per-unit clipping (record and patient units), per-row gradients against plain autograd
one row at a time, the noise scale sigma C / (q N), empty Poisson batches, and DRPO
advantages that depend on one record only.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import client.dp_step as dp_step
from client.dp_step import DPSettings, DPUpdater
from client.trainer import LocalTrainer, privacy_units, unique_rows
from common.climb.records import Record, load_records
from common.config import FedClimbConfig, load_config
from common.modeling.loader import load_base_model
from common.modeling.lora import adapter_shapes, init_adapter
from common.modeling.policy import Policy, Rollouts
from common.privacy.dpsgd import clip_and_noise
from common.privacy.noise import NoiseSource
from common.policy_loss import ppo_token_losses
from simulation.synth import generate_federation

torch.set_num_threads(1)

# Small enough that (almost) every unit's gradient is clipped.
SMALL_CLIP = 1e-3
# CPU and fp32: the checks below compare gradients to 1e-5.
BASE = ["model.device=cpu", "model.precision=fp32", "aggregation.mode=fedit", "rollout.batch_prompts=8",
        "train.micro_batch=64"]


@dataclass
class Env:
    root: Path
    policy: Policy
    trainer: LocalTrainer
    records: list[Record]
    start: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    out = tmp_path_factory.mktemp("dp-training") / "fed"
    summary = generate_federation(out, hospitals=1, seed=0, scale=0.25)
    cfg = load_config(overrides=BASE)
    policy = Policy(load_base_model(cfg.model), cfg.lora, freeze_a=False)
    # PEFT starts with B = 0, which makes every lora_A gradient 0; a random B makes
    # both factors carry per-row gradients.
    start = init_adapter(adapter_shapes(policy.peft), seed=1, b_std=0.05)
    trainer = LocalTrainer(policy, cfg)
    records = trainer.usable(load_records(summary.hospital_roots[0], "train"))
    assert len(records) >= 60
    return Env(summary.hospital_roots[0], policy, trainer, records, start)


@pytest.fixture()
def use_cfg(env: Env) -> Iterator[Callable[..., FedClimbConfig]]:
    """Swap the trainer's configuration for one test (prompts stay cached)."""
    original = env.trainer.cfg

    def swap(*overrides: str) -> FedClimbConfig:
        cfg = load_config(overrides=[*BASE, *overrides])
        env.trainer.cfg = cfg
        return cfg

    yield swap
    env.trainer.cfg = original
    env.policy.set_adapter(env.start)


def _settings(*, sigma: float, q: float, clip: float, unit: str, seed: int) -> DPSettings:
    return DPSettings(
        noise_multiplier=sigma, sample_rate=q, max_grad_norm=clip, unit=unit,
        generator=NoiseSource.from_seed(seed),
    )


# --------------------------------------------------------------------------- one instrumented step


@dataclass
class StepCapture:
    """What one DP step saw: the sampled units, the update's inputs, and the DP internals."""

    chosen: list[int] = field(default_factory=list)
    update: dict[str, Any] = field(default_factory=dict)
    row_grads: list[tuple[list[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    unit_calls: list[tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]] = field(default_factory=list)


def _instrumented_step(env: Env, monkeypatch: pytest.MonkeyPatch, dp: DPSettings, seed: int) -> StepCapture:
    cap = StepCapture()
    real_group = dp_step.group_rows_to_units
    real_clip = dp_step.clip_and_noise
    real_sample = DPUpdater.sample_units
    real_update = LocalTrainer._update

    def group(per_row: list[torch.Tensor], unit_index: torch.Tensor, num_units: int) -> list[torch.Tensor]:
        cap.row_grads.append(([g.detach().clone() for g in per_row], unit_index.clone()))
        return real_group(per_row, unit_index, num_units)

    def clip(per_unit: list[torch.Tensor], **kw: Any) -> Any:
        out, stats = real_clip(per_unit, **kw)
        if per_unit[0].shape[0] > 0:  # the accumulate calls (finish_step passes 0 units)
            cap.unit_calls.append(([g.detach().clone() for g in per_unit], [o.detach().clone() for o in out],
                                   dict(kw)))
        return out, stats

    def sample(self: DPUpdater, num_units: int, settings: DPSettings) -> list[int]:
        chosen = real_sample(self, num_units, settings)
        cap.chosen = list(chosen)
        return chosen

    def update(self: LocalTrainer, rollouts: Rollouts, advantages: torch.Tensor, ref_logp: Any,
               optimizer: Any, settings: Any, unit_of_prompt: list[int], num_units: int) -> Any:
        cap.update = dict(rollouts=rollouts, advantages=advantages.detach().clone(),
                          ref_logp=ref_logp, unit_of_prompt=list(unit_of_prompt))
        return real_update(self, rollouts, advantages, ref_logp, optimizer, settings, unit_of_prompt, num_units)

    monkeypatch.setattr(dp_step, "group_rows_to_units", group)
    monkeypatch.setattr(dp_step, "clip_and_noise", clip)
    monkeypatch.setattr(DPUpdater, "sample_units", sample)
    monkeypatch.setattr(LocalTrainer, "_update", update)
    env.policy.set_adapter(env.start)
    env.trainer.train(env.records, steps=1, seed=seed, dp=dp)
    monkeypatch.undo()
    return cap


def _row_unit_tokens(cap: StepCapture, K: int) -> tuple[list[int], dict[int, float]]:
    """Global unit of every rollout row, and each unit's number of response tokens."""
    rollouts: Rollouts = cap.update["rollouts"]
    unit_of_row = [cap.update["unit_of_prompt"][r // K] for r in range(rollouts.num_rows)]
    tokens: dict[int, float] = {}
    for r, u in enumerate(unit_of_row):
        tokens[u] = tokens.get(u, 0.0) + float(rollouts.mask[r].sum())
    return unit_of_row, tokens


def _reference_row_grads(env: Env, cap: StepCapture) -> list[torch.Tensor]:
    """Each row's gradient by plain autograd, one row per forward pass (no Opacus).

    The per-row loss is what DP training differentiates: the row's PPO token losses
    summed and divided by its unit's token count (the unit's token mean), with the
    old log-probs equal to the current ones (one PPO epoch).
    """
    cfg = env.trainer.cfg
    policy = env.policy
    K = cfg.rollout.num_rollouts
    rollouts: Rollouts = cap.update["rollouts"]
    unit_of_row, tokens = _row_unit_tokens(cap, K)
    params = policy.trainable_parameters()
    policy.set_adapter(env.start)
    policy.peft.eval()  # dropout is 0; eval keeps any capture hooks out of the way
    grads = []
    for r in range(rollouts.num_rows):
        logp = policy.token_logprobs(rollouts, [r], temperature=cfg.rollout.temperature)
        ref = cap.update["ref_logp"][[r]] if cap.update["ref_logp"] is not None else None
        losses, _ = ppo_token_losses(
            logp, logp.detach(), ref, cap.update["advantages"][[r]], rollouts.mask[[r]],
            clip_low=cfg.train.clip_low, clip_high=cfg.train.clip_high, dual_clip=cfg.train.dual_clip,
            kl_coef=cfg.train.kl_coef,
        )
        loss = losses.sum() / max(tokens[unit_of_row[r]], 1.0)
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                for x, p in zip(g, params, strict=True)]))
    return grads


def _flat(tensors: list[torch.Tensor], index: int) -> torch.Tensor:
    return torch.cat([t[index].reshape(-1) for t in tensors])


@pytest.fixture(scope="module")
def record_step(env: Env) -> tuple[StepCapture, list[torch.Tensor]]:
    mp = pytest.MonkeyPatch()
    try:
        cap = _instrumented_step(env, mp, _settings(sigma=1.0, q=0.1, clip=SMALL_CLIP, unit="record", seed=3), seed=11)
    finally:
        mp.undo()
    return cap, _reference_row_grads(env, cap)


@pytest.fixture(scope="module")
def patient_step(env: Env) -> tuple[StepCapture, list[torch.Tensor]]:
    mp = pytest.MonkeyPatch()
    try:
        cap = _instrumented_step(env, mp, _settings(sigma=1.0, q=0.15, clip=SMALL_CLIP, unit="patient", seed=5),
                                 seed=12)
    finally:
        mp.undo()
    return cap, _reference_row_grads(env, cap)


# --------------------------------------------------------------------------- 1. clipping


def _check_clipping(cap: StepCapture) -> None:
    """Every unit's share of what the real step adds has norm <= C, and the shares add up.

    A unit's share is the real clip_and_noise applied to that unit alone (same settings as
    the step's call); the batch call must equal the sum of the shares, and each share must
    equal the hand formula min(1, C / ||g_u||) g_u.
    """
    assert cap.unit_calls, "the DP step clipped nothing"
    raw_norms = []
    for per_unit, summed, kw in cap.unit_calls:
        clip = kw["max_grad_norm"]
        assert clip == SMALL_CLIP
        assert kw["noise_multiplier"] == 0  # accumulation calls: the noise comes once per step
        scale = kw["expected_batch_size"]
        units = per_unit[0].shape[0]
        total = torch.zeros_like(torch.cat([s.reshape(-1) for s in summed]), dtype=torch.float64)
        for u in range(units):
            share, _ = clip_and_noise([g[u:u + 1] for g in per_unit], **kw)
            share = torch.cat([t.reshape(-1) for t in share]).double() * scale
            assert float(share.norm()) <= clip * (1 + 1e-5)
            g = _flat(per_unit, u).double()
            norm = float(g.norm())
            raw_norms.append(norm)
            torch.testing.assert_close(share, g * min(1.0, clip / (norm + 1e-6)), rtol=1e-4, atol=1e-9)
            total += share
        # What the step adds is exactly the sum of the individually clipped units.
        torch.testing.assert_close(torch.cat([s.reshape(-1) for s in summed]).double() * scale, total,
                                   rtol=1e-5, atol=1e-9)
    assert max(raw_norms) > 10 * SMALL_CLIP, "clipping was never active: the test would be vacuous"


def test_record_units_are_clipped_to_c(record_step: tuple[StepCapture, list[torch.Tensor]]) -> None:
    cap, _ = record_step
    _check_clipping(cap)
    # One unit per sampled record.
    assert sum(c[0][0].shape[0] for c in cap.unit_calls) == len(cap.chosen) > 0


def test_patient_units_are_clipped_to_c(patient_step: tuple[StepCapture, list[torch.Tensor]]) -> None:
    _check_clipping(patient_step[0])


def test_patient_units_group_all_records_of_a_patient(env: Env,
                                                      patient_step: tuple[StepCapture, list[torch.Tensor]]) -> None:
    units = privacy_units(env.records, "patient")
    by_patient: dict[str, set[int]] = {}
    for i, r in enumerate(env.records):
        assert r.patient_id is not None
        by_patient.setdefault(r.patient_id, set()).add(i)
    assert sorted(map(sorted, by_patient.values())) == sorted(map(sorted, units))
    cap, _ = patient_step
    # The sampled batch holds every record of each sampled patient, and some patient has several.
    unit_of_prompt = cap.update["unit_of_prompt"]
    assert sorted(unit_of_prompt) == sorted(u for u in cap.chosen for _ in units[u])
    assert max(len(units[u]) for u in cap.chosen) >= 2


def test_patient_unit_gradient_is_the_sum_of_its_rows(env: Env,
                                                      patient_step: tuple[StepCapture, list[torch.Tensor]]) -> None:
    cap, ref_rows = patient_step
    K = env.trainer.cfg.rollout.num_rollouts
    unit_of_row, _ = _row_unit_tokens(cap, K)
    assert len(cap.unit_calls) == 1  # one micro-batch: local unit j is the j-th sampled unit
    per_unit = cap.unit_calls[0][0]
    assert per_unit[0].shape[0] == len(cap.chosen)
    multi = 0
    for j, u in enumerate(cap.chosen):
        rows = [r for r, ur in enumerate(unit_of_row) if ur == u]
        multi += len(rows) > K
        expected = torch.stack([ref_rows[r] for r in rows]).sum(0)
        got = _flat(per_unit, j)
        assert float((got - expected).norm()) <= 1e-4 * float(expected.norm()) + 1e-9
    assert multi >= 1


# --------------------------------------------------------------------------- 2. exact per-row gradients


@pytest.mark.parametrize("which", ["record", "patient"])
def test_hook_per_row_gradients_match_plain_autograd(which: str, request: pytest.FixtureRequest) -> None:
    cap, ref_rows = request.getfixturevalue(f"{which}_step")
    hook_rows = [(grads, index) for grads, index in cap.row_grads]
    assert len(hook_rows) == 1
    grads, _ = hook_rows[0]
    # Identical rollouts of a prompt are run once: that row's per-sample gradient is the sum
    # of the gradients of the rows it stands for.
    rollouts: Rollouts = cap.update["rollouts"]
    unique, inverse = unique_rows(rollouts, list(range(rollouts.num_rows)))
    assert grads[0].shape[0] == len(unique)
    scale = max(float(g.norm()) for g in ref_rows)
    assert scale > 0
    for u in range(len(unique)):
        expected = torch.stack([ref_rows[r] for r in range(len(ref_rows)) if int(inverse[r]) == u]).sum(0)
        got = _flat(grads, u)
        # Relative to the row's own norm, with a floor for rows whose gradient is ~0.
        assert float((got - expected).norm()) <= 1e-5 * max(float(expected.norm()), 1e-3 * scale), u


# --------------------------------------------------------------------------- 3. noise


class _GradSpy:
    """Copies of every trainable gradient right before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __enter__(self) -> _GradSpy:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.steps.append(torch.cat([p.grad.detach().reshape(-1).clone()
                                         for g in optimizer.param_groups for p in g["params"]]))

        self._handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def _zero_advantages(self: LocalTrainer, rewards: torch.Tensor, *args: Any) -> tuple[torch.Tensor, Any]:
    return torch.zeros_like(rewards), None


def test_noise_std_is_sigma_c_over_expected_batch(env: Env, use_cfg: Callable[..., FedClimbConfig],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero advantages and no KL term: every gradient is 0, so p.grad is the noise alone."""
    use_cfg("train.kl_coef=0")
    monkeypatch.setattr(LocalTrainer, "_advantages", _zero_advantages)
    sigma, clip, q, steps = 0.8, 0.5, 0.03, 12
    env.policy.set_adapter(env.start)
    with _GradSpy() as spy:
        result = env.trainer.train(env.records, steps=steps, seed=2,
                                   dp=_settings(sigma=sigma, q=q, clip=clip, unit="record", seed=7))
    assert len(spy.steps) == steps
    assert sum(h.prompts > 0 for h in result.history) >= steps // 2  # mostly real (non-empty) batches
    expected_std = sigma * clip / (q * len(env.records))
    noise = torch.stack(spy.steps).double()  # (steps, coordinates)
    n = noise.numel()
    assert n > 50_000
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.02)
    assert abs(float(noise.mean())) < 5 * expected_std / math.sqrt(n)
    # Every coordinate is noised, and each step draws fresh noise.
    assert bool((noise != 0).all())
    corr = torch.corrcoef(noise[:2])[0, 1]
    assert abs(float(corr)) < 0.05


def test_noise_is_drawn_from_the_dp_generator(env: Env, use_cfg: Callable[..., FedClimbConfig]) -> None:
    """The noise follows DPSettings.generator alone, not torch's global RNG (empty batches)."""
    use_cfg()
    runs = {}
    for global_seed, dp_seed in ((0, 7), (1, 7), (0, 8)):
        torch.manual_seed(global_seed)
        env.policy.set_adapter(env.start)
        with _GradSpy() as spy:
            env.trainer.train(env.records, steps=1, seed=2,
                              dp=_settings(sigma=1.0, q=1e-6, clip=1e-6, unit="record", seed=dp_seed))
        runs[global_seed, dp_seed] = spy.steps[0]
    assert torch.equal(runs[0, 7], runs[1, 7])
    assert not torch.equal(runs[0, 7], runs[0, 8])


def test_noise_drawn_ahead_is_the_noise_drawn_inline(env: Env, use_cfg: Callable[..., FedClimbConfig],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """DPUpdater.draw_ahead draws a step's noise on a background thread while its forward and
    backward run: the same generator makes the same draws in the same order, so the adapter
    is bit for bit the one of inline draws."""
    use_cfg()
    threads: list[str] = []
    real = NoiseSource.standard_normal

    def spy(self: NoiseSource, size: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(self, size)

    monkeypatch.setattr(NoiseSource, "standard_normal", spy)
    updater = DPUpdater.for_policy(env.policy)
    adapters, names = {}, {}
    try:
        for ahead in (True, False):
            updater.draw_ahead = ahead
            threads.clear()
            env.policy.set_adapter(env.start)
            result = env.trainer.train(env.records, steps=3, seed=2,
                                       dp=_settings(sigma=1.0, q=0.05, clip=0.5, unit="record", seed=7))
            adapters[ahead], names[ahead] = result.adapter, list(threads)
    finally:
        updater.draw_ahead = True
    assert len(names[True]) == len(names[False]) == 3
    assert all(n.startswith("fedclimb-dp-noise") for n in names[True])
    assert not any(n.startswith("fedclimb-dp-noise") for n in names[False])
    assert all(torch.equal(adapters[True][k], adapters[False][k]) for k in adapters[True])
    assert not all(torch.equal(adapters[True][k], env.start[k]) for k in env.start)


def test_secure_default_noise_ignores_torch_seeds(env: Env, use_cfg: Callable[..., FedClimbConfig]) -> None:
    """DPSettings' default source is keyed from os.urandom: the same torch seed, different noise."""
    use_cfg()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        env.policy.set_adapter(env.start)
        settings = DPSettings(noise_multiplier=1.0, sample_rate=1e-6, max_grad_norm=1e-6, unit="record")
        assert isinstance(settings.generator, NoiseSource)
        with _GradSpy() as spy:
            env.trainer.train(env.records, steps=1, seed=2, dp=settings)
        runs.append(spy.steps[0])
    assert not torch.equal(runs[0], runs[1])


# --------------------------------------------------------------------------- non-finite units


def test_a_unit_with_a_nan_loss_contributes_zero_and_training_goes_on(
    env: Env, use_cfg: Callable[..., FedClimbConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first unit of every micro-batch gets a NaN loss: the step goes on, counts it, and
    its update equals the one where that unit's loss is multiplied by 0 (same sample, noise)."""
    use_cfg("train.kl_coef=0")
    real_reduce = dp_step.reduce_per_unit
    updater = DPUpdater.for_policy(env.policy)
    grads, counted = {}, {}
    for name, factor in (("nan", float("nan")), ("zero", 0.0)):

        def poisoned(losses: torch.Tensor, mask: torch.Tensor, unit_index: torch.Tensor, num_units: int,
                     factor: float = factor) -> torch.Tensor:
            per_row = real_reduce(losses, mask, unit_index, num_units)
            ones = torch.ones_like(per_row)
            return per_row * torch.where(unit_index.to(per_row.device) == 0, ones * factor, ones)

        monkeypatch.setattr(dp_step, "reduce_per_unit", poisoned)
        before = updater.nonfinite_units
        env.policy.set_adapter(env.start)
        with _GradSpy() as spy:
            result = env.trainer.train(env.records, steps=1, seed=3,
                                       dp=_settings(sigma=1.0, q=0.2, clip=1.0, unit="record", seed=4))
        assert result.history[0].prompts > 1  # the poisoned unit and at least one other
        grads[name], counted[name] = spy.steps[0], updater.nonfinite_units - before
    assert counted == {"nan": 1, "zero": 0}
    assert bool(torch.isfinite(grads["nan"]).all())
    torch.testing.assert_close(grads["nan"], grads["zero"], rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- 4. empty Poisson batch


@pytest.mark.parametrize("epochs", [1, 2])
def test_empty_poisson_batch_takes_pure_noise_steps(env: Env, use_cfg: Callable[..., FedClimbConfig],
                                                    monkeypatch: pytest.MonkeyPatch, epochs: int) -> None:
    use_cfg(f"train.ppo_epochs={epochs}")

    def no_rollouts(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an empty batch must not sample rollouts")

    monkeypatch.setattr(Policy, "generate", no_rollouts)
    sigma, clip, q, steps = 1.0, 1e-6, 1e-6, 3
    env.policy.set_adapter(env.start)
    with _GradSpy() as spy:
        result = env.trainer.train(env.records, steps=steps, seed=0,
                                   dp=_settings(sigma=sigma, q=q, clip=clip, unit="record", seed=1))
    assert [h.prompts for h in result.history] == [0] * steps
    assert result.prompts == 0 and result.dp_steps == steps
    # One noisy update per PPO epoch, as for a non-empty sample.
    assert len(spy.steps) == steps * epochs
    noise = torch.stack(spy.steps).double()
    assert float(noise.std()) == pytest.approx(sigma * clip / (q * len(env.records)), rel=0.03)
    changed = [not torch.equal(result.adapter[k], env.start[k]) for k in env.start]
    assert all(changed)


def test_dp_hooks_are_off_in_later_non_dp_training(env: Env, use_cfg: Callable[..., FedClimbConfig]) -> None:
    """The per-row hooks sit on the policy's own layers: after a DP round, training the same
    policy without DP must not compute (and pile up) per-row gradients."""
    use_cfg()
    env.policy.set_adapter(env.start)
    env.trainer.train(env.records, steps=1, seed=0, dp=_settings(sigma=1.0, q=0.1, clip=1.0, unit="record", seed=0))
    assert DPUpdater.for_policy(env.policy) is env.trainer._dp_updater
    env.policy.set_adapter(env.start)
    LocalTrainer(env.policy, env.trainer.cfg).train(env.records[:16], steps=2, seed=0)
    leftover = [p for p in env.policy.trainable_parameters() if getattr(p, "grad_sample", None) is not None]
    assert leftover == []


# --------------------------------------------------------------------------- 7. DRPO under DP


def _s(rewards: list[float]) -> torch.Tensor:
    """GRPO's group standardisation by hand (unbiased std, eps 1e-6)."""
    x = torch.tensor(rewards, dtype=torch.float64)
    if float(x.max()) == float(x.min()):
        return torch.zeros_like(x)
    return (x - x.mean()) / (x.std() + 1e-6)


REWARDS = [[1.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.8, 0.2], [0.6, 0.6, 0.1, 0.0]]
DOMAINS = ["a", "b", "c", "a"]
STATS = {"a": (4.0, 0.5), "b": (9.0, 1.0)}  # T_a = 1, T_b = 3; "c" has none yet


def _adv(trainer: LocalTrainer, rewards: list[list[float]], domains: list[str], stats: Any, dp: bool) -> torch.Tensor:
    kl = torch.linspace(0.1, 1.0, len(rewards))
    adv, _ = trainer._advantages(torch.tensor(rewards), domains, None, kl, stats, dp)
    return adv.double()


def test_dp_advantages_by_hand(env: Env, use_cfg: Callable[..., FedClimbConfig]) -> None:
    """Clustering, re-standardisation and damping are on in the config but off under DP."""
    cfg = use_cfg("advantage.kl_damping=true")
    assert cfg.advantage.clustering and cfg.advantage.restandardize and cfg.advantage.kl_damping
    trainer = env.trainer
    fixed = _adv(trainer, REWARDS, DOMAINS, None, True)
    for i, row in enumerate(REWARDS):
        torch.testing.assert_close(fixed[i], _s(row).double(), rtol=1e-6, atol=1e-6)
    server = _adv(trainer, REWARDS, DOMAINS, STATS, True)
    t_mean = (1.0 + 3.0) / 2  # mean broadcast temperature; "c" gets T = t_mean
    for i, (row, d) in enumerate(zip(REWARDS, DOMAINS, strict=True)):
        t_d = {"a": 1.0, "b": 3.0, "c": t_mean}[d]
        torch.testing.assert_close(server[i], _s(row) * t_mean / t_d, rtol=1e-6, atol=1e-6)
    # A fixed temperature ignores the broadcast statistics.
    use_cfg("privacy.domain_temperature=fixed")
    torch.testing.assert_close(_adv(trainer, REWARDS, DOMAINS, STATS, True), fixed)


@pytest.mark.parametrize("stats", [None, STATS], ids=["fixed", "server"])
def test_dp_advantages_of_a_record_ignore_the_other_records(env: Env, use_cfg: Callable[..., FedClimbConfig],
                                                            stats: Any) -> None:
    use_cfg()
    trainer = env.trainer
    base = _adv(trainer, REWARDS, DOMAINS, stats, True)
    changed = [REWARDS[0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.3, 0.3, 0.9]]
    other = _adv(trainer, changed, DOMAINS, stats, True)
    assert torch.equal(other[0], base[0])
    # Removing the other records, or adding one of an unseen domain, changes nothing either.
    alone = _adv(trainer, [REWARDS[0]], [DOMAINS[0]], stats, True)
    assert torch.equal(alone[0], base[0])
    more = _adv(trainer, [*REWARDS, [0.0, 1.0, 0.0, 1.0]], [*DOMAINS, "z"], stats, True)
    torch.testing.assert_close(more[0], base[0], rtol=1e-12, atol=0)
    # Without DP the batch couples records (the test can tell).
    assert not torch.allclose(_adv(trainer, changed, DOMAINS, stats, False)[0],
                              _adv(trainer, REWARDS, DOMAINS, stats, False)[0])


def test_advantages_during_dp_training_depend_on_each_record_alone(env: Env,
                                                                  use_cfg: Callable[..., FedClimbConfig],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    use_cfg()
    calls: list[tuple[torch.Tensor, list[str], Any, bool, torch.Tensor]] = []
    real = LocalTrainer._advantages

    def spy(self: LocalTrainer, rewards: torch.Tensor, domains: list[str], state: Any, kl: Any,
            global_stats: Any, dp: bool) -> Any:
        adv, new_state = real(self, rewards, domains, state, kl, global_stats, dp)
        calls.append((rewards.clone(), list(domains), global_stats, dp, adv.clone()))
        return adv, new_state

    monkeypatch.setattr(LocalTrainer, "_advantages", spy)
    domains = sorted({r.domain for r in env.records})
    broadcast = {d: (10.0 + 5 * i, 0.3 + 0.1 * i) for i, d in enumerate(domains[:-1])}
    env.policy.set_adapter(env.start)
    env.trainer.train(env.records, steps=2, seed=4, global_domain_stats=broadcast,
                      dp=_settings(sigma=1.0, q=0.1, clip=1.0, unit="record", seed=9))
    monkeypatch.undo()
    assert calls and all(c[3] for c in calls)
    seen = 0
    for rewards, doms, stats, _, adv in calls:
        for i in range(rewards.shape[0]):
            own, _ = env.trainer._advantages(rewards[i : i + 1], [doms[i]], None, None, stats, True)
            torch.testing.assert_close(adv[i], own[0], rtol=1e-12, atol=0)
            seen += 1
    assert seen >= 4
