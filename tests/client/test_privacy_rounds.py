"""A hospital's DP round (client.rounds, client.privacy_round): the privacy plan, the ledger,
budget refusal, reproducibility, the statistics it releases (client.stats), what a reply may
carry, DP evaluation, and what a server cannot make a hospital spend."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.optim.optimizer import register_optimizer_step_pre_hook

import client.privacy_round as privacy_round
import client.rounds as rounds
from client.rounds import Instruction, plan_privacy, train_round
from client.runtime import Runtime
from client.site import Site
from client.stats import unit_domain_counts
from client.trainer import LocalResult, LocalTrainer, privacy_units
from common import keys
from common.config import FedClimbConfig, HospitalConfig, load_config
from common.modeling.lora import adapter_shapes, init_adapter
from common.modeling.policy import Policy
from common.privacy.ledger import PrivacyLedger
from common.seeding import derive_seed
from simulation.synth import generate_federation

torch.set_num_threads(1)

TARGET = 3.0
DELTA = 1e-5
BATCH = 8
STEPS = 2
STATS_SIGMA = 5.0
SITE = "hospital-0"
LEDGER = "privacy_ledger.json"
# Where calibration is not what a test is about, a fixed sigma keeps it fast.
FIXED_SIGMA = "privacy.noise_multiplier=1.0"


@dataclass
class Fed:
    root: Path
    runtime: Runtime
    names: list[str]
    start: dict[str, torch.Tensor]
    train: list[Any]


def _cfg(root: Path, *overrides: str) -> FedClimbConfig:
    return load_config(overrides=[
        f"data.root={root}", "model.device=cpu", "model.precision=fp32", "aggregation.mode=fedit",
        f"rollout.batch_prompts={BATCH}", f"train.steps={STEPS}",
        "privacy.enabled=true", f"privacy.target_epsilon={TARGET}", f"privacy.delta={DELTA}",
        f"privacy.stats_noise_multiplier={STATS_SIGMA}", "privacy.planned_rounds=1", *overrides,
    ])


def _site(fed: Fed, state: Path) -> Site:
    state.mkdir(parents=True, exist_ok=True)
    return Site(SITE, HospitalConfig(name=SITE, data_root=str(fed.root), state_dir=str(state)), simulated=True)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    base = tmp_path_factory.mktemp("privacy-rounds")
    summary = generate_federation(base / "fed", hospitals=1, seed=0, scale=0.25)
    root = summary.hospital_roots[0]
    runtime = Runtime()
    cfg = _cfg(root)
    policy = runtime.policy(cfg)
    start = init_adapter(adapter_shapes(policy.peft), seed=1, b_std=0.05)
    data = runtime.hospital_data(Site(SITE, HospitalConfig(name=SITE, data_root=str(root), state_dir=str(base)),
                                      simulated=True), cfg)
    names = sorted({r.domain for r in data.train})
    assert len(names) >= 3 and len(data.train) >= 60
    return Fed(root, runtime, names, start, data.train)


def _ins(fed: Fed, server_round: int = 1, *, planned: int = 1, seed: int = 0,
         names: list[str] | None = None) -> Instruction:
    return Instruction(server_round=server_round, seed=seed, planned_rounds=planned,
                       domain_names=fed.names if names is None else names)


def _run(fed: Fed, cfg: FedClimbConfig, state: Path, ins: Instruction) -> rounds.TrainOutcome:
    return train_round(fed.runtime, _site(fed, state), cfg, ins, fed.start)


def _entries(state: Path) -> list[dict[str, Any]]:
    return json.loads((state / LEDGER).read_text(encoding="utf-8"))["entries"]


def _released_units(state: Path) -> float:
    return float(json.loads((state / "released_domain_counts.json").read_text(encoding="utf-8"))["units"])


def _fresh_epsilon(entries: list[dict[str, Any]]) -> float:
    acc = RDPAccountant()
    acc.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    return float(acc.get_epsilon(delta=DELTA))


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a round over budget must not train")

    monkeypatch.setattr(LocalTrainer, "train", refuse)


@pytest.fixture()
def optimizer_steps() -> Iterator[list[int]]:
    count = [0]
    handle = register_optimizer_step_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    yield count
    handle.remove()


# --------------------------------------------------------------------------- ledger and accounting


def test_ledger_epsilon_equals_a_fresh_opacus_accountant(fed: Fed, tmp_path: Path) -> None:
    cfg = _cfg(fed.root)
    out = _run(fed, cfg, tmp_path, _ins(fed))
    assert out.status == keys.STATUS_OK and out.adapter is not None
    entries = _entries(tmp_path)
    # the number of units (released once), the round, the per-domain counts (released once)
    assert [e["kind"] for e in entries] == ["stats_release", "dpsgd", "stats_release"]
    size, dpsgd, stats = entries
    assert (size["noise_multiplier"], size["sample_rate"], size["steps"]) == (STATS_SIGMA, 1.0, 1)
    # q comes from the released number of units, never from the exact one
    assert dpsgd["sample_rate"] == pytest.approx(BATCH / _released_units(tmp_path), rel=1e-12)
    assert out.metrics[keys.SAMPLE_RATE] == dpsgd["sample_rate"]
    assert dpsgd["steps"] == STEPS and dpsgd["round"] == 1
    assert dpsgd["noise_multiplier"] == pytest.approx(out.metrics[keys.NOISE_MULTIPLIER], rel=1e-12)
    assert (stats["noise_multiplier"], stats["sample_rate"], stats["steps"]) == (STATS_SIGMA, 1.0, 1)
    for k in range(1, len(entries) + 1):
        assert entries[k - 1]["epsilon"] == pytest.approx(_fresh_epsilon(entries[:k]), rel=1e-9)
    spent = entries[-1]["epsilon"]
    assert out.metrics[keys.EPSILON] == pytest.approx(spent, rel=1e-12)
    assert out.metrics[keys.DELTA] == DELTA
    # One planned round: sigma was calibrated to spend the whole budget in it.
    assert TARGET - 0.011 <= spent <= TARGET


def test_ppo_epochs_are_accounted_as_sigma_over_sqrt_e(fed: Fed, tmp_path: Path, optimizer_steps: list[int]) -> None:
    cfg = _cfg(fed.root, "train.ppo_epochs=2")
    out = _run(fed, cfg, tmp_path, _ins(fed))
    assert out.status == keys.STATUS_OK
    assert optimizer_steps[0] == 2 * STEPS  # two noisy updates per sampled step
    dpsgd = next(e for e in _entries(tmp_path) if e["kind"] == "dpsgd")
    sigma = out.metrics[keys.NOISE_MULTIPLIER]
    assert dpsgd["noise_multiplier"] == pytest.approx(sigma / math.sqrt(2), rel=1e-12)
    assert _entries(tmp_path)[-1]["epsilon"] == pytest.approx(_fresh_epsilon(_entries(tmp_path)), rel=1e-9)
    # The calibration gives each of the two updates sqrt(2) times the one-epoch sigma.
    empty = tmp_path / "empty"
    empty.mkdir()
    ledger = PrivacyLedger.open(empty, delta=DELTA, target_epsilon=TARGET, accountant="rdp")
    ledger.record(1, "stats_release", sample_rate=1.0, noise_multiplier=STATS_SIGMA, steps=1)
    one = plan_privacy(ledger, _cfg(fed.root), released_units=_released_units(tmp_path), release_counts=True)
    assert sigma == pytest.approx(math.sqrt(2) * one.noise_multiplier, rel=0.02)


def test_more_planned_rounds_mean_more_noise_per_round(tmp_path: Path, fed: Fed) -> None:
    ledger = PrivacyLedger.open(tmp_path, delta=DELTA, target_epsilon=TARGET, accountant="rdp")
    three = plan_privacy(ledger, _cfg(fed.root, "privacy.planned_rounds=3"), released_units=100.0)
    ten = plan_privacy(ledger, _cfg(fed.root, "privacy.planned_rounds=10"), released_units=100.0)
    assert three.noise_multiplier < ten.noise_multiplier
    assert three.fits and three.epsilon_after < TARGET


def test_calibration_spreads_the_budget_over_the_planned_rounds(fed: Fed, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(fed.root, "privacy.planned_rounds=3")
    spent, sigmas = [], []
    for r in (1, 2, 3):
        out = _run(fed, cfg, tmp_path, _ins(fed, r, planned=3))
        assert out.status == keys.STATUS_OK
        spent.append(out.metrics[keys.EPSILON])
        sigmas.append(out.metrics[keys.NOISE_MULTIPLIER])
    assert spent[0] < spent[1] < spent[2] <= TARGET
    # The first round left budget for the others: its sigma is larger than the sigma that
    # spends the whole budget in one round.
    assert spent[0] < TARGET - 0.3
    empty = tmp_path / "empty"
    empty.mkdir()
    alone = plan_privacy(PrivacyLedger.open(empty, delta=DELTA, target_epsilon=TARGET, accountant="rdp"),
                         _cfg(fed.root), released_units=_released_units(tmp_path))
    assert sigmas[0] > 1.05 * alone.noise_multiplier
    assert spent[2] >= TARGET - 0.02  # ... and the planned rounds used (almost) all of it
    assert max(sigmas) / min(sigmas) < 1.1
    entries = _entries(tmp_path)
    # the unit total and the per-domain counts are released once (round 1), then re-used
    assert [e["kind"] for e in entries] == ["stats_release", "dpsgd", "stats_release", "dpsgd", "dpsgd"]
    assert entries[-1]["epsilon"] == pytest.approx(_fresh_epsilon(entries), rel=1e-9)
    # A fourth round does not fit: refused before training, ledger untouched.
    before = (tmp_path / LEDGER).read_bytes()
    monkeypatch.setattr(LocalTrainer, "train", lambda *a, **k: pytest.fail("trained over budget"))
    out = _run(fed, cfg, tmp_path, _ins(fed, 4, planned=3))
    assert out.status == keys.STATUS_BUDGET_EXHAUSTED and out.adapter is None
    assert out.metrics[keys.STATUS] == keys.STATUS_BUDGET_EXHAUSTED
    assert out.metrics[keys.EPSILON] == pytest.approx(spent[2], rel=1e-12)
    assert (tmp_path / LEDGER).read_bytes() == before


def test_unreachable_target_is_refused_before_training(fed: Fed, tmp_path: Path, no_training: None) -> None:
    # RDP cannot certify epsilon below ~0.1 at delta = 1e-5, whatever sigma.
    cfg = _cfg(fed.root, "privacy.target_epsilon=0.05")
    PrivacyLedger.open(tmp_path, delta=DELTA, target_epsilon=0.05, accountant="rdp")
    before = (tmp_path / LEDGER).read_bytes()
    out = _run(fed, cfg, tmp_path, _ins(fed))
    assert out.status == keys.STATUS_BUDGET_EXHAUSTED and out.adapter is None
    assert out.message
    assert out.metrics[keys.EPSILON] == 0.0
    assert (tmp_path / LEDGER).read_bytes() == before


def test_round_over_a_nearly_spent_ledger_is_refused(fed: Fed, tmp_path: Path, no_training: None) -> None:
    ledger = PrivacyLedger.open(tmp_path, delta=DELTA, target_epsilon=TARGET, accountant="rdp")
    r = 0
    while ledger.spent_epsilon() < TARGET - 0.3:
        r += 1
        ledger.record(r, "dpsgd", sample_rate=0.05, noise_multiplier=1.0, steps=20)
    assert ledger.spent_epsilon() < TARGET
    before = (tmp_path / LEDGER).read_bytes()
    cfg = _cfg(fed.root, "privacy.noise_multiplier=0.5")  # fixed sigma, too small for what is left
    out = _run(fed, cfg, tmp_path, _ins(fed, r + 1))
    assert out.status == keys.STATUS_BUDGET_EXHAUSTED and out.adapter is None
    assert out.metrics[keys.EPSILON] == pytest.approx(ledger.spent_epsilon(), rel=1e-12)
    assert (tmp_path / LEDGER).read_bytes() == before


# --------------------------------------------------------------------------- reproducibility


def test_dp_off_is_the_plain_trainer(fed: Fed, tmp_path: Path) -> None:
    cfg = _cfg(fed.root, "privacy.enabled=false")
    ins = _ins(fed, 2, seed=5)
    site = _site(fed, tmp_path)
    first = train_round(fed.runtime, site, cfg, ins, fed.start)
    second = train_round(fed.runtime, site, cfg, ins, fed.start)
    other = train_round(fed.runtime, site, cfg, _ins(fed, 2, seed=6), fed.start)
    assert first.status == keys.STATUS_OK
    assert not (tmp_path / LEDGER).exists()
    assert keys.EPSILON not in first.metrics
    # The trainer called directly, from the same adapter with the same round seed.
    fed.runtime.policy(cfg).set_adapter(dict(fed.start))
    data = fed.runtime.hospital_data(site, cfg)
    direct = data.trainer.train(data.train, steps=STEPS, seed=derive_seed(cfg.seed, 5, SITE, 2))
    assert first.adapter is not None and second.adapter is not None and other.adapter is not None
    assert set(first.adapter) == set(direct.adapter)
    assert all(torch.equal(first.adapter[k], direct.adapter[k]) for k in direct.adapter)
    assert all(torch.equal(first.adapter[k], second.adapter[k]) for k in direct.adapter)
    assert not all(torch.equal(first.adapter[k], other.adapter[k]) for k in direct.adapter)
    assert not all(torch.equal(first.adapter[k], fed.start[k]) for k in direct.adapter)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dp_with_seeded_noise_is_reproducible(fed: Fed, tmp_path: Path) -> None:
    cfg = _cfg(fed.root, "privacy.secure_rng=false", FIXED_SIGMA)
    a = _run(fed, cfg, tmp_path / "a", _ins(fed))
    b = _run(fed, cfg, tmp_path / "b", _ins(fed))
    assert a.adapter is not None and b.adapter is not None
    assert _same(a.adapter, b.adapter)
    timing = {keys.ROLLOUT_SECONDS, keys.UPDATE_SECONDS}
    assert {k: v for k, v in a.metrics.items() if k not in timing} == {
        k: v for k, v in b.metrics.items() if k not in timing}
    # The operating system's generator: the same round no longer gives the same adapter.
    c = _run(fed, _cfg(fed.root, "privacy.secure_rng=true", FIXED_SIGMA), tmp_path / "c", _ins(fed))
    assert c.adapter is not None
    assert not _same(a.adapter, c.adapter)


def test_a_round_that_fails_while_training_is_still_charged(fed: Fed, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The spend is on the ledger before training: a failure half-way cannot be retried for free."""
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory half-way through the round")

    monkeypatch.setattr(LocalTrainer, "train", fail)
    with pytest.raises(RuntimeError, match="half-way"):
        _run(fed, _cfg(fed.root, FIXED_SIGMA), tmp_path, _ins(fed))
    entries = _entries(tmp_path)
    assert [e["kind"] for e in entries] == ["stats_release", "dpsgd", "stats_release"]
    assert entries[-1]["epsilon"] == pytest.approx(_fresh_epsilon(entries), rel=1e-9)


