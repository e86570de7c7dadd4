"""What a hospital does for one train or evaluate instruction (no Flower types here).

Train: under DP, client/privacy_round.py plans the round, checks and charges the budget
(refusing with ``budget_exhausted`` when it would exceed it) and releases what may be
released; then local DRPO runs (DP-SGD when the hospital enabled DP) and the reply carries
the adapter plus whitelisted numbers only. Evaluate: per-domain metrics on the held-out
split, exact without DP and, under DP, as privacy_round releases them.
client/client_app.py turns these into Flower Messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from client import privacy_round
from client.runtime import HospitalData, Runtime
from client.site import Site
from client.stats import unit_domain_counts
from common import keys
from common.config import FedClimbConfig
from common.files import write_bytes_atomic, write_text_atomic
from common.seeding import derive_seed, secret_seed

log = logging.getLogger(__name__)

__all__ = ["Instruction", "TrainOutcome", "EvalOutcome", "train_round", "evaluate_round"]


@dataclass
class Instruction:
    """The server's per-round instruction, already decoded from its ConfigRecord."""

    server_round: int
    seed: int = 0
    planned_rounds: int = 0  # the server's announcement; a hospital's DP budget never uses it
    domain_names: list[str] = field(default_factory=list)
    domain_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    only_lora_b: bool = False


@dataclass
class TrainOutcome:
    status: int
    adapter: dict[str, torch.Tensor] | None
    metrics: dict[str, Any]
    message: str = ""
    # What the hospital's own log and benchmarks may see (never sent): wall-clock seconds
    # of rollouts and updates.
    local: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalOutcome:
    status: int
    metrics: dict[str, Any]
    per_domain: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------- DRPO state


def _drpo_dir(site: Site) -> Path:
    return site.state_dir / "drpo"


def _saved_rounds(folder: Path, suffix: str) -> list[int]:
    """The rounds with a ``round-NNNN<suffix>`` file in ``folder``, in order."""
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"round-(\d+){re.escape(suffix)}")
    return sorted(int(m.group(1)) for p in folder.glob(f"round-*{suffix}") if (m := pattern.fullmatch(p.name)))


def _latest_before(folder: Path, suffix: str, server_round: int) -> Path | None:
    """The file saved after the latest round before ``server_round`` (resume-safe), if any."""
    earlier = [r for r in _saved_rounds(folder, suffix) if r < server_round]
    return folder / f"round-{earlier[-1]:04d}{suffix}" if earlier else None


def _load_drpo_state(site: Site, server_round: int) -> dict[str, Any] | None:
    """The history saved after the latest round before ``server_round`` (resume-safe)."""
    path = _latest_before(_drpo_dir(site), ".json", server_round)
    return json.loads(path.read_text(encoding="utf-8")) if path is not None else None


def _save_drpo_state(site: Site, server_round: int, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    folder = _drpo_dir(site)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / f"round-{server_round:04d}.json", json.dumps(state))


# ------------------------------------------------------------------- optimizer state


def _optimizer_dir(site: Site) -> Path:
    return site.state_dir / "optimizer"


def _load_optimizer_state(site: Site, server_round: int) -> dict[str, Any] | None:
    """AdamW's moments saved after the latest round before ``server_round`` (``train.keep_optimizer``)."""
    path = _latest_before(_optimizer_dir(site), ".pt", server_round)
    if path is None:
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file costs the moments, never the round
        log.warning("%s: cannot read the optimizer state %s (%s); starting AdamW's moments at zero", site.name, path, exc)
        return None


