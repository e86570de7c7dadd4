"""A hospital's DP round (client.rounds, client.privacy_round): the privacy plan, the ledger,
budget refusal, reproducibility, the statistics it releases (client.stats), what a reply may
carry, DP evaluation, and what a server cannot make a hospital spend."""

from __future__ import annotations

import dataclasses
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
from client.privacy_round import plan_privacy
from client.rounds import Instruction, train_round
from client.runtime import HospitalData, Runtime
from client.site import Site
from client.stats import unit_domain_counts
from client.trainer import DomainEval, LocalResult, LocalTrainer, privacy_units
from common import keys
from common.config import ConfigError, FedClimbConfig, HospitalConfig, PrivacyConfig, load_config, load_hospital_config
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


# --------------------------------------------------------------------------- what a reply depends on


class _Split(Runtime):
    """The fixture's runtime with the hospital's records replaced (neighbouring datasets)."""

    def __init__(self, base: Runtime, train: list[Any] | None = None, evaluation: list[Any] | None = None) -> None:
        super().__init__()
        self.base, self.train, self.evaluation = base, train, evaluation

    def policy(self, cfg: FedClimbConfig) -> Policy:
        return self.base.policy(cfg)

    def hospital_data(self, site: Site, cfg: FedClimbConfig) -> HospitalData:
        data = self.base.hospital_data(site, cfg)
        return HospitalData(data.trainer, data.train if self.train is None else self.train,
                            data.evaluation if self.evaluation is None else self.evaluation)


