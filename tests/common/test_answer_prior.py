"""The hospital's answer prior for logit adjustment: hand-computed values."""

from __future__ import annotations

import math

import pytest

from common.answer_prior import answer_counts, first_token_bias, option_prior


def test_counts_are_per_domain_and_count_every_answer_of_a_multi_label_record() -> None:
    counts = answer_counts([("d", ("A",)), ("d", ("A",)), ("d", ("B",)), ("e", ("A", "B"))])
    assert counts == {"d": {"A": 2, "B": 1}, "e": {"A": 1, "B": 1}}


def test_option_prior_is_add_one_over_the_record_options() -> None:
    # (2 + 1) / 6, (1 + 1) / 6, (0 + 1) / 6: an option never seen keeps a finite log-prior
    assert option_prior({"A": 2, "B": 1}, ["A", "B", "C"]) == pytest.approx([0.5, 1 / 3, 1 / 6])
    # counts of answers that are not among this record's options do not enter
    assert option_prior({"A": 8, "Z": 100}, ["A", "B"]) == pytest.approx([0.9, 0.1])
    assert option_prior({}, ["A", "B"]) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="at least one option"):
        option_prior({}, [])


def test_options_sharing_a_first_token_share_the_log_of_their_summed_prior() -> None:
    bias = first_token_bias([[5, 1], [6, 1], [5, 2]], [0.5, 0.3, 0.2], 2.0)
    assert bias == pytest.approx({5: 2 * math.log(0.7), 6: 2 * math.log(0.3)})
    assert first_token_bias([[5], [6]], [0.9, 0.1], 0.0) == {5: 0.0, 6: 0.0}


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="2 answer sequences but 1"):
        first_token_bias([[1], [2]], [1.0], 1.0)
    with pytest.raises(ValueError, match="strength"):
        first_token_bias([[1]], [1.0], -1.0)
    with pytest.raises(ValueError, match="> 0"):
        first_token_bias([[1], [2]], [1.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="empty"):
        first_token_bias([[]], [1.0], 1.0)
