"""Confusion matrices and the constant-answer baseline, against hand-computed values."""

from __future__ import annotations

import pytest

from common.evaluation import (
    calibrated_answers,
    calibrated_scores,
    confusion_matrix,
    constant_baseline,
    label_key,
    majority_answer,
    option_offsets,
    option_separation,
    rank_auc,
)

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


def test_rank_auc_by_hand():
    # positives score {2, 0}, negatives {-1, 0}: pairs 2>-1, 2>0, 0>-1 win, 0=0 ties -> 3.5 / 4
    assert rank_auc([-1.0, 2.0, 0.0, 0.0], [False, True, True, False]) == pytest.approx(0.875)
    assert rank_auc([1.0, 2.0, 3.0], [False, False, True]) == pytest.approx(1.0)
    assert rank_auc([1.0, 2.0, 3.0], [True, False, False]) == pytest.approx(0.0)
    assert rank_auc([5.0, 5.0], [True, False]) == pytest.approx(0.5)
    assert rank_auc([1.0, 2.0], [True, True]) is None


def test_option_separation_by_hand():
    ben, mal = frozenset({"benign"}), frozenset({"malignant"})
    truth = [ben, mal, mal, ben]
    # log p(malignant) - log p(benign) = -1, 2, 0, 0 (options listed in either order)
    options = [[ben, mal], [mal, ben], [ben, mal], [ben, mal]]
    logprobs = [[-0.3, -1.3], [-0.1, -2.1], [-0.7, -0.7], [-0.7, -0.7]]
    out = option_separation(truth, options, logprobs)
    assert out is not None
    assert out["labels"] == ["benign", "malignant"] and out["records"] == 4
    assert out["auc"] == pytest.approx(0.875)
    assert out["mean_score"] == pytest.approx({"benign": -0.5, "malignant": 1.0})
    # Not a two-answer question, or a record with other options: nothing to report.
    assert option_separation([ben], [[ben, mal, frozenset({"other"})]], [[-1.0, -2.0, -3.0]]) is None
    assert option_separation(truth[:2], [[ben, mal], [ben, frozenset({"x"})]], logprobs[:2]) is None


def test_option_offsets_are_the_mean_log_probability_of_each_option():
    # benign: (-0.2 - 0.4 - 0.3) / 3 = -0.3; malignant: (-1.8 - 1.2 - 1.5) / 3 = -1.5
    options = [[B, M], [M, B], [B, M]]
    logprobs = [[-0.2, -1.8], [-1.2, -0.4], [-0.3, -1.5]]
    assert option_offsets(options, logprobs) == pytest.approx({"benign": -0.3, "malignant": -1.5})
    with pytest.raises(ValueError, match="2 options but 1"):
        option_offsets([[B, M]], [[-0.1]])


def test_calibrated_answers_remove_the_prior_and_keep_the_ranking():
    offsets = {"benign": -0.3, "malignant": -1.5}  # the model prefers benign by 1.2 nats on average
    options = [[B, M], [B, M], [M, B]]
    # Uncalibrated every record is benign. Calibrated scores (benign, malignant):
    # record 0: -0.2+0.3=0.1 vs -1.8+1.5=-0.3 -> benign; record 1: -0.6+0.3=-0.3 vs -1.0+1.5=0.5 -> malignant;
    # record 2 (options listed malignant first): -1.1+1.5=0.4 vs -0.5+0.3=-0.2 -> malignant.
    logprobs = [[-0.2, -1.8], [-0.6, -1.0], [-1.1, -0.5]]
    assert calibrated_answers(options, logprobs, {}) == [B, B, B]
    assert calibrated_answers(options, logprobs, offsets) == [B, M, M]
    # A tie goes to the first option listed.
    assert calibrated_answers([[M, B]], [[-1.5, -0.3]], offsets) == [M]
    scores = calibrated_scores([B, M, B], [B, M, M])
    assert scores["recalls"] == pytest.approx({"benign": 0.5, "malignant": 1.0})
    assert scores["balanced_accuracy"] == pytest.approx(0.75)
    assert scores["confusion"] == {"benign": {"benign": 1, "malignant": 1}, "malignant": {"malignant": 1}}
