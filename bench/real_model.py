"""A real pretrained model learning a real clinical task through fedclimb, end to end.

    python bench/real_model.py --out runs/real-model          # about an hour on 2 CPU cores

1. ``fedclimb data from-table --builtin breast-cancer``: scikit-learn's Wisconsin
   Diagnostic Breast Cancer set (569 patients, benign/malignant) as CLIMB text records,
   each feature with its percentile band in words, pseudonymous patient ids.
2. ``fedclimb evaluate`` of the base model alone (SmolLM2-135M-Instruct, zero-shot) with
   the constant-answer baseline.
3. ``fedclimb simulate`` on 3 hospitals (Dirichlet label skew) with DRPO, with DP
   (epsilon = 8 per hospital) and without.
4. ``fedclimb evaluate`` of each final adapter on the pooled test split.

Writes ``summary.json`` (every number below, per run), ``real_model.png`` (held-out
balanced accuracy per round of both runs against the zero-shot and constant baselines)
and ``commands.txt`` (the exact commands) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

FEDCLIMB = [sys.executable, "-m", "simulation.cli"]


def model_words(args: argparse.Namespace) -> list[str]:
    """The model and rollout settings every step shares (one place)."""
    return [
        "model=smollm2-135m", "model.precision=bf16", f"model.cpu_threads={args.threads}",
        "prompt.constrained=true",
        f"rollout.num_rollouts={args.rollouts}", f"rollout.batch_prompts={args.prompts}", f"rollout.temperature={args.temperature}",
        "rollout.eval_batch_prompts=32", f"train.lr={args.lr}", f"train.kl_coef={args.kl_coef}",
    ]


def run(cmd: list[str], log: Path, commands: list[str]) -> None:
    shown = "fedclimb " + " ".join(shlex.quote(c) for c in cmd[len(FEDCLIMB):])
    commands.append(shown)
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    print(f"  exit {done.returncode} in {time.perf_counter() - t0:.0f} s (log {log})", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {shown}; see {log}")


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """(round, records-weighted test balanced accuracy) from a simulate run's metrics.json."""
    out = []
    for entry in json.loads((run_dir / "metrics.json").read_text()):
        domains = (entry.get("evaluate") or {}).get("domains") or {}
        n = sum(d["records"] for d in domains.values())
        if n:
            out.append((entry["server_round"], sum(d["balanced_accuracy"] * d["records"] for d in domains.values()) / n))
    return out


def plot(path: Path, curves: dict[str, list[tuple[int, float]]], zero_shot: float, constant: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)
    for (name, pts), style in zip(curves.items(), ("-o", "-s"), strict=False):
        ax.plot([r for r, _ in pts], [v for _, v in pts], style, linewidth=2, label=name)
    ax.axhline(zero_shot, color="grey", linestyle="--", label=f"base model zero-shot ({zero_shot:.3f})")
    ax.axhline(constant, color="black", linestyle=":", label=f"constant answer ({constant:.3f})")
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("held-out balanced accuracy (hospitals' test splits)")
    ax.set_ylim(0.3, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("SmolLM2-135M on breast-cancer FNA features, 3 hospitals, federated DRPO")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/real-model")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="local steps per round")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--rollouts", type=int, default=4, help="rollouts per prompt")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature: answers are constrained to the options, so 1.0 stays coherent and "
                        "explores (at 0.7 every rollout of a group gave the same answer and no group had a signal)")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="KL to the start model (0 saves a reference forward per step; the run is short)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per hospital (hospitals train one at a time)")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--features", default="worst concave points,worst perimeter,worst texture,worst area",
                   help="the breast-cancer features the prompt lists (from-table --features)")
    p.add_argument("--values", action="store_true",
                   help="write each feature's value beside its band (default: the band in words only, "
                        "which keeps prompts short: ~150 tokens with 4 features)")
    p.add_argument("--balance-train", action=argparse.BooleanOptionalAction, default=True,
                   help="from-table --balance-train: as many benign as malignant training rows (test keeps the "
                        "natural 63/37 mix); without it group-normalised RL drifts to the majority answer")
    p.add_argument("--skip-dp", action="store_true")
    p.add_argument("--skip-nodp", action="store_true")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    data = out / "data"
    if not (data / "tabular").is_dir():
        run([*FEDCLIMB, "data", "from-table", str(data), "--builtin", "breast-cancer", "--salt-file", str(out / "salt.hex"),
             "--features", args.features, *([] if args.values else ["--bands-only"]),
             *(["--balance-train"] if args.balance_train else [])],
            out / "from-table.log", commands)
    words = model_words(args)
    if not (out / "zero-shot" / "evaluation.json").is_file():
        run([*FEDCLIMB, "evaluate", "--data", str(data), "--out", str(out / "zero-shot"), *words],
            out / "zero-shot.log", commands)
    zero = json.loads((out / "zero-shot" / "evaluation.json").read_text())
    fed = ["--data", str(data), "--hospitals", "3", "simulation.partition=dirichlet", "simulation.dirichlet_alpha=0.5",
           f"federation.rounds={args.rounds}", f"train.steps={args.steps}", "simulation.parallel_hospitals=1", *words]
    runs = {}
    for name, extra in (("DRPO + DP (eps %g)" % args.epsilon, [f"privacy.target_epsilon={args.epsilon}"]),
                        ("DRPO, no DP", ["privacy=off"])):
        tag = "nodp" if "no DP" in name else "dp"
        if ("no DP" in name and args.skip_nodp) or ("+ DP" in name and args.skip_dp):
            if (out / f"{tag}-final" / "evaluation.json").is_file():  # run by an earlier invocation
                earlier = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
                runs[name] = {"tag": tag, "curve": curve(out / tag),
                              "settings": earlier.get("runs", {}).get(name, {}).get("settings", earlier.get("settings")),
                              "final": json.loads((out / f"{tag}-final" / "evaluation.json").read_text())}
            continue
        run([*FEDCLIMB, "simulate", "--out", str(out / tag), "--quiet", *fed, *extra], out / f"simulate-{tag}.log", commands)
        run([*FEDCLIMB, "evaluate", "--adapter", str(out / tag), "--data", str(data), "--out", str(out / f"{tag}-final"),
             "--explain", "4"], out / f"evaluate-{tag}.log", commands)
        runs[name] = {"tag": tag, "curve": curve(out / tag), "settings": vars(args),
                      "final": json.loads((out / f"{tag}-final" / "evaluation.json").read_text())}
    overall = zero["domains"]["wdbc"]
    summary = {
        "settings": vars(args),
        "zero_shot": {"balanced_accuracy": overall["balanced_accuracy"], "confusion": overall["confusion"],
                      "format_rate": overall["format_rate"]},
        "constant": overall["constant"],
        "runs": {k: {"settings": v["settings"], "curve": v["curve"], "final": v["final"]["domains"]["wdbc"]}
                 for k, v in runs.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "commands.txt", "a", encoding="utf-8") as f:  # an earlier invocation's commands stay
        f.write("\n".join(commands) + "\n")
    plot(out / "real_model.png", {k: v["curve"] for k, v in runs.items()}, overall["balanced_accuracy"],
         overall["constant"]["balanced_accuracy"])
    print(json.dumps({k: v["final"]["domains"]["wdbc"]["balanced_accuracy"] for k, v in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
