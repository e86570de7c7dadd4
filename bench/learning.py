"""What federated DRPO buys: the learning benchmark behind docs/results/learning.md.

    python bench/learning.py --out runs/learning            # every number, about 2 h on 2 cores
    python bench/learning.py --out runs/learning --report-only --docs docs/results

1. One graded-rarity pool per seed (``fedclimb data synth OUT --graded 40,25,15,8,2``):
   five lab-panel domains built alike, differing only in their words and their share of
   the training records; valid/test balanced and equal for every domain.
2. Every arm of ``simulation.compare`` (local-only, FedAvg + GRPO, each single change
   from it, fedclimb's default, centralised GRPO and DRPO) on the ``benchmark``
   federation preset (4 hospitals, Dirichlet label skew), for every seed, with DP at
   epsilon = 8 per hospital and without DP.
3. The epsilon sweep of fedclimb's default arm: epsilon in {1, 3, 8, 32, inf}.

Every run is scored after every round on the same records (every hospital's test split).
Each run's result is cached under ``--out/jobs``, so an interrupted benchmark resumes;
``--workers`` runs go side by side, one CPU thread each. Writes ``comparison.json``
(per-seed values), ``learning.md`` and the figures to ``--out`` (and ``--docs``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation.compare import ARMS, macro, summarise, worst  # noqa: E402

SETTINGS = {"dp8": ["privacy.target_epsilon=8"], "nodp": ["privacy=off"]}
# Twice the tiny preset's 0.005: on the seed-0 pool alone (no DP), 40 steps at 0.01 reached
# macro balanced accuracy 0.78 against 0.70 for 60 steps at 0.005; 0.02 collapsed onto one
# answer. Not in configs/federation/benchmark.yaml, whose values raise hospitals' default limits.
DEFAULT_OVERRIDES = ("train.lr=0.01",)
REFERENCE = "fedavg-grpo"
DEFAULT = "domain-drpo"
CENTRAL = "centralised-drpo"


def job_overrides(setting: str) -> list[str]:
    """Config overrides of a setting: dp8, nodp, or eps<E> (the sweep)."""
    if setting in SETTINGS:
        return SETTINGS[setting]
    return [f"privacy.target_epsilon={float(setting[3:])}"]


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One arm, one seed, one privacy setting, in a worker process; cached as JSON."""
    from common.config import load_config
    from simulation.compare import arm_config, run_arm

    result_file = Path(spec["result"])
    cfg = load_config(overrides=["federation=benchmark", f"simulation.data_root={spec['pool']}",
                                 "model.cpu_threads=1", *spec["overrides"], *job_overrides(spec["setting"])])
    run_dir = Path(spec["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    outcome = run_arm(arm_config(cfg, spec["arm"], spec["seed"]), spec["arm"], run_dir)
    outcome |= {"seconds": time.perf_counter() - t0, **{k: spec[k] for k in ("arm", "seed", "setting")}}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(outcome, indent=1), encoding="utf-8")
    if not spec["keep_runs"]:
        shutil.rmtree(run_dir, ignore_errors=True)
    return outcome


def plan(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    jobs = []
    seeds = list(range(args.seed, args.seed + args.seeds))

    def add(setting: str, arm: str, seed: int) -> None:
        jobs.append({"setting": setting, "arm": arm, "seed": seed, "pool": str(out / "pools" / f"seed-{seed}"),
                     "result": str(out / "jobs" / setting / arm / f"seed-{seed}.json"),
                     "run_dir": str(out / "runs" / setting / arm / f"seed-{seed}"),
                     "overrides": args.overrides, "keep_runs": args.keep_runs})

    for seed in seeds:  # seed-major: a cut-short benchmark still has every arm on its first seeds
        for setting in args.settings:
            for arm in args.arms:
                add(setting, arm, seed)
    for seed in seeds[: args.sweep_seeds]:
        for eps in args.sweep:
            if math.isfinite(eps) and eps != 8:
                add(f"eps{eps:g}", DEFAULT, seed)
    return jobs


def load_results(out: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """results[setting][arm][seed] from the cached job files."""
    results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for f in sorted((out / "jobs").glob("*/*/seed-*.json")):
        r = json.loads(f.read_text(encoding="utf-8"))
        if r.get("final"):
            results.setdefault(r["setting"], {}).setdefault(r["arm"], {})[int(r["seed"])] = r
    return results


def _complete(per_arm: dict[str, dict[int, Any]]) -> tuple[list[int], dict[str, list[dict[str, Any]]]]:
    """The seeds every reported arm has, and each arm's runs on them (paired by seed).

    An arm with fewer than half the seeds of the most complete arm is left out rather than
    cutting every arm down to its seeds; a benchmark cut short (seed-major order) loses
    at most its last, partial seed.
    """
    most = max((len(v) for v in per_arm.values()), default=0)
    kept = {arm: runs for arm, runs in per_arm.items() if 2 * len(runs) >= most}
    seeds = sorted(set.intersection(*(set(v) for v in kept.values()))) if kept else []
    return seeds, {arm: [kept[arm][s] for s in seeds] for arm in ARMS if arm in kept}


def sweep_points(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """epsilon -> {seeds, macro, worst} per seed of the default arm (inf = no DP)."""
    points = {}
    for setting, per_arm in results.items():
        eps = {"dp8": 8.0, "nodp": math.inf}.get(setting) or (float(setting[3:]) if setting.startswith("eps") else None)
        runs = per_arm.get(DEFAULT, {})
        if eps is None or not runs:
            continue
        seeds = sorted(runs)
        points[f"{eps:g}"] = {"epsilon": eps, "seeds": seeds,
                              "macro": [macro(runs[s]["final"]) for s in seeds],
                              "worst": [worst(runs[s]["final"]) for s in seeds]}
    return dict(sorted(points.items(), key=lambda kv: kv[1]["epsilon"]))


def rarest_domain(manifest: dict[str, Any]) -> str:
    """The domain with the fewest training records in a pool's ``graded.json``."""
    return min(manifest["counts"], key=lambda d: manifest["counts"][d]["train"])


def write_report(out: Path, results: dict[str, Any], manifest: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from simulation.compare import mean_ci

    rare = rarest_domain(manifest)
    report: dict[str, Any] = {"pool": manifest, "rare_domain": rare, "settings": {}, "sweep": sweep_points(results)}
    for setting in ("dp8", "nodp"):
        if setting not in results:
            continue
        seeds, runs = _complete(results[setting])
        if not seeds:
            continue
        summary = summarise({arm: [r["final"] for r in rs] for arm, rs in runs.items()}, reference=REFERENCE)
        report["settings"][setting] = {
            "seeds": seeds, "summary": summary,
            "runs": {arm: [{"seed": r["seed"], "final": r["final"], "curve": r["curve"], "seconds": r["seconds"]}
                           for r in rs] for arm, rs in runs.items()},
        }
    for point in report["sweep"].values():
        point["macro_ci"], point["worst_ci"] = mean_ci(point["macro"]), mean_ci(point["worst"])
    (out / "comparison.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    plot_overview(out / "learning.png", report)
    plot_rare_curves(out / "learning_rare_curve.png", report)
    if report["sweep"]:
        plot_sweep(out / "learning_epsilon.png", report)
    (out / "learning.md").write_text(markdown(report, args), encoding="utf-8")
    return report


def _ci_text(ci: dict[str, float]) -> str:
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def targets(report: dict[str, Any]) -> list[str]:
    lines = []
    for setting, s in report["settings"].items():
        summ = s["summary"]
        if DEFAULT not in summ or REFERENCE not in summ:
            continue
        if CENTRAL in summ:
            # The benchmark's precondition: the centralised arm learns every domain, the rarest
            # included. Without it neither target can show what federated DRPO buys.
            central = summ[CENTRAL]
            learnt = central["worst"]["low"] > 0.5
            lines.append(f"- {setting}: precondition, {CENTRAL} learns every domain (worst-domain 95% interval "
                         f"above 0.5): {_ci_text(central['worst'])} -> **{'holds' if learnt else 'does not hold'}**"
                         + ("" if learnt else ": the comparison below cannot answer the question at this budget") + ".")
        diff = summ[DEFAULT]["paired"][f"worst_minus_{REFERENCE}"]
        met = diff["low"] > 0
        lines.append(f"- {setting}: worst-domain balanced accuracy, {DEFAULT} - {REFERENCE}, paired over "
                     f"{len(s['seeds'])} seeds: {_ci_text(diff)} -> target (interval above 0) "
                     f"**{'met' if met else 'not met'}**.")
        if CENTRAL in summ:
            ratio = summ[DEFAULT]["macro"]["mean"] / summ[CENTRAL]["macro"]["mean"]
            lines.append(f"- {setting}: macro balanced accuracy {DEFAULT} / {CENTRAL} = "
                         f"{summ[DEFAULT]['macro']['mean']:.3f} / {summ[CENTRAL]['macro']['mean']:.3f} = {ratio:.3f} "
                         f"-> target (>= 0.90) **{'met' if ratio >= 0.9 else 'not met'}**.")
    return lines


def rare_recall_table(rare: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown lines: the rarest domain's recall of each class per arm, mean over seeds.

    A balanced accuracy near 0.5 is either guessing or one answer for every record (recall
    1 and 0); this tells them apart. Empty for results scored before recalls were kept."""
    import numpy as np

    per_arm = {arm: [r["final"][rare]["recall"] for r in rs if "recall" in r["final"].get(rare, {})]
               for arm, rs in runs.items()}
    per_arm = {arm: v for arm, v in per_arm.items() if v and len(v) == len(runs[arm])}
    if not per_arm:
        return []
    classes = sorted({c for v in per_arm.values() for rec in v for c in rec})
    lines = ["", f"{rare}: recall of each true class (mean over seeds; 1.0 and 0.0 = one answer for all).", "",
             "| arm | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for arm, v in per_arm.items():
        lines.append(f"| {arm} | " + " | ".join(f"{np.mean([rec.get(c, 0.0) for rec in v]):.2f}" for c in classes) + " |")
    return lines


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    counts = report["pool"]["counts"]
    lines = ["# Learning benchmark (generated by bench/learning.py)", "",
             "Training records per domain (seed 0 pool): "
             + ", ".join(f"{d} {c['train']}" for d, c in counts.items())
             + f"; test {next(iter(counts.values()))['test']} per domain (balanced). Rarest: {report['rare_domain']}.",
             "", "## Targets", "", *targets(report), ""]
    for setting, s in report["settings"].items():
        summ = s["summary"]
        domains = sorted({d for v in summ.values() for d in v["per_domain"]})
        lines += [f"## {setting} ({len(s['seeds'])} seeds: {', '.join(map(str, s['seeds']))})", "",
                  "Test balanced accuracy, mean [95% CI] over seeds; paired differences are per seed "
                  f"against {REFERENCE}.", "",
                  "| arm | " + " | ".join(domains) + " | macro | worst | macro - ref | worst - ref |",
                  "|---|" + "---|" * (len(domains) + 4)]
        for arm, v in summ.items():
            paired = v.get("paired", {})
            cells = [f"{v['per_domain'][d]['mean']:.3f}" if d in v["per_domain"] else "-" for d in domains]
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {_ci_text(v['macro'])} | {_ci_text(v['worst'])} | "
                         + (_ci_text(paired[f'macro_minus_{REFERENCE}']) if paired else "-") + " | "
                         + (_ci_text(paired[f'worst_minus_{REFERENCE}']) if paired else "-") + " |")
        lines += rare_recall_table(report["rare_domain"], s["runs"])
        secs = [r["seconds"] for rs in s["runs"].values() for r in rs]
        lines += ["", f"{len(secs)} runs, {sum(secs) / 60:.0f} min of worker time.", ""]
    if report["sweep"]:
        lines += ["## Epsilon sweep (" + DEFAULT + ")", "", "| epsilon | seeds | macro | worst |", "|---|---|---|---|"]
        for key, p in report["sweep"].items():
            lines.append(f"| {key} | {len(p['seeds'])} | {_ci_text(p['macro_ci'])} | {_ci_text(p['worst_ci'])} |")
        lines.append("")
    lines += ["![overview](learning.png)", "", "![rare domain](learning_rare_curve.png)", ""]
    if report["sweep"]:
        lines += ["![epsilon](learning_epsilon.png)", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_overview(path: Path, report: dict[str, Any]) -> None:
    """Macro and worst-domain balanced accuracy per arm (95% CI), one panel per setting."""
    import numpy as np

    plt = _plt()
    settings = list(report["settings"])
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.6), squeeze=False,
                             constrained_layout=True)
    for ax, setting in zip(axes[0], settings, strict=True):
        summ = report["settings"][setting]["summary"]
        arms = list(summ)
        xs = np.arange(len(arms))
        for offset, key, colour in ((-0.2, "macro", "tab:blue"), (0.2, "worst", "tab:red")):
            cis = [summ[a][key] for a in arms]
            means = [c["mean"] for c in cis]
            err = np.array([[c["mean"] - c["low"], c["high"] - c["mean"]] for c in cis]).T
            ax.bar(xs + offset, means, 0.4, yerr=err, capsize=3, color=colour, alpha=0.8,
                   label=f"{key} balanced accuracy")
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(xs, arms, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{setting}: {len(report['settings'][setting]['seeds'])} seeds, 95% CI")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rare_curves(path: Path, report: dict[str, Any]) -> None:
    """The rarest domain's test balanced accuracy after each round, mean over seeds, per arm."""
    import numpy as np

    plt = _plt()
    settings = list(report["settings"])
    if not settings:
        return
    rare = report["rare_domain"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.4), squeeze=False,
                             constrained_layout=True)
    for ax, setting in zip(axes[0], settings, strict=True):
        for arm, runs in report["settings"][setting]["runs"].items():
            rounds = min(len(r["curve"]) for r in runs)
            ys = [float(np.mean([r["curve"][i][rare]["balanced_accuracy"] for r in runs if rare in r["curve"][i]]))
                  for i in range(rounds)]
            ax.plot(range(1, rounds + 1), ys, marker="o", linewidth=2 if arm == DEFAULT else 1,
                    linestyle="--" if arm.startswith("centralised") else "-", label=arm)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{rare} test balanced accuracy")
        ax.set_ylim(0.3, 1.02)
        ax.set_title(f"rarest domain, {setting} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: Path, report: dict[str, Any]) -> None:
    """Privacy/accuracy trade-off of the default arm (no DP drawn at the right edge)."""
    plt = _plt()
    points = list(report["sweep"].values())
    finite = [p["epsilon"] for p in points if math.isfinite(p["epsilon"])]
    inf_x = max(finite) * 4 if finite else 1.0
    xs = [p["epsilon"] if math.isfinite(p["epsilon"]) else inf_x for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for key, colour in (("macro", "tab:blue"), ("worst", "tab:red")):
        cis = [p[f"{key}_ci"] for p in points]
        ax.errorbar(xs, [c["mean"] for c in cis], yerr=[[c["mean"] - c["low"] for c in cis],
                                                        [c["high"] - c["mean"] for c in cis]],
                    marker="o", capsize=3, color=colour, label=f"{key} balanced accuracy")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{p['epsilon']:g}" if math.isfinite(p["epsilon"]) else "no DP" for p in points])
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epsilon per hospital (delta 1e-5)")
    ax.set_ylabel("test balanced accuracy")
    ax.set_ylim(0.3, 1.02)
    ax.set_title(f"{DEFAULT}: privacy vs accuracy (95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/learning")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one CPU thread each")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--settings", default="dp8,nodp", help="dp8 (epsilon 8 per hospital) and/or nodp")
    p.add_argument("--sweep", default="1,3,8,32,inf", help="epsilons of the sweep ('' for none)")
    p.add_argument("--sweep-seeds", type=int, default=5)
    p.add_argument("--graded", default="40,25,15,8,2", help="training shares of the five domains")
    p.add_argument("--train-records", type=int, default=1000)
    p.add_argument("--keep-runs", action="store_true", help="keep every run directory (checkpoints)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the cached runs")
    p.add_argument("--docs", help="also copy the figures, comparison.json and learning.md (as tables.md) into DOCS/learning/")
    p.add_argument("overrides", nargs="*",
                   help=f"config overrides for every run, after {' '.join(DEFAULT_OVERRIDES)} (so they win), "
                        "e.g. federation.rounds=12 train.lr=0.005")
    args = p.parse_args(argv)
    args.overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    args.arms = [a for a in args.arms.split(",") if a]
    args.settings = [s for s in args.settings.split(",") if s]
    args.sweep = [float(x) for x in args.sweep.split(",") if x]
    unknown = [a for a in args.arms if a not in ARMS] + [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown arm or setting: {', '.join(unknown)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from simulation.synth_graded import GENERATOR, generate_graded, parse_shares

    shares = parse_shares(args.graded)
    for seed in range(args.seed, args.seed + max(args.seeds, args.sweep_seeds)):
        pool = out / "pools" / f"seed-{seed}"
        if not (pool / "graded.json").is_file():
            generate_graded(pool, shares=shares, train_records=args.train_records, seed=seed, overwrite=True)
        held = json.loads((pool / "graded.json").read_text(encoding="utf-8"))
        if (held.get("generator"), held.get("shares"), held.get("train_records")) != (
                GENERATOR, list(shares), args.train_records):
            # Its cached job results were measured on that other pool: never mix them in.
            p.error(f"{pool} was written by {held.get('generator')} with shares {held.get('shares')} and "
                    f"{held.get('train_records')} training records, not by {GENERATOR} with "
                    f"{list(shares)} and {args.train_records}; choose a new --out")
    if not args.report_only:
        todo = [j for j in plan(args, out) if not Path(j["result"]).is_file()]
        print(f"{len(todo)} runs to do ({args.workers} at a time); cached results under {out / 'jobs'}", flush=True)
        os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                          PYTHONWARNINGS="ignore")
        t0 = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.workers, maxtasksperchild=1) as pool:
            for i, r in enumerate(pool.imap_unordered(run_job, todo), 1):
                elapsed = time.perf_counter() - t0
                print(f"[{i}/{len(todo)}] {r['setting']} {r['arm']} seed {r['seed']}: macro {macro(r['final']):.3f} "
                      f"worst {worst(r['final']):.3f} ({r['seconds']:.0f} s; eta {elapsed / i * (len(todo) - i) / 60:.0f} min)",
                      flush=True)
    manifest = json.loads((out / "pools" / f"seed-{args.seed}" / "graded.json").read_text(encoding="utf-8"))
    report = write_report(out, load_results(out), manifest, args)
    print("\n".join(targets(report)))
    print(out / "learning.md")
    if args.docs:
        docs = Path(args.docs)
        (docs / "learning").mkdir(parents=True, exist_ok=True)
        for name in ("comparison.json", "learning.md", "learning.png", "learning_rare_curve.png",
                     "learning_epsilon.png"):
            if (out / name).is_file():
                shutil.copy(out / name, docs / "learning" / ("tables.md" if name == "learning.md" else name))
        print(f"figures and comparison.json copied to {docs / 'learning'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
