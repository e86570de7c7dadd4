"""Paired comparisons across learning-benchmark folders: what an override changes, seed by seed.

    python bench/learning_paired.py --setting nodp --reference fedavg \\
        fedavg=runs/learning-10s:fedavg-grpo default=runs/learning-10s:domain-drpo \\
        default+keep=runs/learning-keep:domain-drpo --out runs/keep.json --plot runs/keep.png

Each ``LABEL=DIR:ARM`` names one arm's cached runs (``DIR/jobs/SETTING/ARM/seed-*.json``,
written by bench/learning.py, e.g. with an extra ``key=value`` override into its own
``--out``). On the seeds every entry has (the same pools, so the same data and hospitals),
it prints and writes, per entry, the mean and 95% Student-t interval of macro, worst-domain
and rarest-domain balanced accuracy and the rarest domain's recall of each class, and the
paired difference to ``--reference``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.learning import load_results, rarest_domain  # noqa: E402
from simulation.compare import macro, mean_ci, worst  # noqa: E402


def parse_entry(text: str) -> tuple[str, Path, str]:
    label, sep, rest = text.partition("=")
    folder, colon, arm = rest.rpartition(":")
    if not (sep and colon and label and folder and arm):
        raise SystemExit(f"{text!r}: expected LABEL=DIR:ARM")
    return label, Path(folder), arm


def load_runs(folder: Path, setting: str, arm: str) -> dict[int, dict[str, Any]]:
    """seed -> final scores of one arm's finished runs (bench/learning.py's cache)."""
    runs = {seed: r["final"] for seed, r in load_results(folder).get(setting, {}).get(arm, {}).items()}
    if not runs:
        raise SystemExit(f"no finished runs under {folder / 'jobs' / setting / arm}")
    return runs


def pool_rarest_domain(folder: Path, seed: int) -> str:
    manifest = json.loads((folder / "pools" / f"seed-{seed}" / "graded.json").read_text(encoding="utf-8"))
    return rarest_domain(manifest)


def measures(final: dict[str, Any], rare: str) -> dict[str, float]:
    out = {"macro": macro(final), "worst": worst(final), "rarest": float(final[rare]["balanced_accuracy"])}
    for cls, recall in sorted(final[rare].get("recall", {}).items()):
        out[f"rarest recall {cls}"] = float(recall)
    return out


def compare(entries: list[tuple[str, Path, str]], setting: str, reference: str) -> dict[str, Any]:
    runs = {label: load_runs(folder, setting, arm) for label, folder, arm in entries}
    if reference not in runs:
        raise SystemExit(f"--reference {reference!r} is not one of the labels {list(runs)}")
    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not seeds:
        raise SystemExit("the entries have no seed in common")
    rare = pool_rarest_domain(entries[0][1], seeds[0])
    values = {label: [measures(r[s], rare) for s in seeds] for label, r in runs.items()}
    names = list(values[reference][0])
    report: dict[str, Any] = {"setting": setting, "seeds": seeds, "rarest_domain": rare, "reference": reference,
                              "entries": {label: f"{folder}:{arm}" for label, folder, arm in entries}, "arms": {}}
    for label, vals in values.items():
        arm: dict[str, Any] = {"per_seed": vals, "mean": {n: mean_ci([v[n] for v in vals]) for n in names}}
        if label != reference:
            arm["paired"] = {n: mean_ci([v[n] - w[n] for v, w in zip(vals, values[reference], strict=True)])
                             for n in ("macro", "worst", "rarest")}
        report["arms"][label] = arm
    return report


def table(report: dict[str, Any]) -> str:
    ci = lambda c: f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"  # noqa: E731
    ref = report["reference"]
    lines = [f"{report['setting']}, seeds {report['seeds']}, rarest domain {report['rarest_domain']}", "",
             f"| entry | macro | worst | rarest | rarest recalls | paired - {ref}: macro | worst | rarest |",
             "|---|---|---|---|---|---|---|---|"]
    for label, arm in report["arms"].items():
        m = arm["mean"]
        recalls = " / ".join(f"{v['mean']:.2f}" for k, v in m.items() if k.startswith("rarest recall"))
        paired = arm.get("paired")
        tail = " | ".join(ci(paired[n]) for n in ("macro", "worst", "rarest")) if paired else "- | - | -"
        lines.append(f"| {label} | {ci(m['macro'])} | {ci(m['worst'])} | {ci(m['rarest'])} | {recalls} | {tail} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per measure (macro, worst, rarest): each entry's seeds as dots, mean and 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["arms"])
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.6 * len(labels), 4.2), sharey=True)
    for ax, name in zip(axes, ("macro", "worst", "rarest"), strict=True):
        for x, label in enumerate(labels):
            arm = report["arms"][label]
            values = [v[name] for v in arm["per_seed"]]
            ax.scatter([x + 0.12] * len(values), values, s=12, color="0.6", zorder=2)
            ci = arm["mean"][name]
            ax.errorbar([x - 0.08], [ci["mean"]], yerr=[[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]],
                        fmt="o", color="C0" if label == report["reference"] else "C1", capsize=4, zorder=3)
        ax.axhline(0.5, color="k", lw=0.8, ls=":")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        titles = {"macro": "macro balanced accuracy", "worst": "worst-domain balanced accuracy",
                  "rarest": f"rarest domain ({report['rarest_domain']})"}
        ax.set_title(titles[name])
    axes[0].set_ylabel(f"test balanced accuracy, {report['setting']}, {len(report['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("entries", nargs="+", help="LABEL=DIR:ARM")
    p.add_argument("--setting", default="nodp", help="nodp, dp8 or eps<E>")
    p.add_argument("--reference", required=True, help="the label the paired differences are taken against")
    p.add_argument("--out", help="also write the report as JSON")
    p.add_argument("--plot", help="also draw the seeds, means and intervals as a PNG")
    args = p.parse_args(argv)
    report = compare([parse_entry(e) for e in args.entries], args.setting, args.reference)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    if args.plot:
        plot(report, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
