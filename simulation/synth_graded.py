"""A graded-rarity benchmark pool: five lab-panel domains with set training shares.

The learning benchmark (bench/learning.py) asks one question: does domain-aware
federated DRPO learn a rare domain that FedAvg + GRPO drowns out? Its data must vary in
rarity and nothing else, so every domain here is built the same way:

- a record is one patient's laboratory report, the same five analytes in random order
  (fasting glucose, creatinine, haemoglobin, TSH, sodium), flagged (H)/(L) against
  their reference ranges as real reports are;
- each domain asks about one condition and reads one analyte: its positive class has
  that analyte out of range in the condition's direction, its negative class has it in
  range;
- every other analyte is out of range with the same small probability in every domain.

So the domains are equally hard by construction and differ in two ways only: the
question and answer words (each domain's own tokens to learn) and how many training
records they have. ``shares`` sets the latter (e.g. 40/25/15/8/2 %); valid and test
splits are balanced and the same size for every domain, so the rare domain is measured
as precisely as the common one.

One CLIMB root is written (``<out>/lab/<domain>/annotation_{train,valid,test}.jsonl``);
``simulation.partition=dirichlet`` spreads it non-IID over the simulated hospitals.
Output is byte-for-byte determined by the arguments.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from simulation.synth_labs import Analyte
from simulation.synth_spec import OPTIONS_LEAD, SPLITS

__all__ = ["PANELS", "Panel", "GRADED_MANIFEST", "GENERATOR", "DEFAULT_SHARES", "generate_graded", "parse_shares",
           "train_counts"]

GRADED_MANIFEST = "graded.json"
GENERATOR = "fedclimb-graded/2"
DEFAULT_SHARES = (40.0, 25.0, 15.0, 8.0, 2.0)
MODALITY = "lab"
REPORT_HEADER = "Laboratory report of a patient:"


@dataclass(frozen=True)
class Panel:
    """One domain: a condition read from one analyte of the report."""

    key: str
    question: str
    options: tuple[str, str]  # (negative, positive)
    analyte: Analyte
    direction: Literal["H", "L"]


GLUCOSE = Analyte("Fasting glucose", "mg/dL", 70.0, 99.0, 0)
CREATININE = Analyte("Creatinine", "mg/dL", 0.6, 1.2, 1)
HAEMOGLOBIN = Analyte("Haemoglobin", "g/dL", 12.0, 17.5, 1)
TSH = Analyte("TSH", "mIU/L", 0.4, 4.0, 2)
SODIUM = Analyte("Sodium", "mmol/L", 135.0, 145.0, 0)

# Share order: DEFAULT_SHARES[i] goes to PANELS[i], so the last panel is the rarest.
# Every negative answer is "<analyte> in range", every positive one names the condition.
# With option-constrained decoding the first token of an answer decides it, so no two of
# the ten answers start with the same token of the tiny model's tokenizer (a test checks):
# a domain's answer tokens are its own, and one domain's training cannot move another's
# answer. (Shared first tokens, e.g. "Normal sodium" / "Normal kidney function", made the
# rarest domain follow the common ones' answers.)
PANELS: tuple[Panel, ...] = (
    Panel("panel_diabetes", "Does the patient have diabetes mellitus?", ("Glucose in range", "Diabetes"), GLUCOSE, "H"),
    Panel("panel_kidney", "Does the patient have impaired kidney function?",
          ("Creatinine in range", "Kidney impairment"), CREATININE, "H"),
    Panel("panel_anaemia", "Does the patient have anaemia?", ("Haemoglobin in range", "Anaemia"), HAEMOGLOBIN, "L"),
    Panel("panel_thyroid", "Does the patient have hypothyroidism?", ("TSH in range", "Hypothyroidism"), TSH, "H"),
    Panel("panel_sodium", "Does the patient have hyponatraemia?", ("Sodium in range", "Low sodium"), SODIUM, "L"),
)
ANALYTES: tuple[Analyte, ...] = tuple(p.analyte for p in PANELS)


def parse_shares(text: str) -> tuple[float, ...]:
    """``"40,25,15,8,2"`` -> one positive share per panel (any scale; normalised later)."""
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--graded takes {len(PANELS)} numbers like 40,25,15,8,2, got {text!r}") from None
    if len(shares) != len(PANELS) or not all(np.isfinite(s) and s > 0 for s in shares):
        raise ValueError(f"--graded takes {len(PANELS)} positive numbers (one per domain: "
                         f"{', '.join(p.key for p in PANELS)}), got {text!r}")
    return shares


def train_counts(shares: Sequence[float], total: int) -> list[int]:
    """Training records per panel: ``total`` split by ``shares``, at least 4 each (2 per class).

    Largest-remainder rounding, so the counts sum to ``total`` whenever the floors allow.
    """
    weights = np.asarray(shares, dtype=float) / float(np.sum(shares))
    exact = weights * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return [max(4, int(c)) for c in counts]


def _value(rng: np.random.Generator, analyte: Analyte, state: Literal["normal", "H", "L"]) -> float:
    span = analyte.high - analyte.low
    margin = 10.0 ** (-analyte.decimals)  # printed normal values never touch the flag boundary
    if state == "normal":
        return float(rng.uniform(analyte.low + margin, analyte.high - margin))
    excess = float(rng.uniform(0.1, 0.6)) * span
    return analyte.high + excess if state == "H" else max(analyte.low - excess, 0.1 * analyte.low)


def render_report(rng: np.random.Generator, panel: Panel, label: int, *, other_abnormal: float) -> str:
    """One report: the panel's analyte set by ``label``, the others abnormal now and then."""
    lines = []
    for analyte in ANALYTES:
        if analyte is panel.analyte:
            state = panel.direction if label == 1 else "normal"
        elif rng.uniform() < other_abnormal:
            state = "H" if rng.uniform() < 0.5 else "L"
        else:
            state = "normal"
        lines.append(analyte.line(_value(rng, analyte, state)))
    order = rng.permutation(len(lines))
    return "\n".join([REPORT_HEADER, *(lines[int(i)] for i in order)])


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = np.zeros(n, dtype=np.int64)
    labels[: n // 2] = 1
    return rng.permutation(labels)


def generate_graded(
    out: Path,
    *,
    shares: Sequence[float] = DEFAULT_SHARES,
    train_records: int = 1000,
    eval_records: int = 40,
    other_abnormal: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write the graded-rarity pool into ``out``; return ``counts[domain][split]``.

    Parameters
    ----------
    shares : five positive numbers
        Training share of each panel, in ``PANELS`` order.
    train_records : int
        Training records over all panels (each panel keeps at least 4).
    eval_records : int
        Test records per panel (balanced); valid gets half as many.
    other_abnormal : float
        Probability that an analyte the question does not ask about is out of range.
    """
    if len(shares) != len(PANELS) or not all(s > 0 for s in shares):
        raise ValueError(f"shares must be {len(PANELS)} positive numbers, got {list(shares)}")
    if train_records < 4 * len(PANELS) or eval_records < 2 or not 0 <= other_abnormal < 1:
        raise ValueError("train_records >= 20, eval_records >= 2 and 0 <= other_abnormal < 1 are required")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose an empty folder or pass --overwrite")
        if not (out / GRADED_MANIFEST).is_file():
            raise FileExistsError(f"{out} has no {GRADED_MANIFEST}; refusing to delete what it holds")
        shutil.rmtree(out)
    counts: dict[str, dict[str, int]] = {}
    patient = 0
    for d, (panel, n_train) in enumerate(zip(PANELS, train_counts(shares, train_records), strict=True)):
        sizes = {"train": n_train, "valid": max(2, eval_records // 2), "test": eval_records}
        folder = out / MODALITY / panel.key
        folder.mkdir(parents=True, exist_ok=True)
        for s, split in enumerate(SPLITS):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(d, s)))
            lines = []
            for label in _labels(rng, sizes[split]):
                patient += 1
                report = render_report(rng, panel, int(label), other_abnormal=other_abnormal)
                human = f"{report}\n{panel.question} {OPTIONS_LEAD}\n" + "\n".join(panel.options)
                record = {
                    "conversations": [{"from": "human", "value": human},
                                      {"from": "gpt", "value": panel.options[int(label)]}],
                    "dataset": panel.key,
                    "patient_id": f"g-p{patient:05d}",
                }
                lines.append(json.dumps(record) + "\n")
            (folder / f"annotation_{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        counts[panel.key] = sizes
    manifest = {"generator": GENERATOR, "seed": seed, "shares": list(shares), "train_records": train_records,
                "eval_records": eval_records, "other_abnormal": other_abnormal, "counts": counts}
    (out / GRADED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return counts
