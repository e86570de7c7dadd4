"""The privacy decisions of a hospital's round, in one place (no training in here).

A DP round asks this module, in order: may it run (budget, planned rounds, privacy units),
with which mechanism (noise multiplier, sample rate, divisor), what it releases and charges
to the ledger, and which numbers the reply may carry. client/rounds.py calls
:func:`begin_train` before training, :func:`train_metrics` after it, and
:func:`evaluate_release` for an evaluation under DP.

Nothing sent under DP depends on an exact private count: the number of units N enters
the sample rate q and the DP-SGD divisor q * N only as its DP-released value (released
once per training split, charged to the ledger); per-domain counts are released once per
domain name; evaluation results are released as noisy sums, one charged release per
evaluation, unless the hospital opted in to exact release. What a DP reply may carry is
the whitelists :data:`DP_TRAIN_KEYS` and :data:`DP_EVAL_KEYS` (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.dp_step import DPSettings
from client.site import Site
from client.stats import ReleasedCounts, fingerprint, load_released, save_released, unit_domain_counts
from client.trainer import DomainEval, privacy_units
from common import keys
from common.climb.records import Record
from common.config import FedClimbConfig, PrivacyConfig, require_planned_rounds
from common.privacy.accounting import (
    PrivacyAccountingError,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
)
from common.privacy.ledger import PrivacyLedger
from common.privacy.noise import NoiseSource
from common.privacy.release import gaussian_release, release_eval_sums
from common.seeding import derive_seed, secret_seed

__all__ = [
    "DP_EVAL_KEYS",
    "DP_TRAIN_KEYS",
    "PrivacyPlan",
    "PrivacyUnitError",
    "Refused",
    "TrainPrivacy",
    "begin_train",
    "check_patient_units",
    "dp_settings",
    "noise_source",
    "open_ledger",
    "evaluate_release",
    "evaluation_withheld",
    "plan_privacy",
    "planned_evaluations",
    "train_metrics",
    "unit_weighted_eval_sums",
]

#: Everything a train reply may carry under DP (client_app adds the simulation-only
#: partition id). No timing, no exact count, no training reward.
DP_TRAIN_KEYS = frozenset({
    keys.STATUS, keys.NUM_EXAMPLES, keys.LOCAL_STEPS, keys.EPSILON, keys.DELTA, keys.NOISE_MULTIPLIER,
    keys.SAMPLE_RATE, keys.D_COUNT,
})
#: Everything an evaluate reply may carry under DP with ``privacy.eval_release: dp``.
DP_EVAL_KEYS = frozenset({keys.STATUS, keys.NUM_EXAMPLES, *keys.EVAL_DP_PER_DOMAIN})


class PrivacyUnitError(ValueError):
    """The records cannot be grouped into the configured privacy units."""


@dataclass
class PrivacyPlan:
    """The DP mechanisms of one round and what the ledger will say after them."""

    noise_multiplier: float  # per noisy update
    effective_noise_multiplier: float  # per sampled step (ppo_epochs composed)
    sample_rate: float
    # The divisor of the noisy gradient sum: q * the DP-released number of units.
    expected_batch_size: float
    steps: int
    # The one-off release of per-domain unit counts, if this round makes it.
    stats_noise_multiplier: float | None
    epsilon_after: float
    fits: bool
    reason: str = ""


@dataclass
class Refused:
    """A round that must not run: the reason (hospital log) and the reply's metrics."""

    reason: str
    metrics: dict[str, Any]


@dataclass
class TrainPrivacy:
    """A DP train round that was planned and charged: what training and the reply need."""

    ledger: PrivacyLedger
    plan: PrivacyPlan
    released: ReleasedCounts


def evaluation_withheld(p: PrivacyConfig) -> bool:
    """Under DP with ``eval_release: none`` an evaluation sends nothing (and so counts for nothing)."""
    return p.enabled and p.eval_release == "none"


