"""Tests of common.metrics on small hand-counted examples."""

from __future__ import annotations

import pytest

from common.metrics import balanced_accuracy, class_recalls, count_classes, macro_f1


def test_single_label_binary():
    # A: tp 2 (records 1, 2), fn 1 (record 3); B: tp 1 (record 4), fp 1 (record 3).
    c = count_classes([["A"], ["A"], ["A"], ["B"]], [["A"], ["A"], ["B"], ["B"]])
    assert c.tp == {"A": 2.0, "B": 1.0}
    assert c.fn == {"A": 1.0, "B": 0.0}
    assert c.fp == {"B": 1.0}
    assert c.classes() == ["A", "B"]
    # Recalls 2/3 and 1 -> 5/6 (plain accuracy would be 3/4).
    assert class_recalls(c) == pytest.approx({"A": 2 / 3, "B": 1.0})
    assert balanced_accuracy(c) == pytest.approx(5 / 6)
    # F1: A 2*2/(4+1+0) = 0.8, B 2*1/(2+0+1) = 2/3 -> 0.7333333.
    assert macro_f1(c) == pytest.approx((0.8 + 2 / 3) / 2)


def test_prediction_outside_the_options_is_a_miss_not_a_class():
    c = count_classes([["A"], ["B"]], [["Maybe"], ["B"]])
    assert c.tp == {"A": 0.0, "B": 1.0} and c.fn == {"A": 1.0, "B": 0.0}
    assert c.fp == {"Maybe": 1.0}
    assert c.classes() == ["A", "B"]
    # Recalls 0 and 1; F1 0 and 1. Averaging "Maybe" in would give 1/3.
    assert class_recalls(c) == {"A": 0.0, "B": 1.0}  # "Maybe" is no class of the truth
    assert balanced_accuracy(c) == pytest.approx(0.5)
    assert macro_f1(c) == pytest.approx(0.5)


def test_multi_label():
    truth = [{"A", "B"}, {"B"}, {"C"}]
    predicted = [{"A"}, {"B", "C"}, {"C"}]
    c = count_classes(truth, predicted)
    # A: tp 1. B: tp 1 (record 2), fn 1 (record 1). C: tp 1 (record 3), fp 1 (record 2).
    assert c.tp == {"A": 1.0, "B": 1.0, "C": 1.0}
    assert c.fn == {"A": 0.0, "B": 1.0, "C": 0.0}
    assert c.fp == {"C": 1.0}
    # Recalls 1, 1/2, 1 -> 5/6; F1 1, 2/3, 2/3 -> 7/9.
    assert balanced_accuracy(c) == pytest.approx(5 / 6)
    assert macro_f1(c) == pytest.approx(7 / 9)


def test_duplicate_labels_count_once():
    c = count_classes([["A", "A"]], [["A", "A", "B", "B"]])
    assert c.tp == {"A": 1.0} and c.fn == {"A": 0.0} and c.fp == {"B": 1.0}
    assert balanced_accuracy(c) == 1.0
    assert macro_f1(c) == pytest.approx(1.0)


def test_empty_predictions():
    c = count_classes([["A"], ["B"], ["B"]], [[], [], ["B"]])
    assert c.tp == {"A": 0.0, "B": 1.0} and c.fn == {"A": 1.0, "B": 1.0} and c.fp == {}
    # Recalls 0 and 1/2; F1 0 and 2/(2+1) = 2/3.
    assert balanced_accuracy(c) == pytest.approx(0.25)
    assert macro_f1(c) == pytest.approx(1 / 3)

    nothing = count_classes([["A"], ["B"]], [[], []])
    assert balanced_accuracy(nothing) == 0.0 and macro_f1(nothing) == 0.0


def test_no_records():
    c = count_classes([], [])
    assert c.classes() == []
    assert balanced_accuracy(c) == 0.0 and macro_f1(c) == 0.0


def test_misaligned_inputs_are_rejected():
    with pytest.raises(ValueError, match="truth has 2 records but predictions have 1"):
        count_classes([["A"], ["B"]], [["A"]])
