"""`fedclimb simulate --compare`: ways to train, same data, model, seeds and budget.

- local-only: each hospital trains alone (its own adapter, its own test split);
- fedavg-grpo: A/B averaged separately (fedit), examples weights, GRPO advantages;
- fedavg-grpo+ffa, fedavg-grpo+domain, fedavg-grpo+drpo: FedAvg + GRPO with exactly one
  of fedclimb's three changes (exact ffa aggregation, domain weights, DRPO advantages);
- domain-drpo: all three, the default federation;
- centralised-grpo, centralised-drpo: all hospitals' records pooled in one place.

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
from collections import Counter
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from client.rounds import Instruction, evaluate_round, train_round
from client.runtime import Runtime
from client.site import Site, effective_config
from common.climb.records import LINKED_ROOTS_FILE, linked_roots, load_records
from common.config import FedClimbConfig, load_hospital_config
from simulation.explain import hospital_roots
from simulation.simulate import prepare_run, run_inprocess

log = logging.getLogger(__name__)

__all__ = ["ARMS", "ARM_SETTINGS", "DEFAULT_ARMS", "arm_config", "macro", "mean_ci", "run_arm", "run_compare",
           "summarise", "worst", "write_comparison"]

# (aggregation.mode, aggregation.weighting, advantage.estimator) of every arm; local-only
# keeps the configuration's own settings (one hospital: nothing is aggregated).
ARM_SETTINGS: dict[str, tuple[str, str, str] | None] = {
    "local-only": None,
    "fedavg-grpo": ("fedit", "examples", "grpo"),
    "fedavg-grpo+ffa": ("ffa", "examples", "grpo"),
    "fedavg-grpo+domain": ("fedit", "domain", "grpo"),
    "fedavg-grpo+drpo": ("fedit", "examples", "drpo"),
    # The default less one change: is the exact aggregation what the rest needs, or what hurts?
    "fedavg-grpo+domain+drpo": ("fedit", "domain", "drpo"),
    "domain-drpo": ("ffa", "domain", "drpo"),
    "centralised-grpo": ("ffa", "domain", "grpo"),
    "centralised-drpo": ("ffa", "domain", "drpo"),
}
ARMS = tuple(ARM_SETTINGS)
# What --compare runs unless told otherwise: the four arms of the question it answers.
DEFAULT_ARMS = ("local-only", "fedavg-grpo", "domain-drpo", "centralised-drpo")
FEDERATED = ("fedavg-grpo", "fedavg-grpo+ffa", "fedavg-grpo+domain", "fedavg-grpo+drpo", "fedavg-grpo+domain+drpo",
             "domain-drpo")


def arm_config(cfg: FedClimbConfig, arm: str, seed: int) -> FedClimbConfig:
    """``cfg`` with ``arm``'s aggregation, weighting and estimator, and ``seed``."""
    if arm not in ARM_SETTINGS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    c = copy.deepcopy(cfg)
    c.seed = seed
    settings = ARM_SETTINGS[arm]
    if settings is not None:
        c.aggregation.mode, c.aggregation.weighting, c.advantage.estimator = settings
    return c


def _sites(sim_root: Path, n: int) -> list[Site]:
    return [Site(f"hospital-{i}", load_hospital_config(sim_root / f"hospital-{i}" / "hospital.yaml"), True)
            for i in range(n)]


def _local_rounds(runtime: Runtime, site: Site, cfg: FedClimbConfig, rounds: int) -> list[dict[str, Any]]:
    """Train one site alone for ``rounds`` rounds; its adapter after each round."""
    from common.modeling.lora import init_adapter
    from common.modeling.shapes import adapter_shapes_for

    cfg = effective_config(cfg, site, {})
    adapter = init_adapter(adapter_shapes_for(cfg.model, cfg.lora), seed=cfg.lora.init_seed, b_std=cfg.lora.init_b_std)
    counts = Counter(r.domain for r in load_records(Path(site.hospital.data_root), cfg.data.train_split,
                                                    domain_key=cfg.data.domain_key))
    adapters = []
    for r in range(1, rounds + 1):
        # The statistics a server would broadcast (docs/drpo.md "In the federation"): N_d,
        # the site's training records per domain, and mu_d, the current adapter's mean
        # held-out reward, so DRPO's temperatures mean the same here as in a federation.
        held_out = evaluate_round(runtime, site, cfg, Instruction(server_round=r - 1, seed=cfg.seed), adapter)
        stats = {d: (float(counts[d]), float(e.mean_reward)) for d, e in held_out.per_domain.items()
                 if counts.get(d) and e.records > 0}
        ins = Instruction(server_round=r, seed=cfg.seed, planned_rounds=rounds, domain_names=list(cfg.federation.domains),
                          domain_stats=stats)
        outcome = train_round(runtime, site, cfg, ins, adapter)
        if outcome.adapter is None:
            log.warning("%s stopped after round %d: %s", site.name, r - 1, outcome.message)
            break
        full = dict(adapter)
        full.update(outcome.adapter)
        adapter = full
        adapters.append(adapter)
    return adapters


