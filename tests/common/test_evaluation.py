"""Confusion matrices and the constant-answer baseline, against hand-computed values."""

from __future__ import annotations

import pytest

from common.evaluation import confusion_matrix, constant_baseline, label_key, majority_answer

B, M = frozenset({"benign"}), frozenset({"malignant"})


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    truth = [B, B, M, M, M]
    pred = [B, M, M, frozenset(), M]
    assert confusion_matrix(truth, pred) == {"benign": {"benign": 1, "malignant": 1},
                                             "malignant": {"(none)": 1, "malignant": 2}}
    with pytest.raises(ValueError):
        confusion_matrix(truth, pred[:2])


def test_majority_answer_and_ties_are_stable():
    assert majority_answer([B, M, M]) == M
    assert majority_answer([M, B]) == B  # tie: the sorted key wins
    assert label_key(frozenset({"b", "a"})) == "a, b"


def test_constant_baseline_by_hand():
    # 5 benign, 3 malignant, always "benign": recall 1 and 0 -> balanced accuracy 0.5;
    # F1(benign) = 2*5/(2*5+0+3) = 10/13, F1(malignant) = 0 -> macro-F1 5/13; accuracy 5/8.
    truth = [B] * 5 + [M] * 3
    base = constant_baseline(truth, B)
    assert base.answer == "benign"
    assert base.balanced_accuracy == pytest.approx(0.5)
    assert base.macro_f1 == pytest.approx(5 / 13)
    assert base.accuracy == pytest.approx(5 / 8)