def _save_optimizer_state(site: Site, server_round: int, state: dict[str, Any] | None) -> None:
    """Write this round's moments; keep the previous round's too (a retried round resumes from it)."""
    if state is None:
        return
    folder = _optimizer_dir(site)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(folder / f"round-{server_round:04d}.pt", buffer.getvalue(), mode=0o600)
    for old in _saved_rounds(folder, ".pt"):
        if old < server_round - 1:
            (folder / f"round-{old:04d}.pt").unlink(missing_ok=True)


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
    guard = None
    if cfg.privacy.enabled:
        guard = privacy_round.begin_train(site, cfg, ins.server_round, ins.domain_names, data.train,
                                          data.evaluation, seed)
        if isinstance(guard, privacy_round.Refused):
            log.warning("%s: not training round %d: %s", site.name, ins.server_round, guard.reason)
            return TrainOutcome(keys.STATUS_BUDGET_EXHAUSTED, None, guard.metrics, guard.reason)
        dp = privacy_round.dp_settings(guard, cfg, seed)
    _warn_unknown_domains(site, data.train, ins.domain_names)
    drpo_state = _load_drpo_state(site, ins.server_round) if cfg.advantage.history == "run" and dp is None else None
    optimizer_state = _load_optimizer_state(site, ins.server_round) if cfg.train.keep_optimizer else None
    result = data.trainer.train(
        data.train,
        steps=cfg.train.steps,
        seed=seed,
        dp=dp,
        global_domain_stats=ins.domain_stats or None,
        drpo_state=drpo_state,
        optimizer_state=optimizer_state,
    )
    _save_optimizer_state(site, ins.server_round, result.optimizer_state)
    if guard is not None:
        metrics = privacy_round.train_metrics(guard, cfg, ins.domain_names)
    else:
        _save_drpo_state(site, ins.server_round, result.drpo_state)
        metrics = {
            keys.STATUS: keys.STATUS_OK,
            keys.LOCAL_STEPS: result.steps,
            keys.ROLLOUT_SECONDS: round(result.rollout_s, 3),
            keys.UPDATE_SECONDS: round(result.update_s, 3),
            keys.NUM_EXAMPLES: len(data.train),
            keys.REWARD_MEAN: float(result.mean_reward),
        }
        if ins.domain_names:
            counts = unit_domain_counts([r.domain for r in data.train], result.units, ins.domain_names)
            metrics[keys.D_COUNT] = [float(x) for x in counts]
    out = result.adapter
    if ins.only_lora_b:
        out = {k: v for k, v in out.items() if k.endswith(".lora_B.weight")}
    local = {"rollout_s": result.rollout_s, "update_s": result.update_s}
    return TrainOutcome(keys.STATUS_OK, out, metrics, local=local)


def evaluate_round(
    runtime: Runtime, site: Site, cfg: FedClimbConfig, ins: Instruction, adapter: Mapping[str, torch.Tensor]
) -> EvalOutcome:
    """Per-domain held-out metrics of the global ``adapter`` (aligned with the domain names).

    Under DP they leave as privacy_round releases them (``privacy.eval_release``): noisy
    sums charged to the ledger (dp), exact metrics the hospital opted in to (exact), or
    nothing (none).
    """
    p = cfg.privacy
    if privacy_round.evaluation_withheld(p):
        ledger_before_evaluation(site, cfg)
        return EvalOutcome(keys.STATUS_OK, {keys.STATUS: keys.STATUS_OK, keys.NUM_EXAMPLES: 0})
    data = runtime.hospital_data(site, cfg)
    policy = runtime.policy(cfg)
    policy.set_adapter(dict(adapter))
    seed = _round_seed(cfg, site, ins)
    if p.enabled and p.eval_release == "dp":
        # Sampled answers (rollout.eval_temperature > 0) from a seed the server knows would
        # let one record shift the draws of every record after it: secret, as for rollouts.
        eval_seed = secret_seed() if p.secure_rng else seed
        with _exclusive(site.state_dir):
            status, released = privacy_round.evaluate_release(
                site, cfg, ins.server_round, ins.domain_names, data.train, data.evaluation,
                lambda records: data.trainer.evaluate(records, seed=eval_seed).domains, seed)
        return EvalOutcome(status, released)
    if p.enabled and p.unit == "patient":
        privacy_round.check_patient_units(data.train, data.evaluation)
    ledger_before_evaluation(site, cfg)
    records = data.evaluation
    if not records:
        return EvalOutcome(keys.STATUS_NO_DATA, {keys.STATUS: keys.STATUS_NO_DATA, keys.NUM_EXAMPLES: 0})
    result = data.trainer.evaluate(records, seed=seed)
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


def ledger_before_evaluation(site: Site, cfg: FedClimbConfig) -> None:
    """Open (in a fresh state directory: create) a DP hospital's ledger before an evaluation
    it does not charge to it, as `hospital start` does: the audit log and evaluation count
    this evaluation leaves are then never taken for the traces of a lost ledger.
    Nothing happens without DP. The ClientApp calls it before it counts the evaluation."""
    if not cfg.privacy.enabled:
        return
    with _exclusive(site.state_dir):
        privacy_round.open_ledger(site, cfg)


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
