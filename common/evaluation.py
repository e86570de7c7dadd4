"""What a clinician or reviewer compares a model against (pure functions).

Predictions and truths are label sets (one label each for single-label questions). The
constant-answer baseline always gives the most common training answer of a domain; a
model that only learnt the label distribution scores exactly this, so a model's metrics
mean something only above it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from common.metrics import balanced_accuracy, count_classes, macro_f1
from common.rewards import set_f1

__all__ = ["NONE_LABEL", "label_key", "confusion_matrix", "majority_answer", "Baseline", "constant_baseline"]

NONE_LABEL = "(none)"


def label_key(labels: frozenset[str]) -> str:
    """One readable key for a label set (sorted, ``", "``-joined; ``(none)`` when empty)."""
    return ", ".join(sorted(labels)) or NONE_LABEL


def confusion_matrix(truth: Sequence[frozenset[str]], predicted: Sequence[frozenset[str]]) -> dict[str, dict[str, int]]:
    """``matrix[true][predicted]`` counts, keyed by :func:`label_key` (rows: every true answer seen)."""
    if len(truth) != len(predicted):
        raise ValueError(f"truth has {len(truth)} records but predictions have {len(predicted)}")
    out: dict[str, dict[str, int]] = {}
    for t, p in zip(truth, predicted, strict=True):
        row = out.setdefault(label_key(t), {})
        row[label_key(p)] = row.get(label_key(p), 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def majority_answer(answers: Sequence[frozenset[str]]) -> frozenset[str]:
    """The most common answer (ties broken by the sorted key, so the result is stable)."""
    if not answers:
        raise ValueError("no answers to take a majority of")
    counts = Counter(label_key(a) for a in answers)
    best = max(counts.values())
    key = min(k for k, n in counts.items() if n == best)
    return next(a for a in answers if label_key(a) == key)


@dataclass(frozen=True)
class Baseline:
    answer: str
    balanced_accuracy: float
    macro_f1: float
    accuracy: float


def constant_baseline(truth: Sequence[frozenset[str]], constant: frozenset[str]) -> Baseline:
    """Metrics of answering ``constant`` to every record (accuracy is the mean set-F1, as in the reward)."""
    predicted = [constant] * len(truth)
    counts = count_classes(truth, predicted)
    accuracy = sum(set_f1(constant, t) for t in truth) / len(truth) if truth else 0.0
    return Baseline(label_key(constant), balanced_accuracy(counts), macro_f1(counts), accuracy)
