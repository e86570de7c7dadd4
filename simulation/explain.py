"""One PNG per record for a clinician's review: what the model saw, said and answered.

Left: the images the model saw (a record's image, a rendered 12-lead ECG, or a volume's
sampled slices), with the ground-truth boxes (green) or mask outline (green) and the
model's predicted boxes (red) drawn over the first record image. Right: the question,
the model's reasoning, its answer against the truth and the reward terms.
"""

from __future__ import annotations

import contextlib
import math
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Explanation", "render_explanation", "reasoning_text", "safe_name", "explain_answers", "explain_run"]

TRUTH_COLOUR = "#1a9850"
PRED_COLOUR = "#d73027"
_MAX_PANELS = 4


@dataclass
class Explanation:
    """Everything one review PNG shows (images are PIL images as the loaders return them)."""

    record_id: str
    domain: str
    question: str
    options: Sequence[str]
    images: Sequence[Any]
    first_record_image: int | None  # index into images of the record's own first image
    ecg_images: int  # the first this many images are rendered ECGs
    response: str
    predicted: str
    truth: str
    correct: bool
    reward: dict[str, float | None]
    truth_boxes: Sequence[Sequence[float]] = ()
    predicted_boxes: Sequence[Sequence[float]] = ()  # already in the original image's pixels
    truth_mask: np.ndarray | None = None
    # (option, probability with the adapter, probability with the base model alone or None):
    # the whole-answer probabilities of a constrained answer (Policy.option_logprobs).
    option_probabilities: Sequence[tuple[str, float, float | None]] = ()


def reasoning_text(response: str) -> str:
    """The ``<think>`` part of a response, else everything before the boxed answer."""
    m = re.search(r"<think>(.*?)(</think>|$)", response, flags=re.S)
    if m:
        return m.group(1).strip()
    cut = response.find("\\boxed{")
    return (response[:cut] if cut >= 0 else response).strip()