@pytest.fixture()
def trained_with(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace training by a stub that records the DPSettings it was given."""
    seen: list[Any] = []

    def train(self: LocalTrainer, records: Any, *, steps: int, dp: Any = None, **kwargs: Any) -> LocalResult:
        seen.append(dp)
        return LocalResult(adapter={}, steps=steps, domain_stats={}, rollout_s=12.5, update_s=3.25,
                           units=[[i] for i in range(len(records))])

    monkeypatch.setattr(LocalTrainer, "train", train)
    return seen


@pytest.fixture()
def pinned_unit_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """The released number of units comes out as 50 whatever the data (same noise draw)."""
    real = privacy_round.gaussian_release

    def release(values: np.ndarray, **kwargs: Any) -> np.ndarray:
        return np.array([50.0]) if np.shape(values) == (1,) else real(values, **kwargs)

    monkeypatch.setattr(privacy_round, "gaussian_release", release)


def test_neighbouring_datasets_send_the_same_sample_rate_and_divisor(
    fed: Fed, tmp_path: Path, trained_with: list[Any], pinned_unit_release: None
) -> None:
    """N and N - 1 units: q, sigma and the DP-SGD divisor depend on N only through its release."""
    cfg = _cfg(fed.root, "privacy.planned_rounds=4")
    sent = []
    for name, train in (("n", fed.train), ("n-1", fed.train[:-1])):
        out = train_round(_Split(fed.runtime, train), _site(fed, tmp_path / name), cfg, _ins(fed), fed.start)
        assert out.status == keys.STATUS_OK
        sent.append(out.metrics)
    assert sent[0][keys.SAMPLE_RATE] == sent[1][keys.SAMPLE_RATE] == BATCH / 50.0
    assert sent[0][keys.NOISE_MULTIPLIER] == sent[1][keys.NOISE_MULTIPLIER]
    assert sent[0][keys.EPSILON] == sent[1][keys.EPSILON]
    first, second = trained_with
    assert first.sample_rate == second.sample_rate == BATCH / 50.0
    # the update is divided by q * N^ = batch_prompts, not by q * N
    assert first.expected_batch_size == second.expected_batch_size == pytest.approx(BATCH)


def test_the_dp_step_divides_by_the_given_expected_batch_size() -> None:
    """DPUpdater.finish_step: the same sum gives the same update whatever the exact N."""
    from client.dp_step import DPSettings, DPUpdater

    grads = []
    for num_units in (10, 11):
        updater = DPUpdater.__new__(DPUpdater)
        param = torch.nn.Parameter(torch.zeros(3))
        updater.params = [param]
        updater.module = type("Hooks", (), {"disable_hooks": lambda self: None})()
        updater._sum, updater._clipped, updater._num_units = [torch.tensor([2.0, 4.0, 6.0])], 0, num_units
        updater._noise = None  # nothing drawn ahead: finish_step draws inline
        dp = DPSettings(1e-12, 0.5, 1.0, "record", expected_batch_size=4.0)
        updater.finish_step(torch.optim.SGD([param], lr=1.0), dp)
        grads.append(param.detach().clone())
    torch.testing.assert_close(grads[0], torch.tensor([-0.5, -1.0, -1.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_no_timing_or_other_unreleased_number_is_sent_under_dp(fed: Fed, tmp_path: Path,
                                                               trained_with: list[Any]) -> None:
    out = _run(fed, _cfg(fed.root, FIXED_SIGMA), tmp_path / "dp", _ins(fed))
    assert out.status == keys.STATUS_OK
    assert keys.ROLLOUT_SECONDS not in out.metrics and keys.UPDATE_SECONDS not in out.metrics
    assert set(out.metrics) <= privacy_round.DP_TRAIN_KEYS
    assert out.metrics[keys.LOCAL_STEPS] == STEPS
    # The hospital itself still sees them (its log, benchmarks): on the outcome, not the reply.
    assert out.local["rollout_s"] == 12.5 and out.local["update_s"] == 3.25
    plain = _run(fed, _cfg(fed.root, "privacy.enabled=false"), tmp_path / "plain", _ins(fed))
    assert plain.metrics[keys.ROLLOUT_SECONDS] == 12.5 and plain.metrics[keys.UPDATE_SECONDS] == 3.25


def test_round_one_charges_two_different_releases_once_each(fed: Fed, tmp_path: Path, trained_with: list[Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The two ``stats_release`` entries of a hospital's first round are two statistics, not one twice.

    Entry 1 (before ``dpsgd``): the number of units N, released once per training split; q
    and the DP-SGD divisor of every later round reuse that value. Entry 2 (after ``dpsgd``):
    the per-domain counts n_d, released once per domain name. Both are charged; since
    sum(n_d) = N, the accountant composes both, which covers combining them. A second
    hospital process on the same state (a restart) and a second round release nothing.
    """
    releases: list[np.ndarray] = []
    real = privacy_round.gaussian_release

    def release(values: np.ndarray, **kwargs: Any) -> np.ndarray:
        releases.append(np.array(values, copy=True))
        return real(values, **kwargs)

    monkeypatch.setattr(privacy_round, "gaussian_release", release)
    cfg = _cfg(fed.root, FIXED_SIGMA, "privacy.planned_rounds=3", "privacy.target_epsilon=20")
    first = _run(fed, cfg, tmp_path, _ins(fed, 1, planned=3))
    restarted = Runtime()  # a new hospital process: only the state directory carries over
    second = train_round(restarted, _site(fed, tmp_path), cfg, _ins(fed, 2, planned=3), fed.start)
    assert first.status == second.status == keys.STATUS_OK

    units = privacy_units(fed.train, "record")
    assert [v.tolist() for v in releases] == [
        [float(len(units))], unit_domain_counts([r.domain for r in fed.train], units, fed.names).tolist()]
    entries = _entries(tmp_path)
    assert [(e["round"], e["kind"]) for e in entries] == [(1, "stats_release"), (1, "dpsgd"), (1, "stats_release"),
                                                          (2, "dpsgd")]
    for e in (entries[0], entries[2]):
        assert (e["sample_rate"], e["noise_multiplier"], e["steps"]) == (1.0, STATS_SIGMA, 1)
    n_hat = _released_units(tmp_path)
    assert first.metrics[keys.SAMPLE_RATE] == second.metrics[keys.SAMPLE_RATE] == min(1.0, BATCH / max(n_hat, 1.0))
    assert [dp.expected_batch_size for dp in trained_with] == [pytest.approx(BATCH)] * 2  # q * N^, the same N^
    assert first.metrics[keys.D_COUNT] == second.metrics[keys.D_COUNT]


# --------------------------------------------------------------------------- what a server can make a hospital spend


def test_reordered_domain_names_reuse_the_release(fed: Fed, tmp_path: Path, trained_with: list[Any]) -> None:
    cfg = _cfg(fed.root, FIXED_SIGMA, "privacy.planned_rounds=3", "privacy.target_epsilon=20")
    first = _run(fed, cfg, tmp_path, _ins(fed, 1))
    second = _run(fed, cfg, tmp_path, _ins(fed, 2, names=fed.names[::-1]))
    assert first.status == second.status == keys.STATUS_OK
    assert second.metrics[keys.D_COUNT] == first.metrics[keys.D_COUNT][::-1]
    assert [e["kind"] for e in _entries(tmp_path)] == ["stats_release", "dpsgd", "stats_release", "dpsgd"]
    # A name not released yet is released on its own; the others are re-sent as they were.
    third = _run(fed, cfg, tmp_path, _ins(fed, 3, names=[*fed.names, "new_domain"]))
    assert third.metrics[keys.D_COUNT][:-1] == first.metrics[keys.D_COUNT]
    assert [e["kind"] for e in _entries(tmp_path)][-2:] == ["dpsgd", "stats_release"]


def test_dp_needs_the_hospitals_planned_rounds(fed: Fed, tmp_path: Path) -> None:
    path = tmp_path / "hospital.yaml"
    path.write_text("name: h\ndata_root: d\nstate_dir: s\nprivacy:\n  enabled: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"hospital.yaml: privacy\.planned_rounds: is required"):
        load_hospital_config(path)
    path.write_text("name: h\ndata_root: d\nstate_dir: s\nprivacy:\n  planned_rounds: 5\n", encoding="utf-8")
    assert load_hospital_config(path).privacy.planned_rounds == 5
    path.write_text("name: h\ndata_root: d\nstate_dir: s\nprivacy:\n  enabled: false\n", encoding="utf-8")
    assert not load_hospital_config(path).privacy.enabled  # without DP nothing is planned


@pytest.mark.parametrize("announced", [1, 1000])
def test_a_server_cannot_set_the_number_of_rounds_the_budget_lasts(fed: Fed, tmp_path: Path,
                                                                   trained_with: list[Any], announced: int) -> None:
    # Without the hospital's own number, nothing runs, whatever the server announces.
    with pytest.raises(ConfigError, match=r"privacy\.planned_rounds"):
        _run(fed, _cfg(fed.root, "privacy.planned_rounds=0"), tmp_path / "unset", _ins(fed, planned=announced))
    assert not (tmp_path / "unset" / LEDGER).exists()
    # With it, the announcement changes nothing: sigma and the spend are the hospital's.
    cfg = _cfg(fed.root, "privacy.planned_rounds=2", "privacy.secure_rng=false")
    out = _run(fed, cfg, tmp_path / "set", _ins(fed, planned=announced))
    reference = _run(fed, cfg, tmp_path / "reference", _ins(fed, planned=2))
    assert out.metrics[keys.NOISE_MULTIPLIER] == reference.metrics[keys.NOISE_MULTIPLIER]
    assert out.metrics[keys.EPSILON] == reference.metrics[keys.EPSILON] < TARGET - 0.2  # 1 of 2 rounds
    _run(fed, cfg, tmp_path / "set", _ins(fed, 2, planned=announced))
    third = _run(fed, cfg, tmp_path / "set", _ins(fed, 3, planned=announced))
    assert third.status == keys.STATUS_BUDGET_EXHAUSTED  # the hospital's 2 rounds have run


# --------------------------------------------------------------------------- patient units


def _with_patients(records: list[Any], ids: list[str | None]) -> list[Any]:
    return [dataclasses.replace(r, patient_id=p) for r, p in zip(records, ids, strict=True)]


@pytest.mark.parametrize("problem", ["missing_id", "both_splits"])
@pytest.mark.parametrize("phase", ["train", "evaluate"])
def test_patient_units_refuse_ambiguous_patients(fed: Fed, tmp_path: Path, problem: str, phase: str) -> None:
    data = fed.runtime.hospital_data(_site(fed, tmp_path / "probe"), _cfg(fed.root))
    train = _with_patients(data.train, [f"t{i}" for i in range(len(data.train))])
    evaluation = _with_patients(data.evaluation, [f"e{i}" for i in range(len(data.evaluation))])
    if problem == "missing_id":
        train[3] = dataclasses.replace(train[3], patient_id=None)
    else:
        evaluation[0] = dataclasses.replace(evaluation[0], patient_id=train[5].patient_id)
    runtime = _Split(fed.runtime, train, evaluation)
    site = _site(fed, tmp_path / "state")
    match = "no patient_id" if problem == "missing_id" else "both the training and the evaluation split"
    for release in ("dp", "exact"):
        cfg = _cfg(fed.root, "privacy.unit=patient", FIXED_SIGMA, f"privacy.eval_release={release}")
        with pytest.raises(privacy_round.PrivacyUnitError, match=match):
            (train_round if phase == "train" else rounds.evaluate_round)(runtime, site, cfg, _ins(fed), fed.start)
    assert not (tmp_path / "state" / LEDGER).exists()  # refused before anything ran
    # Record units do not need patients.
    cfg = _cfg(fed.root, "privacy.unit=record", FIXED_SIGMA, "privacy.eval_release=exact", "train.steps=1")
    out = (train_round if phase == "train" else rounds.evaluate_round)(runtime, site, cfg, _ins(fed), fed.start)
    assert out.status == keys.STATUS_OK


# --------------------------------------------------------------------------- evaluation under DP


def test_evaluation_is_released_with_noise_and_charged_by_default(fed: Fed, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert PrivacyConfig().eval_release == "dp"  # the default: exact release needs an opt-in
    captured: list[Any] = []
    real = privacy_round.release_eval_sums

    def release(units: np.ndarray, sums: list[np.ndarray], **kwargs: Any) -> Any:
        out = real(units, sums, **kwargs)
        captured.append((np.array(units), [np.array(s) for s in sums], out, kwargs))
        return out

    monkeypatch.setattr(privacy_round, "release_eval_sums", release)
    cfg = _cfg(fed.root, "privacy.eval_release=dp", "privacy.eval_noise_multiplier=3.0", "privacy.planned_rounds=1")
    site = _site(fed, tmp_path)
    out = rounds.evaluate_round(fed.runtime, site, cfg, _ins(fed), fed.start)
    assert out.status == keys.STATUS_OK
    assert set(out.metrics) == privacy_round.DP_EVAL_KEYS  # nothing exact: no records, no rates
    entries = _entries(tmp_path)
    assert [(e["kind"], e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries] == [
        ("eval_release", 3.0, 1.0, 1)]
    # The exact sums are the record-weighted exact metrics (record units: weight 1 each).
    exact = rounds.evaluate_round(fed.runtime, site, _cfg(fed.root, "privacy.eval_release=exact"), _ins(fed),
                                  fed.start).metrics
    units, sums, (noisy_units, noisy_sums), kwargs = captured[0]
    np.testing.assert_allclose(units, exact[keys.E_RECORDS])
    for s, key in zip(sums, (keys.E_ACCURACY, keys.E_MEAN_REWARD, keys.E_FORMAT_RATE), strict=True):
        np.testing.assert_allclose(s, np.array(exact[key]) * np.array(exact[keys.E_RECORDS]), atol=1e-9)
    assert kwargs["noise_multiplier"] == 3.0
    assert out.metrics[keys.E_DP_UNITS] == [float(x) for x in noisy_units]
    assert out.metrics[keys.E_DP_REWARD_SUM] == [float(x) for x in noisy_sums[1]]
    assert not np.allclose(noisy_units, units)
    assert len(_entries(tmp_path)) == 1  # the opted-in exact evaluation is not charged


def test_evaluations_past_the_plan_are_refused(fed: Fed, tmp_path: Path) -> None:
    cfg = _cfg(fed.root, "privacy.eval_release=dp", "privacy.planned_evaluations=1", "rollout.eval_batch_prompts=64")
    first = rounds.evaluate_round(fed.runtime, _site(fed, tmp_path), cfg, _ins(fed), fed.start)
    second = rounds.evaluate_round(fed.runtime, _site(fed, tmp_path), cfg, _ins(fed, 2), fed.start)
    assert first.status == keys.STATUS_OK
    assert second.status == keys.STATUS_BUDGET_EXHAUSTED
    assert set(second.metrics) == {keys.STATUS, keys.EPSILON, keys.DELTA, keys.NUM_EXAMPLES}
    assert [e["kind"] for e in _entries(tmp_path)] == ["eval_release"]


def test_the_plan_reserves_budget_for_the_planned_evaluations(fed: Fed, tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, delta=DELTA, target_epsilon=TARGET, accountant="rdp")
    words = ("privacy.planned_rounds=2", "privacy.eval_noise_multiplier=3")
    exact = plan_privacy(ledger, _cfg(fed.root, *words, "privacy.eval_release=exact"), released_units=100.0)
    noisy = plan_privacy(ledger, _cfg(fed.root, *words, "privacy.eval_release=dp"), released_units=100.0)
    assert noisy.noise_multiplier > 1.05 * exact.noise_multiplier
    # Two rounds at that sigma plus the 3 planned evaluations (rounds + 1) end within the target.
    total = ledger.epsilon_if([(noisy.effective_noise_multiplier, noisy.sample_rate, noisy.steps * 2),
                               (3.0, 1.0, 3)])
    assert TARGET - 0.02 <= total <= TARGET


def test_unit_weighted_eval_sums_by_hand(fed: Fed) -> None:
    """A patient of m records weighs 1/m per record: one unit adds at most 1 everywhere."""
    records = [dataclasses.replace(fed.train[0], id=f"r{i}", domain=d, patient_id=p)
               for i, (d, p) in enumerate([("A", "p1"), ("B", "p1"), ("A", "p2"), ("A", "p3"), ("B", "p3"),
                                           ("A", "p3")])]
    groups: list[list[str]] = []

    def evaluate(group: list[Any]) -> dict[str, DomainEval]:
        groups.append([r.id for r in group])
        out = {}
        for d in sorted({r.domain for r in group}):
            n = sum(r.domain == d for r in group)
            out[d] = DomainEval(records=n, balanced_accuracy=0.0, macro_f1=0.0, mean_iou=0.0,
                                format_rate=1.0, mean_reward=1.5, accuracy=0.5)  # reward clipped to 1
        return out

    units, (acc, reward, fmt) = privacy_round.unit_weighted_eval_sums(evaluate, records, "patient", ["A", "B"])
    assert sorted(map(sorted, groups)) == [["r0", "r1"], ["r2"], ["r3", "r4", "r5"]]  # grouped by m
    # p1 (m=2): A 1/2, B 1/2; p2 (m=1): A 1; p3 (m=3): A 2/3, B 1/3
    np.testing.assert_allclose(units, [0.5 + 1 + 2 / 3, 0.5 + 1 / 3])
    np.testing.assert_allclose(acc, 0.5 * units)
    np.testing.assert_allclose(reward, units)
    np.testing.assert_allclose(fmt, units)
    assert units.sum() == pytest.approx(3.0)  # one per patient


@pytest.mark.parametrize("release", ["exact", "none"])
def test_an_evaluation_before_the_first_round_is_no_trace_of_a_lost_ledger(
        fed: Fed, tmp_path: Path, release: str, caplog: pytest.LogCaptureFixture) -> None:
    """A DP hospital's first instruction may be an evaluation released exactly (or withheld).
    It leaves the audit log and the evaluation count behind (the ClientApp writes them);
    the first training round must not then warn that files exist without a ledger."""
    cfg = _cfg(fed.root, f"privacy.eval_release={release}", FIXED_SIGMA)
    site = _site(fed, tmp_path)
    assert rounds.evaluate_round(fed.runtime, site, cfg, _ins(fed, 0), fed.start).status == keys.STATUS_OK
    assert (tmp_path / LEDGER).is_file() and _entries(tmp_path) == []  # created, nothing charged
    (tmp_path / "audit.jsonl").write_text('{"kind": "evaluate", "round": 0}\n', encoding="utf-8")
    (tmp_path / "evaluations.json").write_text('{"total": 1}', encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert _run(fed, cfg, tmp_path, _ins(fed)).status == keys.STATUS_OK
    assert not [r for r in caplog.records if "no privacy_ledger.json" in r.getMessage()]
    assert "dpsgd" in {e["kind"] for e in _entries(tmp_path)}


def test_a_dp_evaluation_with_no_domains_still_opens_the_ledger(fed: Fed, tmp_path: Path) -> None:
    """Nothing to release (no domain names) spends nothing, but the ledger exists after it,
    as after every other DP evaluation."""
    cfg = _cfg(fed.root, "privacy.eval_release=dp")
    out = rounds.evaluate_round(fed.runtime, _site(fed, tmp_path), cfg, _ins(fed, 0, names=[]), fed.start)
    assert out.status == keys.STATUS_OK and out.metrics[keys.NUM_EXAMPLES] == 0
    assert (tmp_path / LEDGER).is_file() and _entries(tmp_path) == []