class Scorer:
    """Scores adapters on one fixed set of test records: every hospital's test split.

    Every arm is measured on the same records, by one model in this process, so arms
    differ only in the adapter. Greedy answers, as ``fedclimb evaluate``.
    """

    def __init__(self, cfg: FedClimbConfig, roots: Sequence[Path]) -> None:
        from client.trainer import LocalTrainer
        from common.climb.records import load_records
        from common.modeling.loader import load_base_model
        from common.modeling.policy import Policy

        self.cfg = cfg
        self.policy = Policy(load_base_model(cfg.model), cfg.lora)
        self.trainer = LocalTrainer(self.policy, cfg)
        self.records = [r for root in roots for r in self.trainer.usable(
            load_records(root, cfg.data.eval_split, domain_key=cfg.data.domain_key))]
        if not self.records:
            raise ValueError(f"no usable {cfg.data.eval_split} records under {', '.join(map(str, roots))}")

    def score(self, adapter: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Per-domain metrics of ``adapter`` (``_FIELDS``) on the test records."""
        self.policy.set_adapter(dict(adapter))
        result = self.trainer.evaluate(self.records, seed=self.cfg.seed)
        return {d: {**{k: float(getattr(e, k)) for k in _FIELDS}, RECALL: dict(e.recalls)}
                for d, e in sorted(result.domains.items())}

    def score_mean(self, adapters: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Per-domain metrics averaged over ``adapters`` (each hospital's own, for local-only)."""
        scores = [self.score(a) for a in adapters]
        out: dict[str, dict[str, Any]] = {}
        for d in scores[0]:
            out[d] = {k: float(np.mean([sc[d][k] for sc in scores])) for k in _FIELDS}
            labels = sorted({c for sc in scores for c in sc[d][RECALL]})
            out[d][RECALL] = {c: float(np.mean([sc[d][RECALL].get(c, 0.0) for sc in scores])) for c in labels}
        return out


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


def run_arm(cfg: FedClimbConfig, arm: str, run_dir: Path) -> dict[str, Any]:
    """Train ``arm`` with ``cfg`` (from :func:`arm_config`) in ``run_dir`` and score it.

    Returns ``{"final": per-domain metrics, "curve": [per-domain metrics after each round]}``,
    per-domain metrics being ``{domain: {records, balanced_accuracy, macro_f1, mean_reward}}``
    on every hospital's test records (:class:`Scorer`). Local-only scores each hospital's
    own adapter on them and averages over hospitals. The federated arms run the ServerApp
    loop and ClientApp in-process; their global adapter is read back from each round's
    checkpoint. Local-only and centralised get, before every round, the domain statistics
    a server would broadcast, computed from their own data (``_local_rounds``).
    """
    from common.modeling.lora import read_peft_folder
    from server.checkpoint import round_dir

    if arm in FEDERATED:
        # The hospitals' own held-out evaluation stays on: it gives the server mu_d, which
        # DRPO's temperatures and the domain weights need (without it every T_d is 1).
        result = run_inprocess(cfg, run_dir)
        run_dir, run_cfg = result.run_dir, result.cfg
        scorer = Scorer(run_cfg, hospital_roots(run_dir))
        curve = []
        for r in range(1, run_cfg.federation.rounds + 1):
            folder = round_dir(run_dir, r) / "adapter"
            if not folder.is_dir():
                break
            curve.append(scorer.score(read_peft_folder(folder)))
        return {"final": curve[-1] if curve else {}, "curve": curve}
    run = prepare_run(cfg, run_dir)
    sites = _sites(run.sim_root, len(run.roots))
    runtime = Runtime()
    rounds = run.cfg.federation.rounds
    scorer = Scorer(run.cfg, run.roots)
    if arm == "local-only":
        per_site = [_local_rounds(runtime, s, run.cfg, rounds) for s in sites]
        last = min(map(len, per_site))
        curve = [scorer.score_mean([a[r] for a in per_site]) for r in range(last)]
    else:
        pooled = _pooled_site(run.run_dir, sites, run.cfg)
        central = copy.deepcopy(run.cfg)
        central.train.steps = run.cfg.train.steps * len(sites)
        curve = [scorer.score(a) for a in _local_rounds(runtime, pooled, central, rounds)]
    return {"final": curve[-1] if curve else {}, "curve": curve}


_FIELDS = ("records", "balanced_accuracy", "macro_f1", "mean_reward")
RECALL = "recall"  # {true class: recall}: which class a domain's answers fall to


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std and the Student-t confidence interval of the mean.

    One value gives an interval of zero width at the value (nothing to estimate it from).
    """
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * std / np.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": float(n)}


def macro(domains: Mapping[str, Mapping[str, float]]) -> float:
    """Unweighted mean balanced accuracy over domains (every domain counts the same)."""
    return float(np.mean([m["balanced_accuracy"] for m in domains.values()]))


def worst(domains: Mapping[str, Mapping[str, float]]) -> float:
    """Balanced accuracy of the worst domain."""
    return float(min(m["balanced_accuracy"] for m in domains.values()))


def summarise(results: dict[str, list[dict[str, dict[str, float]]]], *, reference: str = "fedavg-grpo"
              ) -> dict[str, dict[str, Any]]:
    """Per arm over seeds: per-domain, macro and worst-domain balanced accuracy and reward.

    Each is ``mean_ci`` of the per-seed values. With ``reference`` among the arms,
    ``paired`` holds the mean and interval of the per-seed difference arm - reference
    (macro and worst), seed i of one arm paired with seed i of the other.
    """
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in results.items():
        domains = sorted({d for r in runs for d in r})
        per_domain = {d: [r[d]["balanced_accuracy"] for r in runs if d in r] for d in domains}
        reward = [np.average([r[d]["mean_reward"] for d in r], weights=[r[d]["records"] for d in r]) for r in runs]
        out[arm] = {
            "per_domain": {d: mean_ci(v) for d, v in per_domain.items()},
            "macro": mean_ci([macro(r) for r in runs]),
            "worst": mean_ci([worst(r) for r in runs]),
            "reward": mean_ci(reward),
            "seeds": len(runs),
        }
    ref = results.get(reference)
    if ref:
        for arm, runs in results.items():
            if arm == reference or len(runs) != len(ref):
                continue
            out[arm]["paired"] = {
                f"{name}_minus_{reference}": mean_ci([f(a) - f(b) for a, b in zip(runs, ref, strict=True)])
                for name, f in (("macro", macro), ("worst", worst))
            }
    return out


def _cell(ci: Mapping[str, float]) -> str:
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]" if ci["n"] > 1 else f"{ci['mean']:.3f}"


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
        f"{next(iter(summary.values()))['seeds']} seed(s). Test balanced accuracy, mean over seeds "
        "[95% confidence interval].",
        "",
        "| arm | " + " | ".join(domains) + " | macro | worst domain | mean reward |",
        "|---|" + "---|" * (len(domains) + 3),
    ]
    for arm, s in summary.items():
        cells = [_cell(s["per_domain"][d]) if d in s["per_domain"] else "-" for d in domains]
        lines.append(f"| {arm} | " + " | ".join(cells)
                     + f" | {_cell(s['macro'])} | **{_cell(s['worst'])}** | {_cell(s['reward'])} |")
    lines += ["", "![comparison](comparison.png)", ""]
    (out / "comparison.md").write_text("\n".join(lines), encoding="utf-8")

    groups = [*domains, "worst domain"]
    width = 0.8 / len(summary)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(groups), 4.8), constrained_layout=True)
    for i, (arm, s) in enumerate(summary.items()):
        cis = [s["per_domain"].get(d) for d in domains] + [s["worst"]]
        means = [c["mean"] if c else math.nan for c in cis]
        errors = np.array([[c["mean"] - c["low"], c["high"] - c["mean"]] if c else [0, 0] for c in cis]).T
        xs = np.arange(len(groups)) + (i - (len(summary) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=arm)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=15)
    ax.set_ylabel("test balanced accuracy")
    ax.set_ylim(0, 1.18)  # headroom: the legend sits above the bars
    ax.set_title(" vs ".join(summary))
    ax.legend(fontsize=8, ncols=min(4, len(summary)), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)


def run_compare(cfg: FedClimbConfig, out: Path, *, seeds: int = 1, quiet: bool = False,
                arms: Sequence[str] = DEFAULT_ARMS) -> int:
    """Run every arm for every seed and write the comparison into ``out``."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for arm in arms:
        if arm not in ARM_SETTINGS:
            raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    results: dict[str, list[dict[str, dict[str, float]]]] = {arm: [] for arm in arms}
    curves: dict[str, list[list[dict[str, dict[str, float]]]]] = {arm: [] for arm in arms}
    for s in range(seeds):
        for arm in arms:
            arm_cfg = arm_config(cfg, arm, cfg.seed + s)
            if not quiet:
                print(f"seed {cfg.seed + s}: {arm} ...", flush=True)
            outcome = run_arm(arm_cfg, arm, out / arm / f"seed-{cfg.seed + s}")
            results[arm].append(outcome["final"])
            curves[arm].append(outcome["curve"])
            if not quiet:
                print(f"  worst-domain balanced accuracy {worst(outcome['final']):.3f}", flush=True)
    summary = summarise(results)
    (out / "comparison.json").write_text(json.dumps({"summary": summary, "runs": results, "curves": curves,
                                                     "seeds": [cfg.seed + s for s in range(seeds)]}, indent=2))
    write_comparison(out, summary, cfg)
    print(out / "comparison.md" if quiet else (out / "comparison.md").read_text())
    return 0
