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

from common.metrics import balanced_accuracy, class_recalls, count_classes, macro_f1
from common.rewards import set_f1

__all__ = ["NONE_LABEL", "label_key", "confusion_matrix", "majority_answer", "Baseline", "constant_baseline",
           "rank_auc", "option_separation", "option_offsets", "calibrated_answers", "calibrated_scores"]

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


def rank_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """P(a random positive scores above a random negative), ties counting 1/2 (Mann-Whitney).

    None unless both classes are present. O(n log n) by ranks.
    """
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores but {len(positive)} labels")
    n_pos = sum(1 for p in positive if p)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks (1-based) over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive, strict=True) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def option_separation(truth: Sequence[frozenset[str]], options: Sequence[Sequence[frozenset[str]]],
                      logprobs: Sequence[Sequence[float]]) -> dict[str, object] | None:
    """How well a model's answer probabilities separate a two-answer question's classes.

    ``options[i]`` are record i's answer options (as label sets) and ``logprobs[i]`` the
    model's log-probability of each. With ``(a, b)`` the two options in sorted order and
    the score ``log p(b) - log p(a)``: its AUC for telling truth ``b`` from truth ``a``
    (symmetric: swapping a and b gives the same AUC) and its mean per true answer.
    Threshold-free, so it shows learning before the most likely answer changes. None
    unless every record has the same two options and one of them as its truth.
    """
    if not truth or len(truth) != len(options) or len(options) != len(logprobs):
        return None
    keys = sorted({label_key(o) for o in options[0]})
    if len(keys) != 2 or len(options[0]) != 2:
        return None
    a, b = keys
    scores: list[float] = []
    for t, opts, lps in zip(truth, options, logprobs, strict=True):
        by_key = {label_key(o): lp for o, lp in zip(opts, lps, strict=True)}
        if sorted(by_key) != keys or label_key(t) not in by_key:
            return None
        scores.append(by_key[b] - by_key[a])
    truths = [label_key(t) for t in truth]
    means = {k: sum(s for s, t in zip(scores, truths, strict=True) if t == k) / truths.count(k)
             for k in keys if k in truths}
    return {"labels": [a, b], "score": f"log p({b}) - log p({a})", "records": len(scores),
            "auc": rank_auc(scores, [t == b for t in truths]), "mean_score": means}


def option_offsets(options: Sequence[Sequence[frozenset[str]]], logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """The model's prior over the answer options: the mean log-probability of each option over a set of records.

    Keyed by :func:`label_key`; an option is averaged over the records that offer it.
    Subtracting it from a record's log-probabilities (:func:`calibrated_answers`) removes
    the preference the model has whatever the record says, and keeps what it learnt from
    the record. Computed on a split other than the one evaluated (``--calibrate``).
    """
    if len(options) != len(logprobs):
        raise ValueError(f"{len(options)} option lists but {len(logprobs)} log-probability lists")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for opts, lps in zip(options, logprobs, strict=True):
        if len(opts) != len(lps):
            raise ValueError(f"a record has {len(opts)} options but {len(lps)} log-probabilities")
        for o, lp in zip(opts, lps, strict=True):
            k = label_key(o)
            sums[k] = sums.get(k, 0.0) + lp
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sorted(sums)}


def calibrated_answers(options: Sequence[Sequence[frozenset[str]]], logprobs: Sequence[Sequence[float]],
                       offsets: dict[str, float]) -> list[frozenset[str]]:
    """Each record's option with the highest ``log p(option) - offsets[option]`` (the first on a tie).

    An option without an offset keeps its log-probability (offset 0).
    """
    if len(options) != len(logprobs):
        raise ValueError(f"{len(options)} option lists but {len(logprobs)} log-probability lists")
    out = []
    for opts, lps in zip(options, logprobs, strict=True):
        if not opts or len(opts) != len(lps):
            raise ValueError(f"a record has {len(opts)} options but {len(lps)} log-probabilities")
        scores = [lp - offsets.get(label_key(o), 0.0) for o, lp in zip(opts, lps, strict=True)]
        out.append(opts[max(range(len(opts)), key=lambda i: (scores[i], -i))])
    return out


def calibrated_scores(truth: Sequence[frozenset[str]], predicted: Sequence[frozenset[str]]) -> dict[str, object]:
    """Balanced accuracy, per-class recall, macro-F1 and the confusion matrix of calibrated answers."""
    counts = count_classes(truth, predicted)
    return {"balanced_accuracy": balanced_accuracy(counts), "recalls": class_recalls(counts),
            "macro_f1": macro_f1(counts), "confusion": confusion_matrix(truth, predicted)}