def safe_name(record_id: str) -> str:
    """A file name for a record id (``cxr/ds/annotation_test.jsonl:12`` -> ``cxr_ds_annotation_test.jsonl_12``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("_")[:120] or "record"


def _wrap(text: str, width: int, max_lines: int) -> str:
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(para, width) or [""])
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + ["[...]"]
    return "\n".join(lines)


def _draw_boxes(ax: Any, boxes: Sequence[Sequence[float]], colour: str, label: str) -> None:
    from matplotlib.patches import Rectangle

    for i, (x1, y1, x2, y2) in enumerate(boxes):
        ax.add_patch(Rectangle((min(x1, x2), min(y1, y2)), abs(x2 - x1), abs(y2 - y1), fill=False,
                               edgecolor=colour, linewidth=2, label=label if i == 0 else None))


def _probability_lines(rows: Sequence[tuple[str, float, float | None]]) -> list[str]:
    """"Answer probabilities:" and one line per option (with the base model's where known)."""
    if not rows:
        return []
    width = max(len(o) for o, _, _ in rows)
    return ["", "Answer probabilities:"] + [
        f"  {o:<{width}}  {p:.3f}" + (f"   (base model {b:.3f})" if b is not None else "") for o, p, b in rows]


def render_explanation(ex: Explanation, path: str | Path) -> Path:
    """Write the review PNG of ``ex`` to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = list(ex.images)[:_MAX_PANELS]
    n = max(len(images), 1)
    fig = plt.figure(figsize=(5 + 3.2 * n, 6.5), dpi=110)
    grid = fig.add_gridspec(1, n + 1, width_ratios=[3.2] * n + [5])
    for i in range(n):
        ax = fig.add_subplot(grid[0, i])
        ax.set_axis_off()
        if not images:  # a text-only record: its text is the evidence, shown in full here
            ax.set_title("the record (text only)", fontsize=9)
            ax.text(0.0, 1.0, _wrap(ex.question, 58, 40), va="top", ha="left", family="monospace", fontsize=8.5)
            continue
        ax.imshow(np.asarray(images[i].convert("RGB")))
        if i == ex.first_record_image:
            if ex.truth_mask is not None and ex.truth_mask.any():
                ax.contour(ex.truth_mask.astype(float), levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.5)
            _draw_boxes(ax, ex.truth_boxes, TRUTH_COLOUR, "truth")
            _draw_boxes(ax, ex.predicted_boxes, PRED_COLOUR, "model")
            if ex.truth_boxes or ex.predicted_boxes:
                ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
        ax.set_title(f"image {i + 1}" + (" (12-lead ECG)" if i < ex.ecg_images else ""), fontsize=9)
    text_ax = fig.add_subplot(grid[0, n])
    text_ax.set_axis_off()
    verdict = "CORRECT" if ex.correct else "WRONG"
    reward = ", ".join(f"{k} {v:.2f}" for k, v in ex.reward.items() if v is not None)
    body = "\n".join([
        f"{ex.record_id}   [{ex.domain}]",
        "",
        "Question:",
        _wrap(ex.question, 64, 6) if images else "(the record's text is on the left)",
        *(["Options: " + _wrap("; ".join(ex.options), 56, 3)] if ex.options else []),
        "",
        *(["Model reasoning:", _wrap(reasoning_text(ex.response), 64, 10), ""] if reasoning_text(ex.response) else []),
        "Model response (raw):",
        _wrap(ex.response.strip() or "(empty)", 64, 6),
        "",
        f"Model answer: {ex.predicted}",
        f"Truth:        {ex.truth}",
        f"Reward: {reward}",
        *_probability_lines(ex.option_probabilities),
    ])
    text_ax.text(0.0, 1.0, body, va="top", ha="left", family="monospace", fontsize=8.5, wrap=True)
    text_ax.text(0.0, 0.02, verdict, va="bottom", ha="left", fontsize=16, weight="bold",
                 color=TRUTH_COLOUR if ex.correct else PRED_COLOUR)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def explain_answers(trainer: Any, answers: Sequence[Any], folder: Path, *, prefix: str = "",
                    logprobs: Mapping[str, Sequence[float]] | None = None,
                    base_logprobs: Mapping[str, Sequence[float]] | None = None) -> list[Path]:
    """One review PNG per scored answer (client.trainer.Answer) in ``folder``, named by record id.

    Predicted boxes are moved from the model's image frame back to the original pixels,
    where the ground-truth boxes and masks are. ``logprobs`` (and ``base_logprobs``), by
    record id, are each option's log-probability, shown as probabilities.
    """
    from common.climb.inputs import load_visuals
    from common.climb.limits import bounds_for
    from common.evaluation import label_key
    from common.rewards import parse_boxes

    cfg = trainer.cfg
    paths = []
    for a in answers:
        r = a.record
        visuals = load_visuals(r, video_frames=cfg.data.video_frames, ecg_px_per_mm=cfg.data.ecg_px_per_mm,
                               bounds=bounds_for(cfg.data))  # the limits the trainer loaded them with
        frame = trainer.encode(r).box_frame
        pred_boxes = parse_boxes(a.text) if r.has_localisation else []
        if frame is not None and pred_boxes:
            ow, oh, mw, mh = frame
            pred_boxes = [(x1 * ow / mw, y1 * oh / mh, x2 * ow / mw, y2 * oh / mh) for x1, y1, x2, y2 in pred_boxes]
        truth = a.score.truth
        ex = Explanation(
            record_id=r.id, domain=r.domain, question=r.question, options=r.options, images=visuals.images,
            first_record_image=visuals.leading if r.images and visuals.leading < len(visuals.images) else None,
            ecg_images=visuals.leading, response=a.text, predicted=label_key(a.predicted), truth=label_key(truth),
            correct=a.predicted == truth,
            reward={"total": a.score.total, "accuracy": a.score.accuracy, "format": a.score.format, "iou": a.score.iou},
            truth_boxes=list(r.bboxes), predicted_boxes=pred_boxes, truth_mask=trainer.mask_for(r),
            option_probabilities=_option_rows(r.options, (logprobs or {}).get(r.id), (base_logprobs or {}).get(r.id)),
        )
        paths.append(render_explanation(ex, folder / f"{prefix}{safe_name(r.id)}.png"))
    return paths


def _option_rows(options: Sequence[str], logprobs: Sequence[float] | None,
                 base: Sequence[float] | None) -> list[tuple[str, float, float | None]]:
    if logprobs is None or len(logprobs) != len(options):
        return []
    base_p = [math.exp(v) for v in base] if base is not None and len(base) == len(options) else [None] * len(options)
    return [(o, math.exp(v), b) for o, v, b in zip(options, logprobs, base_p, strict=True)]


def explain_run(run_dir: Path, cfg: Any, roots: Sequence[Path], *, per_domain: int = 2, seed: int = 0) -> list[Path]:
    """Review PNGs of the final global adapter on ``per_domain`` test records of every domain.

    The records are the first of each domain over the hospitals' test splits (in hospital
    order); the PNGs go to ``RUN_DIR/explanations/hospital-<i>_<record id>.png``.
    """
    from client.trainer import LocalTrainer
    from common.climb.records import load_records
    from common.modeling.loader import load_base_model
    from common.modeling.lora import read_peft_folder
    from common.modeling.policy import Policy

    adapter = Path(run_dir) / "latest" / "adapter"
    if not adapter.is_dir():
        return []
    with _quiet():
        policy = Policy(load_base_model(cfg.model), cfg.lora, freeze_a=cfg.aggregation.mode == "ffa")
    policy.set_adapter(read_peft_folder(adapter))
    trainer = LocalTrainer(policy, cfg)
    seen: dict[str, int] = {}
    paths: list[Path] = []
    for i, root in enumerate(roots):
        chosen = []
        for r in load_records(root, cfg.data.eval_split, domain_key=cfg.data.domain_key):
            if seen.get(r.domain, 0) < per_domain:
                seen[r.domain] = seen.get(r.domain, 0) + 1
                chosen.append(r)
        records = trainer.usable(chosen)
        if records:  # record ids repeat across hospitals: the hospital names the file
            paths += explain_answers(trainer, trainer.answers(records, seed=seed), Path(run_dir) / "explanations",
                                     prefix=f"hospital-{i}_")
    return paths


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No weight-loading progress bar or deprecation warnings in the middle of a report."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.enable_progress_bar()


def hospital_roots(run_dir: Path) -> list[Path]:
    """The simulated hospitals' data roots, from their ``hospitals/hospital-<i>/hospital.yaml``."""
    from common.config import load_hospital_config

    files = sorted(Path(run_dir).glob("hospitals/hospital-*/hospital.yaml"), key=lambda p: int(p.parent.name.split("-")[1]))
    return [Path(load_hospital_config(f).data_root) for f in files]


def link_in_report(report: Path, pngs: Sequence[Path]) -> None:
    """Append a section linking the review PNGs to ``report`` (paths relative to its folder)."""
    if not pngs:
        return
    lines = ["", "## Example answers of the final adapter (test records)", "",
             "One review image per record: what the model saw, its reasoning and answer against the truth, "
             "its boxes (red) against the ground truth (green).", ""]
    lines += [f"![{p.stem}]({p.relative_to(report.parent)})" for p in pngs]
    with open(report, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
