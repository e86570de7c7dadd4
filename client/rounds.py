"""What a hospital does for one train or evaluate instruction (no Flower types here).

Train: check the privacy budget first (refuse with ``budget_exhausted`` if the round would
exceed it), run local DRPO (DP-SGD when the hospital enabled DP), write the ledger, and
return the adapter plus whitelisted numbers only. Evaluate: per-domain metrics on the
held-out split. client/client_app.py turns these into Flower Messages.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dp_step import DPSettings
from client.runtime import HospitalData, Runtime
from client.site import Site
from client.stats import REWARD_BOUND, domain_statistics
from client.trainer import privacy_units
from common import keys
from common.config import FedClimbConfig
from common.privacy.accounting import (
    PrivacyAccountingError,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
)
from common.privacy.ledger import PrivacyLedger
from common.privacy.release import release_counts_and_sums
from common.seeding import derive_seed

log = logging.getLogger(__name__)

__all__ = ["Instruction", "TrainOutcome", "EvalOutcome", "train_round", "evaluate_round", "plan_privacy"]

STATS_SENSITIVITY_BOUND = REWARD_BOUND


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
    """The DP mechanism of one round and what the ledger will say after it."""

    noise_multiplier: float  # per noisy update
    effective_noise_multiplier: float  # per sampled step (ppo_epochs composed)
    sample_rate: float
    steps: int
    stats_noise_multiplier: float | None
    epsilon_after: float
    fits: bool
    reason: str = ""


def plan_privacy(ledger: PrivacyLedger, cfg: FedClimbConfig, *, num_units: int, planned_rounds: int) -> PrivacyPlan:
    """Decide sigma and q for this round and check the budget before any training."""
    p = cfg.privacy
    steps = cfg.train.steps
    epochs = cfg.train.ppo_epochs
    q = p.sample_rate or min(1.0, cfg.rollout.batch_prompts / max(num_units, 1))
    stats_sigma = p.stats_noise_multiplier if p.stats_release == "dp" else None
    per_round_extra = [(stats_sigma, 1.0, 1)] if stats_sigma else []
    done = sum(1 for e in ledger.entries() if e.get("kind") == "dpsgd")
    rounds_left = max(1, (p.planned_rounds or planned_rounds or 1) - done)
    if p.noise_multiplier > 0:
        sigma = p.noise_multiplier
    else:
        try:
            sigma_eff = calibrate_noise_multiplier(
                target_epsilon=p.target_epsilon,
                delta=p.delta,
                sample_rate=q,
                steps=steps * rounds_left,
                accountant=p.accountant,
                spent_history=list(ledger.history()) + per_round_extra * rounds_left,
            )
        except PrivacyAccountingError as exc:
            return PrivacyPlan(0.0, 0.0, q, steps, stats_sigma, ledger.spent_epsilon(), False, str(exc))
        sigma = sigma_eff * math.sqrt(epochs)
    sigma_eff = effective_noise_multiplier(sigma, ppo_epochs=epochs)
    mechanisms = [(sigma_eff, q, steps), *per_round_extra]
    eps_after = ledger.epsilon_if(mechanisms)
    fits = eps_after <= p.target_epsilon * (1 + 1e-9)
    reason = "" if fits else (
        f"this round would bring epsilon to {eps_after:.3f}, above the target {p.target_epsilon} "
        f"(spent {ledger.spent_epsilon():.3f} at delta={p.delta})"
    )
    return PrivacyPlan(sigma, sigma_eff, q, steps, stats_sigma, eps_after, fits, reason)


def _dp_generator(cfg: FedClimbConfig, seed: int) -> torch.Generator:
    if cfg.privacy.secure_rng:
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return torch.Generator().manual_seed(derive_seed(seed, "dp-noise"))


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
    tmp = folder / f".round-{server_round:04d}.json.tmp"
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, folder / f"round-{server_round:04d}.json")


# ------------------------------------------------------------------------- rounds


def _round_seed(cfg: FedClimbConfig, site: Site, ins: Instruction) -> int:
    return derive_seed(cfg.seed, ins.seed, site.name, ins.server_round)


def train_round(
    runtime: Runtime, site: Site, cfg: FedClimbConfig, ins: Instruction, adapter: Mapping[str, torch.Tensor]
) -> TrainOutcome:
    """One round of local training for ``site`` starting from the global ``adapter``."""
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
        plan = plan_privacy(ledger, cfg, num_units=len(units), planned_rounds=ins.planned_rounds)
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
                        _dp_generator(cfg, seed))
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
    counts, sums = domain_statistics(result.uses, result.units, ins.domain_names)
    if dp is not None and ledger is not None and plan is not None:
        ledger.record(round=ins.server_round, kind="dpsgd", sample_rate=plan.sample_rate,
                      noise_multiplier=plan.effective_noise_multiplier, steps=plan.steps)
        if plan.stats_noise_multiplier is not None and ins.domain_names:
            rng = np.random.default_rng(
                int.from_bytes(os.urandom(8), "little") if cfg.privacy.secure_rng else derive_seed(seed, "stats")
            )
            counts, sums = release_counts_and_sums(
                counts, sums, noise_multiplier=plan.stats_noise_multiplier, sum_bound=STATS_SENSITIVITY_BOUND, rng=rng
            )
            ledger.record(round=ins.server_round, kind="stats_release", sample_rate=1.0,
                          noise_multiplier=plan.stats_noise_multiplier, steps=1)
        metrics.update({keys.EPSILON: ledger.spent_epsilon(), keys.DELTA: cfg.privacy.delta,
                        keys.NOISE_MULTIPLIER: plan.noise_multiplier, keys.SAMPLE_RATE: plan.sample_rate})
        # Only the Gaussian-noised per-domain statistics may leave; without domain names
        # nothing was released, so no exact count or mean reward may be sent either.
        releasable = plan.stats_noise_multiplier is not None and bool(ins.domain_names)
    else:
        releasable = True
        _save_drpo_state(site, ins.server_round, result.drpo_state)
    if releasable and ins.domain_names:
        metrics[keys.D_COUNT] = [float(x) for x in counts]
        metrics[keys.D_REWARD_SUM] = [float(x) for x in sums]
        total = float(np.clip(counts, 0, None).sum())
        metrics[keys.NUM_EXAMPLES] = max(int(round(total)), 0)
        metrics[keys.REWARD_MEAN] = float(np.clip(sums, 0, None).sum() / total) if total > 0 else 0.0
    elif releasable:
        metrics[keys.NUM_EXAMPLES] = len(result.uses)
        metrics[keys.REWARD_MEAN] = float(result.mean_reward)
    else:
        metrics[keys.NUM_EXAMPLES] = 0
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
        stats = {d: (float(n), float(m)) for d, n, m in zip(names, counts, means, strict=True) if float(n) > 0}
    return Instruction(
        server_round=int(values.get(keys.SERVER_ROUND, 0)),
        seed=int(values.get(keys.SEED, 0)),
        planned_rounds=int(values.get(keys.PLANNED_ROUNDS, 0)),
        domain_names=names,
        domain_stats=stats,
        only_lora_b=bool(values.get(keys.ONLY_B, False)),
    )
