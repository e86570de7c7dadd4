"""The run report: report.md, learning_curves.png and metrics.jsonl from metrics.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import keys
from common.config import FedClimbConfig, to_yaml

__all__ = ["metric_rows", "write_metrics_jsonl", "plot_learning_curves", "write_report", "domain_table"]

EVAL_FIELDS = {
    keys.E_RECORDS: "records",
    keys.E_BALANCED_ACCURACY: "balanced_accuracy",
    keys.E_MACRO_F1: "macro_f1",
    keys.E_MEAN_IOU: "mean_iou",
    keys.E_FORMAT_RATE: "format_rate",
    keys.E_MEAN_REWARD: "mean_reward",
    keys.E_ACCURACY: "accuracy",
}


# How the hospitals' evaluation metrics left them under DP (privacy.eval_release).
EVAL_RELEASE = {
    "exact": "exact metrics: every hospital opted in (privacy.eval_release: exact in its hospital.yaml), so "
             "the test metrics below are outside the DP guarantee",
    "dp": "noisy per-domain sums (Gaussian mechanism, charged to each hospital's ledger); balanced accuracy "
          "and macro-F1 are not released",
    "none": "none (privacy.eval_release: none): no test metrics",
}


def metric_rows(history: Sequence[dict[str, Any]], domains: Sequence[str]) -> list[dict[str, Any]]:
    """One row per round x hospital x domain x phase (train / eval)."""
    rows: list[dict[str, Any]] = []
    for entry in history:
        rnd = entry["server_round"]
        for hospital, m in sorted(((entry.get("train") or {}).get("nodes") or {}).items()):
            counts = m.get(keys.D_COUNT)
            if not counts:
                continue
            for d, n in zip(domains, counts, strict=True):
                if n <= 0:
                    continue
                # units of the training split (DP-released under DP), the round's privacy spend
                row = {"round": rnd, "hospital": hospital, "domain": d, "phase": "train", "units": n}
                for key, name in ((keys.EPSILON, "epsilon"), (keys.REWARD_MEAN, "hospital_train_reward")):
                    if key in m:
                        row[name] = m[key]
                rows.append(row)
        for hospital, m in sorted(((entry.get("evaluate") or {}).get("nodes") or {}).items()):
            if keys.E_RECORDS not in m:
                continue
            for i, d in enumerate(domains):
                if m[keys.E_RECORDS][i] <= 0:
                    continue
                row = {"round": rnd, "hospital": hospital, "domain": d, "phase": "eval"}
                row.update({name: m[k][i] for k, name in EVAL_FIELDS.items()})
                rows.append(row)
    return rows


def write_metrics_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _eval_series(history: Sequence[dict[str, Any]], domain: str, field: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for entry in history:
        d = ((entry.get("evaluate") or {}).get("domains") or {}).get(domain)
        if d is not None and field in d:  # DP-released evaluations carry no balanced accuracy
            xs.append(entry["server_round"])
            ys.append(d[field])
    return xs, ys


def overall(domains: dict[str, dict[str, float]], field: str) -> float | None:
    """Records-weighted mean of ``field`` over a round's evaluated domains (None if none has it)."""
    rows = [d for d in domains.values() if field in d]
    n = sum(d["records"] for d in rows)
    return sum(d[field] * d["records"] for d in rows) / n if n else None


