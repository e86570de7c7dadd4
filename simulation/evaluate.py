"""`fedclimb evaluate`: a checkpoint (or the base model alone) on a CLIMB split, per domain.

Beside the model's metrics it reports what it must beat: the constant answer (each
domain's most common training answer) and, when an adapter is given, the base model
without it. Writes ``evaluation.json`` and ``evaluation.md``; ``--explain N`` adds one
review PNG per record (simulation/explain.py). ``--calibrate SPLIT`` adds the answers read
from the answer probabilities with the model's prior over the options removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.climb.records import Record, load_records
from common.config import ConfigError, FedClimbConfig, load_config
from common.evaluation import (
    calibrated_answers,
    calibrated_scores,
    confusion_matrix,
    constant_baseline,
    label_key,
    majority_answer,
    option_offsets,
    option_separation,
)

log = logging.getLogger(__name__)

__all__ = ["evaluate_command", "run_evaluation", "choose_explained"]


def _config(args: argparse.Namespace) -> tuple[FedClimbConfig, Path | None]:
    """The run's own configuration when ``--adapter`` is a run directory, else ``--config``."""
    run_dir = None
    if args.adapter:
        p = Path(args.adapter)
        for cand in (p, p.parent.parent, p.parent):
            if (cand / "config.yaml").is_file() and (cand / "latest").exists():
                run_dir = cand
                break
    config_file = args.config or (run_dir / "config.yaml" if run_dir is not None else None)
    cfg = load_config(config_file, args.overrides)
    if args.base:
        cfg.model.source = "hf"
        cfg.model.name_or_path = args.base
    return cfg, run_dir


def choose_explained(records: Sequence[Record], n: int, ids: Sequence[str] = ()) -> list[Record]:
    """``ids`` when given, else ``n`` records spread evenly over domains (round-robin, file order)."""
    if ids:
        by_id = {r.id: r for r in records}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"--records: no such record in this split: {', '.join(missing[:5])}")
        return [by_id[i] for i in ids]
    by_domain: dict[str, list[Record]] = {}
    for r in records:
        by_domain.setdefault(r.domain, []).append(r)
    queues = [list(v) for _, v in sorted(by_domain.items())]
    out: list[Record] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


@dataclass
class DomainReport:
    records: int
    balanced_accuracy: float
    macro_f1: float
    accuracy: float
    mean_iou: float | None
    format_rate: float
    mean_reward: float
    confusion: dict[str, dict[str, int]]
    constant: dict[str, Any]
    base_model: dict[str, float] | None
    # Two-answer questions with constrained answers: how the answer probabilities separate
    # the classes (common.evaluation.option_separation), for this model and the base alone.
    option_scores: dict[str, Any] | None = None
    base_option_scores: dict[str, Any] | None = None
    # ``--calibrate SPLIT``: the answers with the model's prior over the options (its mean
    # log-probability of each on SPLIT) removed (common.evaluation.calibrated_answers).
    calibrated: dict[str, Any] | None = None
    base_calibrated: dict[str, Any] | None = None


def _domain_reports(answers: Sequence[Any], base_answers: Sequence[Any] | None,
                    majority: dict[str, frozenset[str]]) -> dict[str, DomainReport]:
    from client.trainer import summarise

    summary = summarise(answers)
    base_summary = summarise(base_answers) if base_answers is not None else {}
    out = {}
    for domain, ev in summary.items():
        mine = [a for a in answers if a.record.domain == domain]
        truth = [a.score.truth for a in mine]
        constant = constant_baseline(truth, majority.get(domain) or majority_answer(truth))
        has_boxes = any(a.score.iou is not None for a in mine)
        b = base_summary.get(domain)
        out[domain] = DomainReport(
            records=ev.records, balanced_accuracy=ev.balanced_accuracy, macro_f1=ev.macro_f1, accuracy=ev.accuracy,
            mean_iou=ev.mean_iou if has_boxes else None, format_rate=ev.format_rate, mean_reward=ev.mean_reward,
            confusion=confusion_matrix(truth, [a.predicted for a in mine]),
            constant=asdict(constant),
            base_model=None if b is None else {"balanced_accuracy": b.balanced_accuracy, "macro_f1": b.macro_f1,
                                               "accuracy": b.accuracy, "format_rate": b.format_rate,
                                               "mean_reward": b.mean_reward},
        )
    return out


def option_separations(records: Sequence[Record], logprobs: Sequence[Sequence[float]]) -> dict[str, dict[str, Any] | None]:
    """Per domain, :func:`option_separation` of the records' option log-probabilities (in record order)."""
    from client.trainer import truth_labels

    out = {}
    for domain in sorted({r.domain for r in records}):
        idx = [i for i, r in enumerate(records) if r.domain == domain]
        truth = [truth_labels(records[i]) for i in idx]
        out[domain] = option_separation(truth, [_option_labels(records[i]) for i in idx], [logprobs[i] for i in idx])
    return out


