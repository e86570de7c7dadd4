"""Classification metrics over label sets (pure functions).

Every record has a set of true labels and a set of predicted labels (one each for
single-label questions). Per class c over records:
tp = c in true and predicted, fn = c in true only, fp = c in predicted only.
Balanced accuracy is the mean recall over the classes that occur in the truth; macro-F1
is the mean F1 over the same classes. For single-label data these are the usual
definitions (a prediction outside the options counts as a miss).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["ClassCounts", "count_classes", "class_recalls", "balanced_accuracy", "macro_f1"]


@dataclass
class ClassCounts:
    """tp / fn / fp per class."""

    tp: dict[str, float] = field(default_factory=dict)
    fn: dict[str, float] = field(default_factory=dict)
    fp: dict[str, float] = field(default_factory=dict)

    def classes(self) -> list[str]:
        return sorted(set(self.tp) | set(self.fn))


def count_classes(truth: Sequence[Iterable[str]], predicted: Sequence[Iterable[str]]) -> ClassCounts:
    """Accumulate tp/fn/fp per class from aligned lists of label sets."""
    if len(truth) != len(predicted):
        raise ValueError(f"truth has {len(truth)} records but predictions have {len(predicted)}")
    c = ClassCounts()
    for t_raw, p_raw in zip(truth, predicted, strict=True):
        t, p = set(t_raw), set(p_raw)
        for label in t:
            c.tp.setdefault(label, 0.0)
            c.fn.setdefault(label, 0.0)
            if label in p:
                c.tp[label] += 1
            else:
                c.fn[label] += 1
        for label in p - t:
            c.fp[label] = c.fp.get(label, 0.0) + 1
    return c


def _recall(c: ClassCounts, k: str) -> float:
    support = c.tp.get(k, 0.0) + c.fn.get(k, 0.0)
    return c.tp.get(k, 0.0) / support if support > 0 else 0.0


def class_recalls(c: ClassCounts) -> dict[str, float]:
    """Recall of every class present in the truth, by class (balanced accuracy is their mean).

    Shows what a balanced accuracy of 0.5 hides: a model that answers one class for every
    record has recall 1 on it and 0 on the other."""
    return {k: _recall(c, k) for k in c.classes() if c.tp.get(k, 0.0) + c.fn.get(k, 0.0) > 0}


def balanced_accuracy(c: ClassCounts) -> float:
    """Mean recall over classes present in the truth (0.0 when there are none)."""
    recalls = class_recalls(c)
    return sum(recalls.values()) / len(recalls) if recalls else 0.0


def macro_f1(c: ClassCounts) -> float:
    """Mean F1 over classes present in the truth (0.0 when there are none)."""
    classes = [k for k in c.classes() if c.tp.get(k, 0.0) + c.fn.get(k, 0.0) > 0]
    if not classes:
        return 0.0
    total = 0.0
    for k in classes:
        tp, fn, fp = c.tp.get(k, 0.0), c.fn.get(k, 0.0), c.fp.get(k, 0.0)
        denom = 2 * tp + fn + fp
        total += 2 * tp / denom if denom > 0 else 0.0
    return total / len(classes)