def test_rollout_seeds_are_secret_with_the_secure_generator(fed: Fed, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DP with secure_rng the rollouts are not seeded from anything the server knows."""
    seen: list[int] = []
    real_generate = Policy.generate

    def record(self: Policy, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["seed"])
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(Policy, "generate", record)
    cfg = _cfg(fed.root, "privacy.secure_rng=false", FIXED_SIGMA, "train.steps=1")
    _run(fed, cfg, tmp_path / "a", _ins(fed))
    _run(fed, cfg, tmp_path / "b", _ins(fed))
    assert len(seen) == 2 and seen[0] == seen[1]  # seeded simulation: derived from the run seed
    secure = _cfg(fed.root, "privacy.secure_rng=true", FIXED_SIGMA, "train.steps=1")
    _run(fed, secure, tmp_path / "c", _ins(fed))
    _run(fed, secure, tmp_path / "d", _ins(fed))
    assert len(seen) == 4 and len({seen[0], seen[2], seen[3]}) == 3


# --------------------------------------------------------------------------- released statistics


def test_unit_domain_counts_by_hand() -> None:
    """Patient units spanning two domains: every unit has total weight 1, sensitivity 1."""
    domains = ["A", "B", "A", "A", "B", "C", "C"]
    units = [[0, 1], [2], [3, 4, 5], [6]]
    n = unit_domain_counts(domains, units, ["A", "B"])
    # unit [0, 1]: A 1/2, B 1/2; [2]: A 1; [3, 4, 5]: A 1/3, B 1/3 (C not listed); [6]: C only
    np.testing.assert_allclose(n, [0.5 + 1 + 1 / 3, 0.5 + 1 / 3])
    n_all = unit_domain_counts(domains, units, ["A", "B", "C"])
    assert n_all.sum() == pytest.approx(len(units))  # weight 1 per unit
    # Removing any one unit moves n by at most 1 in L2 (the release's sensitivity) ...
    for k in range(len(units)):
        rest = units[:k] + units[k + 1 :]
        assert np.linalg.norm(n_all - unit_domain_counts(domains, rest, ["A", "B", "C"])) <= 1 + 1e-12
    # ... and the bound is reached by a one-record unit.
    assert np.linalg.norm(unit_domain_counts(["A"], [[0]], ["A"])) == pytest.approx(1.0)


@pytest.mark.parametrize("unit", ["record", "patient"])
def test_counts_are_released_once_from_the_whole_training_split(
    fed: Fed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unit: str
) -> None:
    releases: list[dict[str, Any]] = []
    real_release = privacy_round.gaussian_release

    def release(values: np.ndarray, **kwargs: Any) -> np.ndarray:
        out = real_release(values, **kwargs)
        releases.append(dict(values=np.array(values, copy=True), out=out, **kwargs))
        return out

    monkeypatch.setattr(privacy_round, "gaussian_release", release)
    cfg = _cfg(fed.root, f"privacy.unit={unit}", FIXED_SIGMA, "privacy.target_epsilon=20", "privacy.planned_rounds=2")
    first = _run(fed, cfg, tmp_path, _ins(fed, 1, planned=2))
    second = _run(fed, cfg, tmp_path, _ins(fed, 2, planned=2))
    assert first.status == second.status == keys.STATUS_OK
    assert len(releases) == 2  # the number of units and the counts, each released once ...
    size, rel = releases
    np.testing.assert_array_equal(size["values"], [len(privacy_units(fed.train, unit))])
    # ... from every unit of the training split (not the units a round happened to sample),
    units = privacy_units(fed.train, unit)
    exact = unit_domain_counts([r.domain for r in fed.train], units, fed.names)
    np.testing.assert_array_equal(rel["values"], exact)
    assert rel["values"].sum() == pytest.approx(len(units))
    assert rel["l2_sensitivity"] == 1.0 and rel["noise_multiplier"] == STATS_SIGMA
    # ... and only the noised vector is ever sent, the same in both rounds.
    assert first.metrics[keys.D_COUNT] == second.metrics[keys.D_COUNT] == [float(x) for x in rel["out"]]
    assert not np.allclose(rel["out"], exact)
    assert [e["kind"] for e in _entries(tmp_path)] == ["stats_release", "dpsgd", "stats_release", "dpsgd"]
    allowed = {keys.STATUS, keys.LOCAL_STEPS, keys.EPSILON, keys.DELTA,
               keys.NOISE_MULTIPLIER, keys.SAMPLE_RATE, keys.D_COUNT, keys.NUM_EXAMPLES}
    assert set(first.metrics) <= allowed  # no training reward, no exact count, no timing under DP
    assert first.metrics[keys.NUM_EXAMPLES] == max(round(float(np.clip(rel["out"], 0, None).sum())), 0)


@pytest.mark.parametrize("case", ["stats_off", "no_domain_names"])
def test_nothing_exact_is_sent_without_a_stats_release(fed: Fed, tmp_path: Path, case: str) -> None:
    cfg = _cfg(fed.root, FIXED_SIGMA, *(["privacy.stats_release=none"] if case == "stats_off" else []))
    out = _run(fed, cfg, tmp_path, _ins(fed, names=fed.names if case == "stats_off" else []))
    assert out.status == keys.STATUS_OK
    assert out.metrics[keys.NUM_EXAMPLES] == 0
    for key in (keys.D_COUNT, keys.REWARD_MEAN):
        assert key not in out.metrics
    assert [e["kind"] for e in _entries(tmp_path)] == ["stats_release", "dpsgd"]  # N^ for q only
