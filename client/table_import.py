"""A hospital's tabular data (one row per patient) to CLIMB text records.

Language models read words better than raw numbers, so each feature is written with
its value and its band among the training patients ("very high: above the 90th
percentile"). Bands come from the training split only, so held-out rows never shape
the prompts. Patients are pseudonymised with the hospital's secret salt and split by
pseudonym (client/dicom_import.py's rules), so one patient never sits in two splits.

``--builtin breast-cancer`` converts scikit-learn's bundled Wisconsin Diagnostic
Breast Cancer set (569 patients, 30 fine-needle-aspirate features, benign/malignant).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.dicom_import import assign_split, build_prompt, load_or_create_salt, pseudonym, sanitize_name
from common.climb.records import SPLITS

__all__ = ["Table", "read_csv_table", "breast_cancer_table", "band", "describe_row", "convert_table",
           "TableSummary", "BANDS"]

# (upper percentile, words): a value at or below the percentile falls in that band.
BANDS: tuple[tuple[float, str], ...] = (
    (10.0, "very low (below the 10th percentile)"),
    (30.0, "low (10th-30th percentile)"),
    (70.0, "typical (30th-70th percentile)"),
    (90.0, "high (70th-90th percentile)"),
    (100.0, "very high (above the 90th percentile)"),
)

# The breast-cancer set's most informative features (size, shape and texture of the
# nuclei; "worst" = mean of the three largest values), in the order the prompt lists them.
BREAST_CANCER_FEATURES = (
    "worst concave points", "worst perimeter", "worst radius", "worst area", "mean concave points",
    "worst concavity", "worst texture", "worst smoothness",
)
BREAST_CANCER_QUESTION = (
    "A fine-needle aspirate of a breast mass was digitised and the cell nuclei measured. "
    "Is the mass benign or malignant?"
)


@dataclass
class Table:
    """Rows of features with one label and one patient id each (ids are raw, pseudonymised on write)."""

    columns: list[str]
    values: np.ndarray  # rows x columns, float
    labels: list[str]
    patient_ids: list[str]


def read_csv_table(path: str | os.PathLike[str], *, label_column: str, id_column: str | None,
                   features: Sequence[str] | None = None) -> Table:
    """A CSV with a header row: numeric feature columns, one label column, an optional id column."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col, what in ((label_column, "--label-column"), (id_column, "--id-column")):
            if col is not None and col not in header:
                raise ValueError(f"{what} {col!r} is not a column of {path} (columns: {', '.join(header)})")
        columns = list(features) if features else [c for c in header if c not in {label_column, id_column}]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"--features: no column {missing[0]!r} in {path}")
        rows, labels, ids = [], [], []
        for n, row in enumerate(reader, start=2):
            try:
                rows.append([float(row[c]) for c in columns])
            except (TypeError, ValueError):
                bad = next(c for c in columns if not _is_number(row.get(c)))
                raise ValueError(f"{path}:{n}: column {bad!r} is not a number: {row.get(bad)!r}") from None
            label = (row[label_column] or "").strip()
            if not label:
                raise ValueError(f"{path}:{n}: empty label in column {label_column!r}")
            labels.append(label)
            ids.append(str(row[id_column]).strip() if id_column else f"row-{n - 1}")
    if not rows:
        raise ValueError(f"{path} has no data rows")
    return Table(columns, np.asarray(rows, dtype=float), labels, ids)


def _is_number(text: object) -> bool:
    try:
        float(str(text))
    except ValueError:
        return False
    return np.isfinite(float(str(text)))


