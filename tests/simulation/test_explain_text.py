"""The text a review PNG shows beside the record: answer probabilities."""

from __future__ import annotations

import math

import pytest

from simulation.explain import Explanation, _option_rows, _probability_lines, render_explanation


def test_option_rows_turn_log_probabilities_into_probabilities():
    rows = _option_rows(("Benign", "Malignant"), [math.log(0.75), math.log(0.25)], [math.log(0.9), math.log(0.1)])
    assert [r[0] for r in rows] == ["Benign", "Malignant"]
    assert [r[1] for r in rows] == pytest.approx([0.75, 0.25])
    assert [r[2] for r in rows] == pytest.approx([0.9, 0.1])
    assert _option_rows(("Benign", "Malignant"), None, None) == []
    assert _option_rows(("A", "B", "C"), [-1.0, -2.0], None) == []  # not one value per option
    assert [r[2] for r in _option_rows(("A", "B"), [-1.0, -2.0], None)] == [None, None]


def test_probability_lines_align_the_options_and_name_the_base_model():
    lines = _probability_lines([("Benign", 0.75, 0.9), ("Malignant", 0.25, 0.1)])
    assert lines == ["", "Answer probabilities:",
                     "  Benign     0.750   (base model 0.900)",
                     "  Malignant  0.250   (base model 0.100)"]
    assert _probability_lines([("Yes", 1.0, None)]) == ["", "Answer probabilities:", "  Yes  1.000"]
    assert _probability_lines([]) == []


def test_a_text_record_with_probabilities_renders(tmp_path):
    ex = Explanation(record_id="t:1", domain="wdbc", question="Is it benign or malignant?", options=("Benign", "Malignant"),
                     images=[], first_record_image=None, ecg_images=0, response="\\boxed{Benign}", predicted="benign",
                     truth="malignant", correct=False, reward={"total": 0.25}, option_probabilities=_option_rows(
                         ("Benign", "Malignant"), [math.log(0.8), math.log(0.2)], None))
    path = render_explanation(ex, tmp_path / "x.png")
    assert path.stat().st_size > 10_000
