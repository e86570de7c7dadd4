"""`fedclimb simulate --compare`: four ways to train, same data, model, seeds and budget.

- local-only: each hospital trains alone (its own adapter, its own test split);
- FedAvg + GRPO: A/B averaged separately (fedit), examples weights, GRPO advantages;
- domain-aware + DRPO: the default federation (exact ffa aggregation, domain weights, DRPO);
- centralised DRPO: all hospitals' records pooled in one place (no federation).

Every arm runs rounds x steps local steps per hospital (centralised: rounds x steps x
hospitals on the pool) with the same privacy settings. The federated arms run the real
ServerApp loop and ClientApp in-process (simulation/inprocess.py); local-only and
centralised call the same client round function without a server.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from client.rounds import Instruction, evaluate_round, train_round
from client.runtime import Runtime
from client.site import Site, effective_config
from common.climb.records import LINKED_ROOTS_FILE, linked_roots
from common.config import FedClimbConfig, load_hospital_config
from simulation.simulate import prepare_run, run_inprocess

log = logging.getLogger(__name__)

__all__ = ["ARMS", "run_compare", "summarise", "write_comparison"]

ARMS = ("local-only", "fedavg-grpo", "domain-drpo", "centralised-drpo")


def _arm_config(cfg: FedClimbConfig, arm: str, seed: int) -> FedClimbConfig:
    c = copy.deepcopy(cfg)
    c.seed = seed
    if arm == "fedavg-grpo":
        c.aggregation.mode, c.aggregation.weighting, c.advantage.estimator = "fedit", "examples", "grpo"
    elif arm in ("domain-drpo", "centralised-drpo"):
        c.aggregation.mode, c.aggregation.weighting, c.advantage.estimator = "ffa", "domain", "drpo"
    return c


def _combine(per_site: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Records-weighted per-domain metrics over sites (each a DomainEval mapping)."""
    out: dict[str, dict[str, float]] = {}
    domains = sorted({d for site in per_site for d in site})
    for d in domains:
        rows = [site[d] for site in per_site if d in site and site[d].records > 0]
        n = sum(r.records for r in rows)
        out[d] = {
            "records": float(n),
            "balanced_accuracy": sum(r.records * r.balanced_accuracy for r in rows) / n,
            "macro_f1": sum(r.records * r.macro_f1 for r in rows) / n,
            "mean_reward": sum(r.records * r.mean_reward for r in rows) / n,
        }
    return out


def _sites(run_dir: Path, sim_root: Path, n: int) -> list[Site]:
    return [Site(f"hospital-{i}", load_hospital_config(sim_root / f"hospital-{i}" / "hospital.yaml"), True)
            for i in range(n)]


def _local_rounds(runtime: Runtime, site: Site, cfg: FedClimbConfig, rounds: int) -> dict[str, Any]:
    """Train one site alone for ``rounds`` rounds; evaluate its own adapter."""
    from common.modeling.lora import init_adapter
    from common.modeling.shapes import adapter_shapes_for

    cfg = effective_config(cfg, site, {})
    adapter = init_adapter(adapter_shapes_for(cfg.model, cfg.lora), seed=cfg.lora.init_seed, b_std=cfg.lora.init_b_std)
    for r in range(1, rounds + 1):
        ins = Instruction(server_round=r, seed=cfg.seed, planned_rounds=rounds, domain_names=list(cfg.federation.domains))
        outcome = train_round(runtime, site, cfg, ins, adapter)
        if outcome.adapter is None:
            log.warning("%s stopped after round %d: %s", site.name, r - 1, outcome.message)
            break
        full = dict(adapter)
        full.update(outcome.adapter)
        adapter = full
    ev = evaluate_round(runtime, site, cfg, Instruction(server_round=rounds, seed=cfg.seed), adapter)
    return ev.per_domain