def planned_evaluations(p: PrivacyConfig) -> int:
    """Evaluations the budget pays for: ``privacy.planned_evaluations`` or rounds + 1."""
    return p.planned_evaluations or p.planned_rounds + 1


def _count(ledger: PrivacyLedger, kind: str) -> int:
    return sum(1 for e in ledger.entries() if e.get("kind") == kind)


def plan_privacy(
    ledger: PrivacyLedger, cfg: FedClimbConfig, *, released_units: float, release_counts: bool = False
) -> PrivacyPlan:
    """Decide sigma, q and the divisor of this round and check the budget before training.

    Only the hospital's settings, its ledger and the DP-released number of units
    ``released_units`` go in: never the exact number of units, never a number the server
    sent. q is ``privacy.sample_rate`` or ``rollout.batch_prompts / N^`` (at most 1) and the
    divisor is q * N^, with N^ = max(released_units, 1). The noise multiplier is calibrated
    so that this round, the rest of the hospital's ``privacy.planned_rounds`` and the
    evaluations still planned under ``eval_release: dp`` together end at the target;
    ``release_counts`` adds a release of per-domain counts to this round.

    Raises
    ------
    ConfigError
        If DP is on and ``privacy.planned_rounds`` is not set.
    """
    p = cfg.privacy
    require_planned_rounds(p)
    steps = cfg.train.steps
    epochs = cfg.train.ppo_epochs
    n_hat = max(float(released_units), 1.0)
    q = p.sample_rate or min(1.0, cfg.rollout.batch_prompts / n_hat)
    divisor = q * n_hat
    stats_sigma = p.stats_noise_multiplier if release_counts else None
    extra = [(stats_sigma, 1.0, 1)] if stats_sigma else []
    evals_left = planned_evaluations(p) - _count(ledger, "eval_release") if p.eval_release == "dp" else 0
    reserve = [(p.eval_noise_multiplier, 1.0, evals_left)] if evals_left > 0 else []
    done = _count(ledger, "dpsgd")
    planned = p.planned_rounds
    rounds_left = max(1, planned - done)
    spent = ledger.spent_epsilon()
    if p.noise_multiplier > 0:
        sigma = p.noise_multiplier
    elif done >= planned:
        # The budget was calibrated to last `planned` rounds and they have run; what is left
        # would only buy rounds of pure noise.
        return PrivacyPlan(0.0, 0.0, q, divisor, steps, stats_sigma, spent, False,
                           f"the {planned} planned round(s) have run (spent {spent:.3f} of {p.target_epsilon}); "
                           "raise privacy.planned_rounds and privacy.target_epsilon to train more")
    else:
        try:
            sigma_eff = calibrate_noise_multiplier(
                target_epsilon=p.target_epsilon,
                delta=p.delta,
                sample_rate=q,
                steps=steps * rounds_left,
                accountant=p.accountant,
                spent_history=list(ledger.history()) + extra + reserve,
            )
        except PrivacyAccountingError as exc:
            why = str(exc)
            if reserve:
                why += (f" (with {evals_left} planned evaluation release(s) at privacy.eval_noise_multiplier="
                        f"{p.eval_noise_multiplier} reserved)")
            return PrivacyPlan(0.0, 0.0, q, divisor, steps, stats_sigma, spent, False, why)
        sigma = sigma_eff * math.sqrt(epochs)
    sigma_eff = effective_noise_multiplier(sigma, ppo_epochs=epochs)
    eps_after = ledger.epsilon_if([(sigma_eff, q, steps), *extra])
    fits = eps_after <= p.target_epsilon * (1 + 1e-9)
    reason = "" if fits else (
        f"this round would bring epsilon to {eps_after:.3f}, above the target {p.target_epsilon} "
        f"(spent {spent:.3f} at delta={p.delta})"
    )
    return PrivacyPlan(sigma, sigma_eff, q, divisor, steps, stats_sigma, eps_after, fits, reason)


# ------------------------------------------------------------------------- privacy units


