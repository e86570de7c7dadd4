"""What a hospital does for one train or evaluate instruction (no Flower types here).

Train: check the privacy budget first (refuse with ``budget_exhausted`` if the round would
exceed it), run local DRPO (DP-SGD when the hospital enabled DP), write the ledger, and
return the adapter plus whitelisted numbers only. Evaluate: per-domain metrics on the
held-out split. client/client_app.py turns these into Flower Messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dp_step import DPSettings
from client.runtime import HospitalData, Runtime
from client.site import Site
from client.stats import ReleasedCounts, fingerprint, load_released, save_released, unit_domain_counts
from client.trainer import privacy_units
from common import keys
from common.config import FedClimbConfig
from common.files import write_text_atomic
from common.privacy.noise import NoiseSource
from common.privacy.accounting import (
    PrivacyAccountingError,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
)
from common.privacy.ledger import PrivacyLedger
from common.privacy.release import gaussian_release
from common.seeding import derive_seed, secret_seed

log = logging.getLogger(__name__)

__all__ = ["Instruction", "TrainOutcome", "EvalOutcome", "train_round", "evaluate_round", "plan_privacy"]


@dataclass
class Instruction:
    """The server's per-round instruction, already decoded from its ConfigRecord."""

    server_round: int
    seed: int = 0
    planned_rounds: int = 0
    domain_names: list[str] = field(default_factory=list)
    domain_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    only_lora_b: bool = False


@dataclass
class TrainOutcome:
    status: int
    adapter: dict[str, torch.Tensor] | None
    metrics: dict[str, Any]
    message: str = ""


@dataclass
class EvalOutcome:
    status: int
    metrics: dict[str, Any]
    per_domain: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrivacyPlan:
    """The DP mechanisms of one round and what the ledger will say after them."""

    noise_multiplier: float  # per noisy update
    effective_noise_multiplier: float  # per sampled step (ppo_epochs composed)
    sample_rate: float
    steps: int
    # The one-off release of the per-domain unit counts, if this round makes it.
    stats_noise_multiplier: float | None
    epsilon_after: float
    fits: bool
    reason: str = ""


def plan_privacy(
    ledger: PrivacyLedger, cfg: FedClimbConfig, *, num_units: int, planned_rounds: int, release_counts: bool = False
) -> PrivacyPlan:
    """Decide sigma and q for this round and check the budget before any training.

    The noise multiplier is calibrated so that this round and the remaining planned
    rounds together end at the target epsilon; ``release_counts`` adds the one-off
    Gaussian release of the per-domain counts (client/stats.py) to this round.
    """
    p = cfg.privacy
    steps = cfg.train.steps
    epochs = cfg.train.ppo_epochs
    q = p.sample_rate or min(1.0, cfg.rollout.batch_prompts / max(num_units, 1))
    stats_sigma = p.stats_noise_multiplier if release_counts else None
    extra = [(stats_sigma, 1.0, 1)] if stats_sigma else []
    done = sum(1 for e in ledger.entries() if e.get("kind") == "dpsgd")
    planned = p.planned_rounds or planned_rounds or 1
    rounds_left = max(1, planned - done)
    if p.noise_multiplier > 0:
        sigma = p.noise_multiplier
    elif done >= planned:
        # The budget was calibrated to last `planned` rounds and they have run; what is left
        # would only buy rounds of pure noise.
        return PrivacyPlan(0.0, 0.0, q, steps, stats_sigma, ledger.spent_epsilon(), False,
                           f"the {planned} planned round(s) have run (spent {ledger.spent_epsilon():.3f} of "
                           f"{p.target_epsilon}); raise privacy.planned_rounds and privacy.target_epsilon to train more")
    else:
        try:
            sigma_eff = calibrate_noise_multiplier(
                target_epsilon=p.target_epsilon,
                delta=p.delta,
                sample_rate=q,
                steps=steps * rounds_left,
                accountant=p.accountant,
                spent_history=list(ledger.history()) + extra,
            )
        except PrivacyAccountingError as exc:
            return PrivacyPlan(0.0, 0.0, q, steps, stats_sigma, ledger.spent_epsilon(), False, str(exc))
        sigma = sigma_eff * math.sqrt(epochs)
    sigma_eff = effective_noise_multiplier(sigma, ppo_epochs=epochs)
    eps_after = ledger.epsilon_if([(sigma_eff, q, steps), *extra])
    fits = eps_after <= p.target_epsilon * (1 + 1e-9)
    reason = "" if fits else (
        f"this round would bring epsilon to {eps_after:.3f}, above the target {p.target_epsilon} "
        f"(spent {ledger.spent_epsilon():.3f} at delta={p.delta})"
    )
    return PrivacyPlan(sigma, sigma_eff, q, steps, stats_sigma, eps_after, fits, reason)