def _media_entries(folder: Path) -> list[Path]:
    """The media under a dataset folder: every file, and every symlinked folder as a whole.

    Real folders are walked (every hospital has e.g. its own signals/ folder, so they are
    merged file by file); a symlinked folder (a partition of one shared root links its
    media folders) is one entry, since its target is the same for every hospital.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):  # does not descend into symlinks
        base = Path(dirpath)
        out += [base / d for d in dirnames if (base / d).is_symlink()]
        # a hospital root's own allow-list is not media (the pool writes its own)
        out += [base / f for f in filenames
                if not (base == folder and (f.startswith("annotation_") or f == LINKED_ROOTS_FILE))]
    return sorted(out)


def _link_into_pool(entry: Path, link: Path, pool: Path, src: Path) -> None:
    """Symlink ``entry`` at ``link``; the same target twice is fine, a different one is not."""
    if link.is_symlink() or link.exists():
        if link.resolve() != entry.resolve():
            raise FileExistsError(f"two hospitals hold different {entry.relative_to(src)}; cannot pool them")
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.parent.resolve().is_relative_to(pool.resolve()):
        # A folder linked by one hospital and real at another: never write into the source.
        raise FileExistsError(f"{entry.relative_to(src)} would land inside another hospital's linked folder")
    os.symlink(entry.resolve(), link)


def _pooled_site(run_dir: Path, sites: list[Site], cfg: FedClimbConfig) -> Site:
    """One site whose data root holds every hospital's records (symlinked media).

    The pool's ``linked_roots.txt`` names every hospital root and the roots they link, so
    the links pass the data-root boundary as an explicit allow-list and nothing else does.
    """
    pool = run_dir / "pooled-data"
    allowed: list[str] = []
    for site in sites:
        src = Path(site.hospital.data_root)
        for folder in (str(src.resolve()), *linked_roots(src)):
            if folder not in allowed:
                allowed.append(folder)
        for path in sorted(src.rglob("annotation_*.jsonl")):
            rel = path.relative_to(src)
            target = pool / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as f:
                f.write(path.read_text(encoding="utf-8"))
            for entry in _media_entries(path.parent):
                _link_into_pool(entry, target.parent / entry.relative_to(path.parent), pool, src)
    (pool / LINKED_ROOTS_FILE).write_text("".join(f"{folder}\n" for folder in allowed), encoding="utf-8")
    state = run_dir / "pooled-state"
    state.mkdir(parents=True, exist_ok=True)
    hospital = copy.deepcopy(sites[0].hospital)
    hospital.name, hospital.data_root, hospital.state_dir = "pooled", str(pool), str(state)
    return Site("pooled", hospital, True)


def _run_arm(cfg: FedClimbConfig, arm: str, run_dir: Path) -> dict[str, dict[str, float]]:
    if arm in ("fedavg-grpo", "domain-drpo"):
        result = run_inprocess(cfg, run_dir)
        return result.history[-1]["evaluate"]["domains"]
    run = prepare_run(cfg, run_dir)
    sites = _sites(run.run_dir, run.sim_root, len(run.roots))
    runtime = Runtime()
    rounds = run.cfg.federation.rounds
    if arm == "local-only":
        return _combine([_local_rounds(runtime, s, run.cfg, rounds) for s in sites])
    pooled = _pooled_site(run.run_dir, sites, run.cfg)
    central = copy.deepcopy(run.cfg)
    central.train.steps = run.cfg.train.steps * len(sites)
    return _combine([_local_rounds(runtime, pooled, central, rounds)])


def summarise(results: dict[str, list[dict[str, dict[str, float]]]]) -> dict[str, dict[str, Any]]:
    """Mean and std over seeds of per-domain and worst-domain balanced accuracy."""
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in results.items():
        domains = sorted({d for r in runs for d in r})
        per_domain = {d: [r[d]["balanced_accuracy"] for r in runs if d in r] for d in domains}
        worst = [min(r[d]["balanced_accuracy"] for d in r) for r in runs]
        reward = [np.average([r[d]["mean_reward"] for d in r], weights=[r[d]["records"] for d in r]) for r in runs]
        out[arm] = {
            "per_domain": {d: (float(np.mean(v)), float(np.std(v))) for d, v in per_domain.items()},
            "worst": (float(np.mean(worst)), float(np.std(worst))),
            "reward": (float(np.mean(reward)), float(np.std(reward))),
            "seeds": len(runs),
        }
    return out


def write_comparison(out: Path, summary: dict[str, dict[str, Any]], cfg: FedClimbConfig) -> None:
    """comparison.md and comparison.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({d for s in summary.values() for d in s["per_domain"]})
    lines = [
        "# fedclimb comparison",
        "",
        f"{cfg.simulation.hospitals} hospitals, {cfg.federation.rounds} rounds x {cfg.train.steps} local steps, "
        f"DP {'on (target epsilon ' + str(cfg.privacy.target_epsilon) + ')' if cfg.privacy.enabled else 'off'}, "
        f"{next(iter(summary.values()))['seeds']} seed(s). Test balanced accuracy, mean +- std over seeds.",
        "",
        "| arm | " + " | ".join(domains) + " | worst domain | mean reward |",
        "|---|" + "---|" * (len(domains) + 2),
    ]
    for arm, s in summary.items():
        cells = [f"{s['per_domain'][d][0]:.3f} +- {s['per_domain'][d][1]:.3f}" if d in s["per_domain"] else "-"
                 for d in domains]
        lines.append(f"| {arm} | " + " | ".join(cells)
                     + f" | **{s['worst'][0]:.3f} +- {s['worst'][1]:.3f}** | {s['reward'][0]:.3f} +- {s['reward'][1]:.3f} |")
    lines += ["", "![comparison](comparison.png)", ""]
    (out / "comparison.md").write_text("\n".join(lines), encoding="utf-8")

    groups = [*domains, "worst domain"]
    width = 0.8 / len(summary)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(groups), 4.8), constrained_layout=True)
    for i, (arm, s) in enumerate(summary.items()):
        means = [s["per_domain"].get(d, (math.nan, 0))[0] for d in domains] + [s["worst"][0]]
        stds = [s["per_domain"].get(d, (0, 0))[1] for d in domains] + [s["worst"][1]]
        xs = np.arange(len(groups)) + (i - (len(summary) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=arm)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=15)
    ax.set_ylabel("test balanced accuracy")
    ax.set_ylim(0, 1.18)  # headroom: the legend sits above the bars
    ax.set_title("Local-only vs FedAvg+GRPO vs domain-aware+DRPO vs centralised DRPO")
    ax.legend(fontsize=8, ncols=len(ARMS), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)


def run_compare(cfg: FedClimbConfig, out: Path, *, seeds: int = 1, quiet: bool = False) -> int:
    """Run every arm for every seed and write the comparison into ``out``."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, dict[str, float]]]] = {arm: [] for arm in ARMS}
    for s in range(seeds):
        for arm in ARMS:
            arm_cfg = _arm_config(cfg, arm, cfg.seed + s)
            if not quiet:
                print(f"seed {cfg.seed + s}: {arm} ...", flush=True)
            domains = _run_arm(arm_cfg, arm, out / arm / f"seed-{cfg.seed + s}")
            results[arm].append(domains)
            if not quiet:
                worst = min(v["balanced_accuracy"] for v in domains.values())
                print(f"  worst-domain balanced accuracy {worst:.3f}", flush=True)
    summary = summarise(results)
    (out / "comparison.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    write_comparison(out, summary, cfg)
    print(out / "comparison.md" if quiet else (out / "comparison.md").read_text())
    return 0