def _option_labels(record: Record) -> list[frozenset[str]]:
    """The record's answer options as label sets, in the record's order (that of its log-probabilities)."""
    from common.rewards import true_label_set

    return [true_label_set(o, options=record.options) for o in record.options]


def _add_option_scores(reports: dict[str, DomainReport], records: Sequence[Record], logprobs: Sequence[Sequence[float]],
                       base_logprobs: Sequence[Sequence[float]] | None) -> None:
    """Each two-answer domain's :func:`option_separation`, for the model and the base alone."""
    mine = option_separations(records, logprobs)
    base = option_separations(records, base_logprobs) if base_logprobs is not None else {}
    for domain, report in reports.items():
        report.option_scores = mine.get(domain)
        report.base_option_scores = base.get(domain)


def calibrations(records: Sequence[Record], logprobs: Sequence[Sequence[float]], prior_records: Sequence[Record],
                 prior_logprobs: Sequence[Sequence[float]]) -> tuple[dict[str, dict[str, Any] | None], dict[str, str]]:
    """Per domain, the calibrated answers' scores and the option offsets they used; and each record's answer.

    The offsets of a domain come from ``prior_records`` of that domain (another split); a
    domain with none there gets None and its records no answer. Answers are keyed by
    record id, as :func:`common.evaluation.label_key`, for paired comparisons.
    """
    from client.trainer import truth_labels

    out: dict[str, dict[str, Any] | None] = {}
    by_record: dict[str, str] = {}
    for domain in sorted({r.domain for r in records}):
        prior = [i for i, r in enumerate(prior_records) if r.domain == domain]
        if not prior:
            out[domain] = None
            continue
        offsets = option_offsets([_option_labels(prior_records[i]) for i in prior], [prior_logprobs[i] for i in prior])
        idx = [i for i, r in enumerate(records) if r.domain == domain]
        answers = calibrated_answers([_option_labels(records[i]) for i in idx], [logprobs[i] for i in idx], offsets)
        out[domain] = {"offsets": offsets, "prior_records": len(prior),
                       **calibrated_scores([truth_labels(records[i]) for i in idx], answers)}
        by_record.update({records[i].id: label_key(a) for i, a in zip(idx, answers, strict=True)})
    return out, by_record


def _overall(reports: dict[str, DomainReport]) -> dict[str, Any]:
    n = sum(r.records for r in reports.values())
    if not n:
        return {}
    mean = {k: sum(getattr(r, k) * r.records for r in reports.values()) / n
            for k in ("balanced_accuracy", "macro_f1", "accuracy", "format_rate", "mean_reward")}
    worst = min(reports.items(), key=lambda kv: (kv[1].balanced_accuracy, kv[0]))
    return {"records": n, **mean, "macro_balanced_accuracy": sum(r.balanced_accuracy for r in reports.values()) / len(reports),
            "worst_domain": worst[0], "worst_balanced_accuracy": worst[1].balanced_accuracy}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _means(scores: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:+.2f}" for k, v in scores.get("mean_score", {}).items())


def _recalls(scores: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.get("recalls", {}).items())


