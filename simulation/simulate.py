"""`fedclimb simulate`: a whole federation on one machine, with a report.

1. Data: the embedded synthetic federation (generated once per seed and cached), or a
   real CLIMB root partitioned into hospitals (simulation/partition.py).
2. One folder per hospital with its own hospital.yaml (privacy budget) and state
   directory (privacy ledger) — exactly what a real hospital has.
3. The same ServerApp/ClientApp as a deployment, on Flower's simulation engine
   (simulation/launcher.py), with live progress read from the server's events.
4. report.md, learning_curves.png and metrics.jsonl in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


from common.climb.records import load_records
from common.config import ConfigError, FedClimbConfig, HospitalConfig, load_config, to_yaml
from common.modeling.loader import cache_root
from simulation.launcher import SimulationLaunch, launch, toml_string
from simulation.report import overall

log = logging.getLogger(__name__)

__all__ = ["SimulationResult", "PreparedRun", "check_fits_federation", "prepare_data", "prepare_run", "run_simulation", "run_inprocess", "MARKER"]

MARKER = ".fedclimb-simulation"
EVENTS = "events.jsonl"
Mode = Literal["progress", "quiet", "jsonl"]


@dataclass
class SimulationResult:
    """Where things went and how long it took."""

    run_dir: Path
    cfg: FedClimbConfig
    hospitals: list[str]
    seconds: float
    returncode: int
    history: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        """Flower exited cleanly and the last round was reached (aggregated or not)."""
        return self.returncode == 0 and bool(self.history) and self.history[-1]["server_round"] == self.cfg.federation.rounds

    @property
    def aggregated_rounds(self) -> list[int]:
        """The rounds whose updates changed the global adapter."""
        return [h["server_round"] for h in self.history
                if h["server_round"] > 0 and (h.get("train") or {}).get("aggregated")]

    def failure(self) -> str | None:
        """Why this run counts as failed (``fedclimb simulate`` exits 1), or None."""
        if not self.ok:
            return (f"simulation failed (flwr exit code {self.returncode}); "
                    f"see {self.run_dir / 'flower.log'}")
        if not self.aggregated_rounds:
            return (f"no round aggregated: in each of the {self.cfg.federation.rounds} round(s) fewer than "
                    f"federation.min_replies={self.cfg.federation.min_replies} hospital(s) sent an accepted update, "
                    f"so the global adapter never changed ({_last_round_outcome(self.history)}); "
                    f"see {self.run_dir / 'metrics.json'}")
        return None


def _last_round_outcome(history: list[dict[str, Any]]) -> str:
    """``round 3: budget exhausted hospital-0; rejected hospital-1 (reason)`` from the round log."""
    rounds = [h for h in history if h["server_round"] > 0]
    if not rounds:
        return "no round ran"
    train = rounds[-1].get("train") or {}
    parts = []
    for label, what in (("budget_exhausted", "budget exhausted"), ("no_data", "no usable data")):
        if train.get(label):
            parts.append(f"{what}: {', '.join(train[label])}")
    parts += [f"rejected {name} ({reason})" for name, reason in (train.get("rejected") or {}).items()]
    if not train.get("nodes"):
        parts.append("no replies")
    return f"round {rounds[-1]['server_round']}: " + ("; ".join(parts) or "too few replies")


def check_fits_federation(cfg: FedClimbConfig) -> None:
    """Refuse federation settings that ``simulation.hospitals`` hospitals can never meet.

    Raises :class:`ConfigError` naming the key: with more required replies than hospitals
    sampled per round, no round would aggregate, yet every hospital would spend budget.
    """
    n, fed = cfg.simulation.hospitals, cfg.federation
    sampled = min(n, max(1, math.ceil(fed.fraction_train * n)))  # as FedClimbStrategy.sample_nodes
    if fed.min_hospitals > n:
        raise ConfigError(f"federation.min_hospitals: must be <= simulation.hospitals ({n}), got {fed.min_hospitals}")
    if fed.min_replies > sampled:
        raise ConfigError(
            f"federation.min_replies: must be <= the hospitals asked per round ({sampled} = "
            f"ceil(federation.fraction_train {fed.fraction_train:g} x simulation.hospitals {n})), "
            f"got {fed.min_replies}: no round could aggregate, yet every hospital would spend privacy budget")


def _synth_root(cfg: FedClimbConfig, hospitals: int, seed: int) -> Path:
    from simulation.synth import GENERATOR_VERSION, generate_federation

    tag = f"{GENERATOR_VERSION.replace('/', '-')}-h{hospitals}-s{seed}-x{cfg.simulation.synth_scale:g}"
    root = cache_root(cfg.model) / "synth" / tag
    if not (root / "federation.json").is_file():
        log.info("generating the synthetic federation in %s", root)
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_federation(tmp, hospitals=hospitals, seed=seed, scale=cfg.simulation.synth_scale)
        try:
            os.replace(tmp, root)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def prepare_data(cfg: FedClimbConfig, run_dir: Path) -> list[Path]:
    """Per-hospital CLIMB roots for this simulation (hospital i is partition i)."""
    n = cfg.simulation.hospitals
    if not cfg.simulation.data_root:
        root = _synth_root(cfg, n, cfg.seed)
        return [root / f"hospital-{i}" for i in range(n)]
    from simulation.partition import partition_root

    return partition_root(
        Path(cfg.simulation.data_root),
        run_dir / "data",
        hospitals=n,
        mode=cfg.simulation.partition,
        alpha=cfg.simulation.dirichlet_alpha,
        seed=cfg.seed,
        domain_key=cfg.data.domain_key,
        max_line_bytes=cfg.data.max_line_bytes,
    )


def _domains(roots: Sequence[Path], cfg: FedClimbConfig) -> list[str]:
    names: set[str] = set()
    for root in roots:
        for split in (cfg.data.train_split, cfg.data.eval_split):
            names |= {r.domain for r in load_records(root, split, domain_key=cfg.data.domain_key)}
    return sorted(names)


def _write_hospitals(cfg: FedClimbConfig, roots: Sequence[Path], run_dir: Path) -> Path:
    sim_root = run_dir / "hospitals"
    for i, root in enumerate(roots):
        folder = sim_root / f"hospital-{i}"
        (folder / "state").mkdir(parents=True, exist_ok=True)
        # Under DP a hospital states the rounds its budget must last (the server's
        # announcement is never used): the simulated ones plan for this run's rounds.
        privacy = dataclasses.replace(cfg.privacy, planned_rounds=cfg.privacy.planned_rounds or cfg.federation.rounds)
        hospital = HospitalConfig(
            name=f"hospital-{i}",
            data_root=str(root.resolve()),
            state_dir=str((folder / "state").resolve()),
            privacy=privacy,
            domain_key=cfg.data.domain_key,
            train_split=cfg.data.train_split,
            eval_split=cfg.data.eval_split,
            max_train_records=cfg.data.max_records,
            max_eval_records=cfg.federation.eval_max_records or cfg.data.max_records,
        )
        (folder / "hospital.yaml").write_text(to_yaml(hospital), encoding="utf-8")
    return sim_root


def _fresh_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MARKER).is_file():
            raise FileExistsError(f"{run_dir} exists and was not written by `fedclimb simulate`; choose another --out")
        if not resume:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("fedclimb simulate run directory\n")


class _Progress:
    """Reads the server's events.jsonl as it grows and reports each round."""

    def __init__(self, path: Path, cfg: FedClimbConfig, mode: Mode, out: Callable[[str], None]) -> None:
        self.path, self.cfg, self.mode, self.out = path, cfg, mode, out
        self.offset = 0
        self.t0 = time.perf_counter()

    def __call__(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith("\n"):
                    break
                self.offset += len(line.encode())
                self.emit(json.loads(line))

    def emit(self, event: dict[str, Any]) -> None:
        if self.mode == "quiet":
            return
        if self.mode == "jsonl":
            self.out(json.dumps(event, sort_keys=True))
            return
        self.out(format_round(event, self.cfg.federation.rounds, time.perf_counter() - self.t0))


def format_round(event: dict[str, Any], rounds: int, elapsed: float) -> str:
    """One human line per round."""
    rnd = event["server_round"]
    train = event.get("train") or {}
    nodes = train.get("nodes", {})
    done = len([n for n in nodes if n not in train.get("rejected", {})])
    ev = (event.get("evaluate") or {}).get("domains", {})
    reward = overall(ev, "mean_reward") or 0.0
    acc = overall(ev, "balanced_accuracy") or 0.0
    eps = " ".join(f"{k.split('-')[-1]}:{v['dp.epsilon']:.2f}" for k, v in sorted(nodes.items()) if "dp.epsilon" in v)
    head = "round 0 (before training)" if rnd == 0 else f"round {rnd}/{rounds}"
    parts = [f"{head:<26}"]
    if rnd > 0:
        parts.append(f"hospitals {done}/{len(nodes)}")
    parts.append(f"test reward {reward:.3f} bal-acc {acc:.3f}")
    if eps:
        parts.append(f"eps {eps}")
    parts.append(f"sent {event['bytes_sent'] / 1e6:.2f} MB recv {event['bytes_received'] / 1e6:.2f} MB")
    parts.append(f"{event['seconds']:.1f} s (elapsed {elapsed:.0f} s)")
    return " | ".join(parts)


@dataclass
class PreparedRun:
    """A run directory with data, hospitals and the resolved configuration."""

    cfg: FedClimbConfig
    run_dir: Path
    roots: list[Path]
    sim_root: Path

    @property
    def run_config(self) -> dict[str, str]:
        """Flower run-config values (the same keys as [tool.flwr.app.config])."""
        return {"config-file": str(self.run_dir / "config.yaml"), "sim-root": str(self.sim_root)}


def prepare_run(cfg: FedClimbConfig, run_dir: Path) -> PreparedRun:
    """Data, one folder per hospital (hospital.yaml + state/), config.yaml."""
    check_fits_federation(cfg)
    run_dir = run_dir.resolve()
    _fresh_run_dir(run_dir, cfg.server.resume)
    roots = prepare_data(cfg, run_dir)
    cfg.federation.domains = _domains(roots, cfg)
    cfg.federation.min_hospitals = cfg.simulation.hospitals
    cfg.server.run_dir = str(run_dir)
    sim_root = _write_hospitals(cfg, roots, run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    return PreparedRun(cfg, run_dir, roots, sim_root)


def _history(run_dir: Path) -> list[dict[str, Any]]:
    metrics_file = run_dir / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else []


def run_simulation(
    cfg: FedClimbConfig,
    run_dir: Path,
    *,
    mode: Mode = "progress",
    out: Callable[[str], None] = print,
    verbose: bool = False,
) -> SimulationResult:
    """Prepare data and hospitals, run the federation through Flower, return its history."""
    t0 = time.perf_counter()
    run = prepare_run(cfg, run_dir)
    cfg, run_dir = run.cfg, run.run_dir
    if mode == "progress":
        out(
            f"fedclimb simulate: {len(run.roots)} hospitals, domains {', '.join(cfg.federation.domains)}, "
            f"{cfg.federation.rounds} rounds x {cfg.train.steps} local steps, "
            f"{'DP on (target eps ' + str(cfg.privacy.target_epsilon) + ')' if cfg.privacy.enabled else 'DP off'}, "
            f"{cfg.advantage.estimator.upper()}, aggregation {cfg.aggregation.mode}/{cfg.aggregation.weighting}"
        )
        out(f"run directory: {run_dir}")
    env = {
        **os.environ,
        "FEDCLIMB_CACHE": str(cache_root(cfg.model)),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONWARNINGS": "ignore",
    }
    spec = SimulationLaunch(
        run_config={k: toml_string(v) for k, v in run.run_config.items()},
        num_supernodes=len(run.roots),
        cpus_per_client=cfg.simulation.cpus_per_hospital,
        gpus_per_client=cfg.simulation.gpus_per_hospital,
        total_cpus=(cfg.simulation.parallel_hospitals or len(run.roots)) * cfg.simulation.cpus_per_hospital,
        log_file=run_dir / "flower.log",
        flwr_home=run_dir / ".flwr",
        env=env,
    )
    progress = _Progress(run_dir / EVENTS, cfg, mode, out)
    code = launch(spec, poll=progress)
    shutil.rmtree(run_dir / ".flwr", ignore_errors=True)
    result = SimulationResult(run_dir, cfg, [f"hospital-{i}" for i in range(len(run.roots))],
                              time.perf_counter() - t0, code, _history(run_dir))
    if verbose or not result.ok:
        tail = (run_dir / "flower.log").read_text(errors="replace").splitlines()[-40:]
        if not result.ok:
            out("the simulation did not finish; the last lines of flower.log:")
        for line in tail:
            out("  " + line)
    return result


def run_inprocess(cfg: FedClimbConfig, run_dir: Path) -> SimulationResult:
    """The same ServerApp loop and ClientApp, called in this process (no Ray)."""
    from client.client_app import app as client_app
    from server.federation import run_federation
    from simulation.inprocess import InProcessGrid

    t0 = time.perf_counter()
    run = prepare_run(cfg, run_dir)
    grid = InProcessGrid(client_app, len(run.roots), run_config=run.run_config, seed=cfg.seed)
    run_federation(grid, run.cfg, run_dir=run.run_dir)
    return SimulationResult(run.run_dir, run.cfg, [f"hospital-{i}" for i in range(len(run.roots))],
                            time.perf_counter() - t0, 0, _history(run.run_dir))


def config_for_cli(config_file: str | None, overrides: Sequence[str], *, hospitals: int | None,
                   data: str | None, seed: int | None) -> FedClimbConfig:
    """Merge the CLI flags into the configuration (flags win over files)."""
    extra = []
    if hospitals is not None:
        extra.append(f"simulation.hospitals={hospitals}")
    if data is not None:
        extra.append(f"simulation.data_root={data}")
    if seed is not None:
        extra.append(f"seed={seed}")
    cfg = load_config(config_file, [*overrides, *extra])
    if cfg.privacy.enabled and cfg.data.max_records > 0:
        # The simulated hospitals would refuse it (HospitalConfig.max_train_records).
        raise ConfigError("data.max_records: must be 0 when privacy.enabled is true (an evenly spaced "
                          "subsample breaks the DP guarantee); use simulation.synth_scale for less data, "
                          "or privacy=off")
    check_fits_federation(cfg)
    return cfg