def check_patient_units(train: Sequence[Record], evaluation: Sequence[Record]) -> None:
    """Under patient units every record names its patient, and no patient is in both splits.

    A record without ``patient_id`` would silently become a unit of its own (a patient's
    other records would then count as other people), and a patient in both splits would
    reach the server through the evaluation as well as through training.

    Raises
    ------
    PrivacyUnitError
        Naming how many records lack an id or how many patients are in both splits.
    """
    missing = sum(1 for r in (*train, *evaluation) if r.patient_id is None)
    if missing:
        raise PrivacyUnitError(
            f"privacy.unit is patient but {missing} record(s) have no patient_id; add patient_id to every "
            "record of the training and evaluation splits, or set privacy.unit: record"
        )
    both = {r.patient_id for r in train} & {r.patient_id for r in evaluation}
    if both:
        raise PrivacyUnitError(
            f"privacy.unit is patient but {len(both)} patient(s) have records in both the training and the "
            "evaluation split; split the data by patient (train_split / eval_split)"
        )


def noise_source(cfg: FedClimbConfig, seed: int, what: str) -> NoiseSource:
    """The randomness of one mechanism (ChaCha20, common/privacy/noise.py).

    Keyed from os.urandom with ``privacy.secure_rng``; else derived from the round seed and
    ``what`` (reproducible simulations: whoever knows the seed can subtract the noise).
    """
    return NoiseSource.secure() if cfg.privacy.secure_rng else NoiseSource.from_seed(derive_seed(seed, what))


def dp_settings(tp: TrainPrivacy, cfg: FedClimbConfig, seed: int) -> DPSettings:
    """The DP-SGD mechanism of a planned round: sigma, q, the divisor, clipping, its noise source."""
    plan, p = tp.plan, cfg.privacy
    return DPSettings(plan.noise_multiplier, plan.sample_rate, p.max_grad_norm, p.unit,
                      noise_source(cfg, seed, "dp-noise"), secret_seed() if p.secure_rng else None,
                      expected_batch_size=plan.expected_batch_size)


def open_ledger(site: Site, cfg: FedClimbConfig) -> PrivacyLedger:
    """The hospital's privacy ledger, verified (created in a fresh state directory)."""
    p = cfg.privacy
    return PrivacyLedger.open(site.state_dir, delta=p.delta, target_epsilon=p.target_epsilon, accountant=p.accountant)


def _exhausted(ledger: PrivacyLedger, cfg: FedClimbConfig, reason: str) -> Refused:
    return Refused(reason, {keys.STATUS: keys.STATUS_BUDGET_EXHAUSTED, keys.EPSILON: ledger.spent_epsilon(),
                            keys.DELTA: cfg.privacy.delta})


# ------------------------------------------------------------------------- training