def _markdown(meta: dict[str, Any], reports: dict[str, DomainReport], overall: dict[str, Any],
              explained: list[str]) -> str:
    lines = [f"# Evaluation: {meta['adapter'] or 'base model alone'}", "",
             f"Base model `{meta['base_model']}`, data `{meta['data']}` split `{meta['split']}`, "
             f"{overall.get('records', 0)} records, {meta['seconds']:.0f} s.", ""]
    if overall:
        lines += [f"Overall (records-weighted): balanced accuracy {overall['balanced_accuracy']:.3f}, "
                  f"macro-F1 {overall['macro_f1']:.3f}, accuracy {overall['accuracy']:.3f}, "
                  f"format rate {overall['format_rate']:.3f}, mean reward {overall['mean_reward']:.3f}. "
                  f"Macro over domains: balanced accuracy {overall['macro_balanced_accuracy']:.3f}.", "",
                  f"**Worst domain: {overall['worst_domain']}** (balanced accuracy {overall['worst_balanced_accuracy']:.3f}).", ""]
    lines += ["| domain | records | balanced acc. | constant answer | base model | macro-F1 | accuracy | mean IoU | format | reward |",
              "|---|---:|---|---|---|---|---|---|---|---|"]
    for d, r in sorted(reports.items()):
        base = f"{r.base_model['balanced_accuracy']:.3f}" if r.base_model else "-"
        iou = f"{r.mean_iou:.3f}" if r.mean_iou is not None else "-"
        lines.append(f"| {d} | {r.records} | **{r.balanced_accuracy:.3f}** | {r.constant['balanced_accuracy']:.3f} "
                     f"(`{r.constant['answer']}`) | {base} | {r.macro_f1:.3f} | {r.accuracy:.3f} | {iou} | "
                     f"{r.format_rate:.3f} | {r.mean_reward:.3f} |")
    lines += ["", "The constant answer is each domain's most common training answer given to every record; "
              "a model above it has learnt more than the label distribution.", ""]
    separated = {d: r for d, r in sorted(reports.items()) if r.option_scores}
    if separated:
        lines += ["## Answer probabilities (two-answer questions)", "",
                  "The model's probability of each answer, not only its most likely answer: the AUC of the score "
                  "for telling the two true answers apart (0.5 = no separation, 1 = perfect) and the mean score per "
                  "true answer. It moves before the most likely answer changes.", "",
                  "| domain | score | AUC | mean score per true answer | base model AUC | base model mean score |",
                  "|---|---|---|---|---|---|"]
        for d, r in separated.items():
            s, b = r.option_scores or {}, r.base_option_scores or {}
            lines.append(f"| {d} | {s['score']} | {_fmt(s.get('auc'))} | {_means(s)} | {_fmt(b.get('auc'))} | "
                         f"{_means(b) if b else '-'} |")
        lines.append("")
    calibrated = {d: r for d, r in sorted(reports.items()) if r.calibrated}
    if calibrated:
        lines += [f"## Calibrated answers (option priors from split `{meta['calibrate']}`)", "",
                  "Each record's answer is the option with the highest log-probability after subtracting the "
                  "model's mean log-probability of that option over the calibration split: the preference it has "
                  "whatever the record says is removed, what it learnt from the record stays. The answers above "
                  "are the model's own; these are a reading of its probabilities.", "",
                  "| domain | balanced acc. | recall per true answer | base model balanced acc. | "
                  "base model recall | constant answer |", "|---|---|---|---|---|---|"]
        for d, r in calibrated.items():
            c, b = r.calibrated or {}, r.base_calibrated or {}
            lines.append(f"| {d} | **{c['balanced_accuracy']:.3f}** | {_recalls(c)} | "
                         f"{_fmt(b.get('balanced_accuracy'))} | {_recalls(b) if b else '-'} | "
                         f"{r.constant['balanced_accuracy']:.3f} |")
        lines.append("")
    for d, r in sorted(reports.items()):
        cols = sorted({c for row in r.confusion.values() for c in row})
        lines += [f"## {d}: confusion (rows truth, columns model answer)", "",
                  "| truth \\ model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for t, row in r.confusion.items():
            lines.append(f"| {t} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
        lines.append("")
    if explained:
        lines += ["## Explanations", ""] + [f"- [{Path(p).name}]({Path(p).name})" for p in explained] + [""]
    return "\n".join(lines)


def run_evaluation(cfg: FedClimbConfig, *, adapter: Path | None, data: Path, split: str, out: Path, seed: int = 0,
                   explain: int = 0, record_ids: Sequence[str] = (), progress: bool = True,
                   calibrate: str | None = None) -> dict[str, Any]:
    """Evaluate and write ``evaluation.json`` / ``evaluation.md`` (+ explanation PNGs) under ``out``.

    ``calibrate`` names another split whose records set the option priors of the
    calibrated answers (constrained answers only).
    """
    from client.trainer import LocalTrainer, truth_labels
    from common.modeling.loader import load_base_model
    from common.modeling.lora import read_peft_folder, with_zero_b
    from common.modeling.policy import Policy
    from simulation.explain import explain_answers
    from simulation.export import adapter_folder

    t0 = time.perf_counter()
    if calibrate is not None and not cfg.prompt.constrained:
        raise ValueError("--calibrate reads the answer probabilities, which need constrained answers: "
                         "set prompt.constrained=true")
    if calibrate is not None and calibrate == split:
        raise ValueError(f"--calibrate {calibrate} is the split being evaluated; name another one (e.g. valid)")
    folder = adapter_folder(adapter) if adapter is not None else None
    bundle = load_base_model(cfg.model)
    policy = Policy(bundle, cfg.lora, freeze_a=cfg.aggregation.mode == "ffa")
    trainer = LocalTrainer(policy, cfg)
    records = trainer.usable(load_records(data, split, domain_key=cfg.data.domain_key))
    if not records:
        raise ValueError(f"no usable records in split {split!r} under {data}")
    chosen = choose_explained(records, explain, record_ids) if (explain or record_ids) else []
    train = [r for r in load_records(data, cfg.data.train_split, domain_key=cfg.data.domain_key)] if split != cfg.data.train_split else []
    majority = {}
    for d in {r.domain for r in records}:
        seen = [truth_labels(r) for r in train if r.domain == d]
        if seen:
            majority[d] = majority_answer(seen)
    prior_records: list[Record] = []
    if calibrate is not None:
        prior_records = trainer.usable(load_records(data, calibrate, domain_key=cfg.data.domain_key))
        if not prior_records:
            raise ValueError(f"--calibrate {calibrate}: no usable records in that split under {data}")
    zero = with_zero_b(policy.get_adapter())
    scored = cfg.prompt.constrained  # answer probabilities exist for constrained answers only
    base_answers = base_logprobs = base_prior = None
    if folder is not None:
        policy.set_adapter(zero)
        base_answers = trainer.answers(records, seed=seed, progress=progress)
        base_logprobs = trainer.option_logprobs(records, progress=progress) if scored else None
        base_prior = trainer.option_logprobs(prior_records, progress=progress) if prior_records else None
        policy.set_adapter(read_peft_folder(folder))
    else:
        policy.set_adapter(zero)
    answers = trainer.answers(records, seed=seed, progress=progress)
    logprobs = trainer.option_logprobs(records, progress=progress) if scored else None
    reports = _domain_reports(answers, base_answers, majority)
    if logprobs is not None:
        _add_option_scores(reports, records, logprobs, base_logprobs)
    calibrated: dict[str, str] = {}
    base_calibrated: dict[str, str] = {}
    if logprobs is not None and prior_records:
        mine, calibrated = calibrations(records, logprobs, prior_records,
                                        trainer.option_logprobs(prior_records, progress=progress))
        base, base_calibrated = (calibrations(records, base_logprobs, prior_records, base_prior)
                                 if base_logprobs and base_prior else ({}, {}))
        for domain, report in reports.items():
            report.calibrated, report.base_calibrated = mine.get(domain), base.get(domain)
    overall = _overall(reports)
    out.mkdir(parents=True, exist_ok=True)
    by_id = (lambda values: None if values is None else {r.id: v for r, v in zip(records, values, strict=True)})
    explained = explain_answers(trainer, [a for a in answers if a.record in chosen], out / "explanations",
                                logprobs=by_id(logprobs), base_logprobs=by_id(base_logprobs)) if chosen else []
    meta = {"adapter": str(folder) if folder else None, "base_model": bundle.source or bundle.name, "data": str(data),
            "split": split, "calibrate": calibrate, "seed": seed, "seconds": time.perf_counter() - t0,
            "constant_from": "training split" if majority else "evaluated split"}
    result = {"meta": meta, "overall": overall, "domains": {d: asdict(r) for d, r in sorted(reports.items())},
              "explanations": [str(Path(p).relative_to(out)) for p in explained],
              "records": [{"id": a.record.id, "domain": a.record.domain, "truth": label_key(a.score.truth),
                           "answer": label_key(a.predicted), "reward": a.score.total,
                           **({"calibrated_answer": calibrated[a.record.id]} if a.record.id in calibrated else {}),
                           **({"base_calibrated_answer": base_calibrated[a.record.id]}
                              if a.record.id in base_calibrated else {})} for a in answers]}
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "evaluation.md").write_text(_markdown(meta, reports, overall, [str(Path(p).relative_to(out)) for p in explained]),
                                       encoding="utf-8")
    return result


def evaluate_command(args: argparse.Namespace) -> int:
    """``fedclimb evaluate``: exit 0 on success, 2 on unusable arguments."""
    try:
        cfg, run_dir = _config(args)
    except ConfigError as exc:
        print(f"fedclimb: error: {exc}")
        return 2
    data = Path(args.data)
    if not data.is_dir():
        print(f"fedclimb: error: --data {data} is not a directory")
        return 2
    out = Path(args.out) if args.out else (run_dir / "evaluation" if run_dir else Path("evaluation"))
    ids = [s for s in (args.records or "").split(",") if s]
    try:
        result = run_evaluation(cfg, adapter=Path(args.adapter) if args.adapter else None, data=data, split=args.split,
                                out=out, seed=args.seed, explain=args.explain, record_ids=ids, progress=not args.json,
                                calibrate=args.calibrate)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedclimb: error: {exc}")
        return 2
    if args.json:
        print(json.dumps({k: result[k] for k in ("meta", "overall", "domains", "explanations")}, indent=2))
    else:
        print((out / "evaluation.md").read_text(encoding="utf-8").split("## ")[0].rstrip())
        print(f"\nwritten: {out / 'evaluation.json'}, {out / 'evaluation.md'}"
              + (f", {len(result['explanations'])} explanation PNG(s) in {out / 'explanations'}" if result["explanations"] else ""))
    return 0