def _dp_generator(cfg: FedClimbConfig, seed: int) -> NoiseSource:
    """The round's source of Poisson samples and DP noise: ChaCha20 (common/privacy/noise.py).

    Keyed from os.urandom with ``secure_rng``; else from the round seed (reproducible
    simulations: whoever knows the seed can subtract the noise).
    """
    if cfg.privacy.secure_rng:
        return NoiseSource.secure()
    return NoiseSource.from_seed(derive_seed(seed, "dp-noise"))


# ------------------------------------------------------------------------- DRPO state


def _drpo_dir(site: Site) -> Path:
    return site.state_dir / "drpo"


def _load_drpo_state(site: Site, server_round: int) -> dict[str, Any] | None:
    """The history saved after the latest round before ``server_round`` (resume-safe)."""
    folder = _drpo_dir(site)
    if not folder.is_dir():
        return None
    rounds = sorted(int(m.group(1)) for p in folder.glob("round-*.json") if (m := re.match(r"round-(\d+)\.json", p.name)))
    earlier = [r for r in rounds if r < server_round]
    if not earlier:
        return None
    return json.loads((folder / f"round-{earlier[-1]:04d}.json").read_text(encoding="utf-8"))


def _save_drpo_state(site: Site, server_round: int, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    folder = _drpo_dir(site)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / f"round-{server_round:04d}.json", json.dumps(state))


# ------------------------------------------------------------------------- rounds


def _warn_unknown_domains(site: Site, records: Sequence[Any], names: Sequence[str]) -> None:
    """A local domain the federation does not list gets no statistics and no weight."""
    if not names:
        return
    unknown = sorted({r.domain for r in records} - set(names))
    if unknown:
        log.warning("%s: domains %s are not among the federation's domains %s; they train but are not counted "
                    "(check data.domain_key and federation.domains)", site.name, unknown, list(names))


def _round_seed(cfg: FedClimbConfig, site: Site, ins: Instruction) -> int:
    return derive_seed(cfg.seed, ins.seed, site.name, ins.server_round)