def _overall_series(history: Sequence[dict[str, Any]], field: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for entry in history:
        value = overall((entry.get("evaluate") or {}).get("domains") or {}, field)
        if value is not None:
            xs.append(entry["server_round"])
            ys.append(value)
    return xs, ys


def plot_learning_curves(path: Path, history: Sequence[dict[str, Any]], domains: Sequence[str], title: str) -> None:
    """Per-domain test reward and balanced accuracy over rounds, one line per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    for i, d in enumerate(domains):
        for ax, field in zip(axes[:2], ("mean_reward", "balanced_accuracy"), strict=True):
            xs, ys = _eval_series(history, d, field)
            if xs:
                ax.plot(xs, ys, marker="o", color=colors(i % 10), label=d, linewidth=2)
    for ax, field in zip(axes[:2], ("mean_reward", "balanced_accuracy"), strict=True):
        xs, ys = _overall_series(history, field)
        if xs:
            ax.plot(xs, ys, color="black", linestyle="--", linewidth=2.5, label="all domains (by records)")
    axes[0].set_title("Test reward (global adapter)")
    axes[0].set_ylabel("mean reward")
    axes[1].set_title("Test balanced accuracy (global adapter)")
    axes[1].set_ylabel("balanced accuracy")
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance (2 classes)")
    for ax in axes[:2]:
        ax.set_xlabel("round (0 = before training)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    hospitals = sorted({h for e in history for h, m in ((e.get("train") or {}).get("nodes") or {}).items()
                        if keys.EPSILON in m})
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v")
    for j, h in enumerate(hospitals):
        xs = [e["server_round"] for e in history if keys.EPSILON in ((e.get("train") or {}).get("nodes") or {}).get(h, {})]
        ys = [e["train"]["nodes"][h][keys.EPSILON] for e in history if e["server_round"] in xs]
        ax.plot(xs, ys, marker=markers[j % len(markers)], linestyle=styles[j % len(styles)], color=colors(j % 10),
                label=h, linewidth=2, markersize=9 - 2 * (j % 3))
    ax.set_title("Privacy spent per hospital (equal budgets overlap)")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (cumulative)")
    ax.grid(alpha=0.3)
    if hospitals:
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "DP off", ha="center", va="center", transform=ax.transAxes, fontsize=14, color="grey")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def domain_table(history: Sequence[dict[str, Any]], domains: Sequence[str]) -> list[dict[str, Any]]:
    """Before (first evaluated round) -> after (last) per domain."""
    evals = [e for e in history if (e.get("evaluate") or {}).get("domains")]
    if not evals:
        return []
    first, last = evals[0]["evaluate"]["domains"], evals[-1]["evaluate"]["domains"]
    out = []
    for d in domains:
        if d in first and d in last:
            out.append({
                "domain": d,
                "records": int(last[d]["records"]),
                "bal_acc": (first[d].get("balanced_accuracy"), last[d].get("balanced_accuracy")),
                "macro_f1": (first[d].get("macro_f1"), last[d].get("macro_f1")),
                "reward": (first[d].get("mean_reward"), last[d].get("mean_reward")),
            })
    return out


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_report(run_dir: Path, cfg: FedClimbConfig, history: Sequence[dict[str, Any]], *, seconds: float,
                 command: str) -> Path:
    """Write report.md (and the PNG and JSONL it refers to) into ``run_dir``."""
    domains = list(cfg.federation.domains)
    rows = metric_rows(history, domains)
    write_metrics_jsonl(run_dir / "metrics.jsonl", rows)
    plot_learning_curves(run_dir / "learning_curves.png", history, domains,
                         f"fedclimb simulate: {cfg.simulation.hospitals} hospitals, "
                         f"{cfg.advantage.estimator.upper()}, {cfg.aggregation.mode}/{cfg.aggregation.weighting}, "
                         f"DP {'on' if cfg.privacy.enabled else 'off'}")
    table = domain_table(history, domains)
    lines = ["# fedclimb simulation report", "", f"Command: `{command}`", ""]
    lines += [
        f"- hospitals: {cfg.simulation.hospitals}; rounds: {cfg.federation.rounds}; local steps per round: "
        f"{cfg.train.steps}; rollouts per prompt: {cfg.rollout.num_rollouts}; prompts per step: "
        f"{cfg.rollout.batch_prompts}",
        f"- model: {cfg.model.source} ({cfg.model.name_or_path or 'built offline'}); LoRA r={cfg.lora.r}",
        f"- advantages: {cfg.advantage.estimator.upper()}; aggregation: {cfg.aggregation.mode} with "
        f"{cfg.aggregation.weighting} weights",
        f"- privacy: {'DP-SGD, target epsilon ' + str(cfg.privacy.target_epsilon) + ' at delta ' + str(cfg.privacy.delta) if cfg.privacy.enabled else 'off'}",
        *([f"- evaluation release: {EVAL_RELEASE[cfg.privacy.eval_release]}"] if cfg.privacy.enabled else []),
        f"- wall time: {seconds:.0f} s in total",
        "",
        "## Test metrics per domain (global adapter, before -> after)",
        "",
        "| domain | test records | balanced accuracy | macro-F1 | mean reward |",
        "|---|---:|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['domain']} | {r['records']} | {_num(r['bal_acc'][0], '.3f')} -> **{_num(r['bal_acc'][1], '.3f')}** | "
            f"{_num(r['macro_f1'][0], '.3f')} -> {_num(r['macro_f1'][1], '.3f')} | "
            f"{_num(r['reward'][0], '.3f')} -> {_num(r['reward'][1], '.3f')} |"
        )
    if table and all(None not in r["bal_acc"] for r in table):
        worst0 = min(r["bal_acc"][0] for r in table)
        worst1 = min(r["bal_acc"][1] for r in table)
        lines += ["", f"Worst-domain balanced accuracy: {worst0:.3f} -> {worst1:.3f}."]
    lines += ["", "![learning curves](learning_curves.png)", "", "## Hospitals", ""]
    last_train = next((e["train"] for e in reversed(history) if (e.get("train") or {}).get("nodes")), {})
    lines += ["| hospital | epsilon spent | delta | noise multiplier | sample rate | status |", "|---|---:|---:|---:|---:|---|"]
    for h, m in sorted((last_train.get("nodes") or {}).items()):
        if h in last_train.get("budget_exhausted", []):
            status = "budget exhausted"
        elif h in last_train.get("rejected", {}):
            status = "rejected: " + last_train["rejected"][h]
        else:
            status = "ok"
        cells = [_num(m.get(keys.EPSILON), ".3f"), _num(m.get(keys.DELTA), "g"),
                 _num(m.get(keys.NOISE_MULTIPLIER), ".4f"), _num(m.get(keys.SAMPLE_RATE), ".4f")]
        lines.append(f"| {h} | " + " | ".join(cells) + f" | {status} |")
    lines += ["", "## Rounds", "", "| round | wall time (s) | sent (MB) | received (MB) | accepted | weights |",
              "|---:|---:|---:|---:|---:|---|"]
    sent = received = 0
    for e in history:
        sent += e["bytes_sent"]
        received += e["bytes_received"]
        t = e.get("train") or {}
        weights = ", ".join(f"{h}: {w:.2f}" for h, w in sorted((t.get("weights") or {}).items()))
        accepted = len(t.get("weights") or {}) if t.get("aggregated") else 0
        lines.append(f"| {e['server_round']} | {e['seconds']:.1f} | {e['bytes_sent'] / 1e6:.2f} | "
                     f"{e['bytes_received'] / 1e6:.2f} | {accepted if e['server_round'] else '-'} | {weights or '-'} |")
    lines += ["", f"Communication in total: {sent / 1e6:.2f} MB sent to hospitals, {received / 1e6:.2f} MB received.",
              "", "## Configuration", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