def begin_train(
    site: Site, cfg: FedClimbConfig, server_round: int, domain_names: Sequence[str],
    train: Sequence[Record], evaluation: Sequence[Record], seed: int,
) -> TrainPrivacy | Refused:
    """Everything a DP train round decides before training, in order.

    1. The hospital's planned rounds are set; patient units are well formed.
    2. The number of units N is DP-released once per training split (charged).
    3. The round is planned from N^ (:func:`plan_privacy`); over budget it is refused.
    4. The round is charged (``dpsgd``) before training: a round that fails half-way has
       run part of the mechanism.
    5. Per-domain counts of names not released yet are released (charged) and stored by name.
    """
    p = cfg.privacy
    require_planned_rounds(p)
    if p.unit == "patient":
        check_patient_units(train, evaluation)
    ledger = open_ledger(site, cfg)
    units = privacy_units(train, p.unit)
    released = load_released(site.state_dir, fingerprint([r.id for r in train], p.unit))
    rng = noise_source(cfg, seed, "stats")
    if released.units is None:
        if ledger.epsilon_if([(p.stats_noise_multiplier, 1.0, 1)]) > p.target_epsilon:
            return _exhausted(ledger, cfg, "no budget left to release the number of privacy units")
        ledger.record(round=server_round, kind="stats_release", sample_rate=1.0,
                      noise_multiplier=p.stats_noise_multiplier, steps=1)
        noisy = gaussian_release(np.array([float(len(units))]), l2_sensitivity=1.0,
                                 noise_multiplier=p.stats_noise_multiplier, rng=rng)
        released.units = float(noisy[0])
        save_released(site.state_dir, released)
    n_hat = max(released.units, 1.0)
    if p.delta >= 1.0 / n_hat:
        raise ValueError(
            f"privacy.delta={p.delta} is not below 1/N for the (DP-released) N = {n_hat:.0f} privacy units; "
            f"set it to at most {0.1 / n_hat:.1e}"
        )
    new = released.missing(domain_names) if p.stats_release == "dp" else []
    plan = plan_privacy(ledger, cfg, released_units=released.units, release_counts=bool(new))
    if not plan.fits:
        return _exhausted(ledger, cfg, plan.reason)
    ledger.record(round=server_round, kind="dpsgd", sample_rate=plan.sample_rate,
                  noise_multiplier=plan.effective_noise_multiplier, steps=plan.steps)
    if new and plan.stats_noise_multiplier is not None:
        exact = unit_domain_counts([r.domain for r in train], units, new)
        ledger.record(round=server_round, kind="stats_release", sample_rate=1.0,
                      noise_multiplier=plan.stats_noise_multiplier, steps=1)
        noisy = gaussian_release(exact, l2_sensitivity=1.0, noise_multiplier=plan.stats_noise_multiplier, rng=rng)
        released.counts.update({d: float(x) for d, x in zip(new, noisy, strict=True)})
        save_released(site.state_dir, released)
    return TrainPrivacy(ledger, plan, released)


def _released_total(noisy: Any) -> int:
    """``num-examples`` from released per-domain values: their sum, negatives counted as 0."""
    return max(int(round(float(np.clip(noisy, 0, None).sum()))), 0)