@contextlib.contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """One round at a time per state directory: plan, train and ledger write are one unit."""
    with open(state_dir / ".round.lock", "w", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another process is running a round on {state_dir}; give every SuperNode its own state_dir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train_round(
    runtime: Runtime, site: Site, cfg: FedClimbConfig, ins: Instruction, adapter: Mapping[str, torch.Tensor]
) -> TrainOutcome:
    """One round of local training for ``site`` starting from the global ``adapter``."""
    with _exclusive(site.state_dir):
        return _train_round(runtime, site, cfg, ins, adapter)


def _train_round(
    runtime: Runtime, site: Site, cfg: FedClimbConfig, ins: Instruction, adapter: Mapping[str, torch.Tensor]
) -> TrainOutcome:
    data: HospitalData = runtime.hospital_data(site, cfg)
    policy = runtime.policy(cfg)
    if not data.train:
        return TrainOutcome(keys.STATUS_NO_DATA, None, {keys.STATUS: keys.STATUS_NO_DATA, keys.NUM_EXAMPLES: 0},
                            "no usable training records")
    policy.set_adapter(dict(adapter))
    seed = _round_seed(cfg, site, ins)
    dp = None
    ledger = None
    plan = None
    if cfg.privacy.enabled:
        ledger = PrivacyLedger.open(
            site.state_dir, delta=cfg.privacy.delta, target_epsilon=cfg.privacy.target_epsilon,
            accountant=cfg.privacy.accountant,
        )
        units = privacy_units(data.train, cfg.privacy.unit)
        if cfg.privacy.delta >= 1.0 / len(units):
            raise ValueError(
                f"privacy.delta={cfg.privacy.delta} is not below 1/N = 1/{len(units)} privacy units; "
                f"set it to at most {0.1 / len(units):.1e}"
            )
        fp = fingerprint([r.id for r in data.train], cfg.privacy.unit, ins.domain_names)
        released = load_released(site.state_dir, fp)
        release_now = cfg.privacy.stats_release == "dp" and bool(ins.domain_names) and released is None
        plan = plan_privacy(ledger, cfg, num_units=len(units), planned_rounds=ins.planned_rounds,
                            release_counts=release_now)
        if not plan.fits:
            log.warning("%s: not training round %d: %s", site.name, ins.server_round, plan.reason)
            return TrainOutcome(
                keys.STATUS_BUDGET_EXHAUSTED,
                None,
                {keys.STATUS: keys.STATUS_BUDGET_EXHAUSTED, keys.EPSILON: ledger.spent_epsilon(),
                 keys.DELTA: cfg.privacy.delta},
                plan.reason,
            )
        dp = DPSettings(plan.noise_multiplier, plan.sample_rate, cfg.privacy.max_grad_norm, cfg.privacy.unit,
                        _dp_generator(cfg, seed), secret_seed() if cfg.privacy.secure_rng else None)
        # Charged before training: a round that fails half-way (its error status is
        # visible to the server) has already run part of the mechanism.
        ledger.record(round=ins.server_round, kind="dpsgd", sample_rate=plan.sample_rate,
                      noise_multiplier=plan.effective_noise_multiplier, steps=plan.steps)
    _warn_unknown_domains(site, data.train, ins.domain_names)
    drpo_state = _load_drpo_state(site, ins.server_round) if cfg.advantage.history == "run" and dp is None else None
    result = data.trainer.train(
        data.train,
        steps=cfg.train.steps,
        seed=seed,
        dp=dp,
        global_domain_stats=ins.domain_stats or None,
        drpo_state=drpo_state,
    )
    metrics: dict[str, Any] = {
        keys.STATUS: keys.STATUS_OK,
        keys.LOCAL_STEPS: result.steps,
        keys.ROLLOUT_SECONDS: round(result.rollout_s, 3),
        keys.UPDATE_SECONDS: round(result.update_s, 3),
    }
    counts = unit_domain_counts([r.domain for r in data.train], result.units, ins.domain_names)
    if dp is not None and ledger is not None and plan is not None:
        if release_now and plan.stats_noise_multiplier is not None:
            rng = np.random.default_rng(
                secret_seed() if cfg.privacy.secure_rng else derive_seed(seed, "stats")
            )
            noisy = gaussian_release(counts, l2_sensitivity=1.0, noise_multiplier=plan.stats_noise_multiplier, rng=rng)
            released = ReleasedCounts(fp, list(ins.domain_names), plan.stats_noise_multiplier, [float(x) for x in noisy])
            ledger.record(round=ins.server_round, kind="stats_release", sample_rate=1.0,
                          noise_multiplier=plan.stats_noise_multiplier, steps=1)
            save_released(site.state_dir, released)
        metrics.update({keys.EPSILON: ledger.spent_epsilon(), keys.DELTA: cfg.privacy.delta,
                        keys.NOISE_MULTIPLIER: plan.noise_multiplier, keys.SAMPLE_RATE: plan.sample_rate})
        # Only DP-released values may leave: the released counts (once released), never
        # exact counts, sampled sizes or training rewards.
        if released is not None and cfg.privacy.stats_release == "dp":
            metrics[keys.D_COUNT] = list(released.counts)
            metrics[keys.NUM_EXAMPLES] = max(int(round(float(np.clip(released.counts, 0, None).sum()))), 0)
        else:
            metrics[keys.NUM_EXAMPLES] = 0
    else:
        _save_drpo_state(site, ins.server_round, result.drpo_state)
        if ins.domain_names:
            metrics[keys.D_COUNT] = [float(x) for x in counts]
        metrics[keys.NUM_EXAMPLES] = len(data.train)
        metrics[keys.REWARD_MEAN] = float(result.mean_reward)
    out = result.adapter
    if ins.only_lora_b:
        out = {k: v for k, v in out.items() if k.endswith(".lora_B.weight")}
    return TrainOutcome(keys.STATUS_OK, out, metrics)


def evaluate_round(
    runtime: Runtime, site: Site, cfg: FedClimbConfig, ins: Instruction, adapter: Mapping[str, torch.Tensor]
) -> EvalOutcome:
    """Per-domain held-out metrics of the global ``adapter`` (aligned with the domain names)."""
    if cfg.privacy.enabled and cfg.privacy.eval_release == "none":
        return EvalOutcome(keys.STATUS_OK, {keys.STATUS: keys.STATUS_OK, keys.NUM_EXAMPLES: 0})
    data = runtime.hospital_data(site, cfg)
    policy = runtime.policy(cfg)
    policy.set_adapter(dict(adapter))
    records = data.evaluation
    if not records:
        return EvalOutcome(keys.STATUS_NO_DATA, {keys.STATUS: keys.STATUS_NO_DATA, keys.NUM_EXAMPLES: 0})
    result = data.trainer.evaluate(records, seed=_round_seed(cfg, site, ins))
    names = ins.domain_names or sorted(result.domains)
    columns: dict[str, list[float]] = {k: [] for k in keys.EVAL_PER_DOMAIN}
    for d in names:
        e = result.domains.get(d)
        columns[keys.E_RECORDS].append(float(e.records) if e else 0.0)
        columns[keys.E_BALANCED_ACCURACY].append(e.balanced_accuracy if e else 0.0)
        columns[keys.E_MACRO_F1].append(e.macro_f1 if e else 0.0)
        columns[keys.E_MEAN_IOU].append(e.mean_iou if e else 0.0)
        columns[keys.E_FORMAT_RATE].append(e.format_rate if e else 0.0)
        columns[keys.E_MEAN_REWARD].append(e.mean_reward if e else 0.0)
        columns[keys.E_ACCURACY].append(e.accuracy if e else 0.0)
    metrics: dict[str, Any] = {keys.STATUS: keys.STATUS_OK, keys.NUM_EXAMPLES: len(records), **columns}
    return EvalOutcome(keys.STATUS_OK, metrics, per_domain=result.domains)


def instruction_from_config(values: Mapping[str, Any]) -> Instruction:
    """Decode the server's ConfigRecord values into an :class:`Instruction`."""
    names = [str(x) for x in values.get(keys.DOMAIN_NAMES, [])]
    counts: Sequence[float] = values.get(keys.DOMAIN_COUNT, [])
    means: Sequence[float] = values.get(keys.DOMAIN_MEAN, [])
    stats = {}
    if len(counts) == len(names) == len(means):
        # A domain is usable once it has a count and an evaluated mean (-1 = not yet).
        stats = {d: (float(n), float(m)) for d, n, m in zip(names, counts, means, strict=True)
                 if float(n) > 0 and float(m) >= 0}
    return Instruction(
        server_round=int(values.get(keys.SERVER_ROUND, 0)),
        seed=int(values.get(keys.SEED, 0)),
        planned_rounds=int(values.get(keys.PLANNED_ROUNDS, 0)),
        domain_names=names,
        domain_stats=stats,
        only_lora_b=bool(values.get(keys.ONLY_B, False)),
    )