def breast_cancer_table(features: Sequence[str] | None = BREAST_CANCER_FEATURES) -> Table:
    """scikit-learn's bundled breast-cancer set (no download): labels Benign / Malignant."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [str(n) for n in data.feature_names]
    columns = list(features) if features else names
    index = [names.index(c) for c in columns]
    labels = [str(data.target_names[t]).capitalize() for t in data.target]
    return Table(columns, np.asarray(data.data[:, index], dtype=float), labels,
                 [f"wdbc-{i:04d}" for i in range(len(labels))])


def band(value: float, cutoffs: Sequence[float]) -> str:
    """The words of ``value``'s band, given the training percentiles at BANDS' edges (all but 100)."""
    for cut, (_, words) in zip(cutoffs, BANDS[:-1], strict=True):
        if value <= cut:
            return words
    return BANDS[-1][1]


def _format(value: float) -> str:
    return f"{value:.4g}"


def describe_row(columns: Sequence[str], row: Sequence[float], cutoffs: Mapping[str, Sequence[float]],
                 values: bool = True) -> str:
    """One line per feature: name, value (unless ``values`` is False), and its band among the training patients."""
    return "\n".join(f"- {c}: {_format(v) + ', ' if values else ''}{band(v, cutoffs[c])}"
                     for c, v in zip(columns, row, strict=True))


@dataclass
class TableSummary:
    written: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    left_out: int = 0  # training rows left out by balance_train

    def report(self) -> str:
        lines = [f"{split}: {n} records  " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels[split].items()))
                 for split, n in self.written.items()]
        if self.left_out:
            lines.append(f"left out: {self.left_out} training rows of the larger labels (--balance-train)")
        return "\n".join(lines)


def convert_table(table: Table, out_root: str | os.PathLike[str], *, question: str, salt: bytes,
                  dataset: str = "table", modality: str = "tabular", options: Sequence[str] | None = None,
                  fractions: Sequence[float] = (0.7, 0.1, 0.2), header: str | None = None,
                  values: bool = True, balance_train: bool = False) -> TableSummary:
    """Write ``<out>/<modality>/<dataset>/annotation_<split>.jsonl`` (text records, pseudonymous patient ids).

    ``values=False`` writes only each feature's band in words (shorter prompts, which a small
    language model reads more easily than digits).

    ``balance_train=True`` keeps, in the training split only, as many rows of every label
    as the rarest label has (the rows of the larger labels with the smallest pseudonyms,
    a salt-dependent but reproducible choice) and leaves the other rows out of every split:
    group-normalised RL on a two-class task otherwise drifts to the majority answer. The
    validation and test splits keep the table's own label mix. Rows left out are never
    read by training, so they spend no privacy budget."""
    if header is None:
        header = ("Measurements of the patient (" + ("value, and its band" if values else "band")
                  + " among this hospital's training patients):")
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if not question.strip():
        raise ValueError("the question is empty")
    if not np.all(np.isfinite(table.values)):
        raise ValueError("the table holds NaN or infinite values")
    opts = list(options) if options else sorted(set(table.labels))
    unknown = sorted(set(table.labels) - set(opts))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the options {opts}")
    patients = [pseudonym(salt, pid) for pid in table.patient_ids]
    splits = [assign_split(p, fractions) for p in patients]
    if balance_train:
        splits = _balanced(splits, table.labels, patients)
    train = np.asarray([s == "train" for s in splits])
    if not train.any():
        raise ValueError("no row falls in the training split; the bands need training rows")
    edges = [p for p, _ in BANDS[:-1]]
    cutoffs = {c: list(np.percentile(table.values[train, j], edges)) for j, c in enumerate(table.columns)}
    folder = Path(out_root) / sanitize_name(modality, "tabular") / sanitize_name(dataset, "table")
    folder.mkdir(parents=True, exist_ok=True)
    prompt_question = question.strip() + " Answer with one phrase from the following:"
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    summary = TableSummary()
    for row, label, patient, split in zip(table.values, table.labels, patients, splits, strict=True):
        if split is None:
            continue
        text = header + "\n" + describe_row(table.columns, row, cutoffs, values) + "\n" + prompt_question
        record = {"conversations": [{"from": "human", "value": build_prompt(text, opts, 0)},
                                    {"from": "gpt", "value": label}],
                  "dataset": sanitize_name(dataset, "table"), "patient_id": patient}
        out[split].append(json.dumps(record, ensure_ascii=False) + "\n")
        summary.labels.setdefault(split, {})
        summary.labels[split][label] = summary.labels[split].get(label, 0) + 1
    summary.left_out = sum(split is None for split in splits)
    for split in SPLITS:
        (folder / f"annotation_{split}.jsonl").write_text("".join(out[split]), encoding="utf-8")
        summary.written[split] = len(out[split])
        summary.labels.setdefault(split, {})
    return summary


def _balanced(splits: Sequence[str], labels: Sequence[str], patients: Sequence[str]) -> list[str | None]:
    """``splits`` with training rows beyond the rarest label's count set to None (left out)."""
    by_label: dict[str, list[int]] = {}
    for i, (split, label) in enumerate(zip(splits, labels, strict=True)):
        if split == "train":
            by_label.setdefault(label, []).append(i)
    if len(by_label) < 2:
        raise ValueError("--balance-train needs at least two labels in the training split")
    keep = min(len(rows) for rows in by_label.values())
    out: list[str | None] = list(splits)
    for rows in by_label.values():
        for i in sorted(rows, key=lambda j: patients[j])[keep:]:
            out[i] = None
    return out


def salt_for(salt_file: str | os.PathLike[str], out_root: str | os.PathLike[str]) -> bytes:
    """The hospital's pseudonymisation salt; the file must lie outside the output root."""
    path, root = Path(salt_file).resolve(), Path(out_root).resolve()
    if root == path or root in path.parents:
        raise ValueError(f"--salt-file {salt_file} lies inside the output {out_root}; keep the salt outside the data")
    return load_or_create_salt(path)