def _only(metrics: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    extra = sorted(set(metrics) - allowed)
    if extra:
        raise RuntimeError(f"refusing to send {extra} under DP: not DP-released")
    return metrics


def train_metrics(tp: TrainPrivacy, cfg: FedClimbConfig, domain_names: Sequence[str]) -> dict[str, Any]:
    """The reply of a DP train round: released values and the mechanism's public settings only."""
    plan = tp.plan
    metrics: dict[str, Any] = {
        keys.STATUS: keys.STATUS_OK,
        keys.LOCAL_STEPS: plan.steps,
        keys.EPSILON: tp.ledger.spent_epsilon(),
        keys.DELTA: cfg.privacy.delta,
        keys.NOISE_MULTIPLIER: plan.noise_multiplier,
        keys.SAMPLE_RATE: plan.sample_rate,
        keys.NUM_EXAMPLES: 0,
    }
    if cfg.privacy.stats_release == "dp" and domain_names:
        counts = tp.released.aligned(domain_names)
        metrics[keys.D_COUNT] = counts
        metrics[keys.NUM_EXAMPLES] = _released_total(counts)
    return _only(metrics, DP_TRAIN_KEYS)


# ------------------------------------------------------------------------- evaluation


def unit_weighted_eval_sums(
    evaluate: Callable[[list[Record]], Mapping[str, DomainEval]],
    records: Sequence[Record],
    unit: str,
    domain_names: Sequence[str],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per domain: units, accuracy sum, reward sum, format sum, each record weighted 1/m.

    A unit of m records (a patient; m = 1 for record units) gives each of its records
    the weight 1/m, so one unit adds at most 1 to the units and at most 1 to each sum
    (sensitivity :func:`common.privacy.release.eval_sums_sensitivity`). Records are
    evaluated in groups of equal m (``evaluate`` returns per-domain metrics of a group),
    so per-record results are never needed. Per-record values are clipped to [0, 1].

    Returns
    -------
    (np.ndarray, list of np.ndarray)
        (D,) units and [accuracy, reward, format] sums (D,), aligned with ``domain_names``.
    """
    index = {d: i for i, d in enumerate(domain_names)}
    size = np.zeros(len(domain_names))
    sums = [np.zeros(len(domain_names)) for _ in range(3)]
    by_m: dict[int, list[Record]] = {}
    for unit_records in privacy_units(records, unit):
        by_m.setdefault(len(unit_records), []).extend(records[i] for i in unit_records)
    for m, group in sorted(by_m.items()):
        for d, e in evaluate(group).items():
            i = index.get(d)
            if i is None or e.records <= 0:
                continue
            w = e.records / m
            size[i] += w
            for s, value in zip(sums, (e.accuracy, e.mean_reward, e.format_rate), strict=True):
                s[i] += w * min(max(float(value), 0.0), 1.0)
    return size, sums


def evaluate_release(
    site: Site, cfg: FedClimbConfig, server_round: int, domain_names: Sequence[str],
    train: Sequence[Record], evaluation: Sequence[Record],
    evaluate: Callable[[list[Record]], Mapping[str, DomainEval]], seed: int,
) -> tuple[int, dict[str, Any]]:
    """An evaluation under DP with ``privacy.eval_release: dp``: (status, reply metrics).

    Refused (budget-exhausted status) past the hospital's planned evaluations or when one
    more release would pass the target; otherwise the unit-weighted sums are released
    once with the Gaussian mechanism at ``privacy.eval_noise_multiplier``, charged as
    ``eval_release``. An empty evaluation split releases noisy zeros like any other.
    """
    p = cfg.privacy
    require_planned_rounds(p)
    if p.unit == "patient":
        check_patient_units(train, evaluation)
    # Opened (created when fresh) before anything returns, as for every DP evaluation
    # (client/rounds.py): what this evaluation leaves is never taken for a lost ledger's traces.
    ledger = open_ledger(site, cfg)
    if not domain_names:  # nothing to align the sums with: release nothing, spend nothing
        return keys.STATUS_OK, {keys.STATUS: keys.STATUS_OK, keys.NUM_EXAMPLES: 0}
    planned = planned_evaluations(p)
    if _count(ledger, "eval_release") >= planned:
        refused = _exhausted(ledger, cfg, f"the {planned} planned evaluation(s) have run; raise "
                                          "privacy.planned_evaluations (and the target) to evaluate more")
        return keys.STATUS_BUDGET_EXHAUSTED, {**refused.metrics, keys.NUM_EXAMPLES: 0}
    if ledger.epsilon_if([(p.eval_noise_multiplier, 1.0, 1)]) > p.target_epsilon:
        refused = _exhausted(ledger, cfg, "no budget left for an evaluation release")
        return keys.STATUS_BUDGET_EXHAUSTED, {**refused.metrics, keys.NUM_EXAMPLES: 0}
    names = list(domain_names)
    size, sums = unit_weighted_eval_sums(evaluate, list(evaluation), p.unit, names)  # zeros when empty
    ledger.record(round=server_round, kind="eval_release", sample_rate=1.0,
                  noise_multiplier=p.eval_noise_multiplier, steps=1)
    noisy_size, noisy_sums = release_eval_sums(size, sums, noise_multiplier=p.eval_noise_multiplier,
                                               rng=noise_source(cfg, seed, "eval-release"))
    metrics: dict[str, Any] = {
        keys.STATUS: keys.STATUS_OK,
        keys.NUM_EXAMPLES: _released_total(noisy_size),
        keys.E_DP_UNITS: [float(x) for x in noisy_size],
    }
    for key, values in zip(keys.EVAL_DP_PER_DOMAIN[1:], noisy_sums, strict=True):
        metrics[key] = [float(x) for x in values]
    return keys.STATUS_OK, _only(metrics, DP_EVAL_KEYS)
