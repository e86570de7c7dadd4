"""The hospital's evaluation limits (client/evaluations.py), kept in its state directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from client.evaluations import EVALUATIONS_FILE, admit_evaluation, evaluation_counts
from common.config import HospitalLimits

ROOT = Path(__file__).resolve().parents[2]


def _admit_in_a_new_process(state: Path, server_round: int) -> bool:
    """admit_evaluation in a fresh interpreter: a restarted SuperNode."""
    code = ("import sys; from client.evaluations import admit_evaluation; from common.config import HospitalLimits;"
            f"print(admit_evaluation(sys.argv[1], 7, {server_round}, "
            "HospitalLimits(max_evaluations_per_round=2, max_evaluations_total=3)))")
    out = subprocess.run([sys.executable, "-c", code, str(state)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "True"


def test_limits_hold_across_process_restarts(tmp_path: Path) -> None:
    """2 per round, 3 in total, each call in its own process."""
    assert [_admit_in_a_new_process(tmp_path, r) for r in (1, 1, 1)] == [True, True, False]
    assert _admit_in_a_new_process(tmp_path, 2) is True
    assert _admit_in_a_new_process(tmp_path, 3) is False  # the 4th in total
    assert evaluation_counts(tmp_path) == (3, {7: {1: 2, 2: 1}})


def test_a_refused_evaluation_is_not_counted(tmp_path: Path) -> None:
    limits = HospitalLimits(max_evaluations_per_round=1, max_evaluations_total=10)
    assert admit_evaluation(tmp_path, 1, 0, limits)
    assert not admit_evaluation(tmp_path, 1, 0, limits)
    assert evaluation_counts(tmp_path) == (1, {1: {0: 1}})


def test_rounds_are_counted_per_run_and_runs_are_bounded(tmp_path: Path) -> None:
    """A new run's round 0 is not the last run's round 0; a run has its own bound; the total holds over runs."""
    limits = HospitalLimits(max_evaluations_per_round=1, max_evaluations_per_run=2, max_evaluations_total=5)
    assert [admit_evaluation(tmp_path, run, 0, limits) for run in (1, 2, 3)] == [True, True, True]
    assert admit_evaluation(tmp_path, 1, 1, limits)
    assert not admit_evaluation(tmp_path, 1, 2, limits)  # run 1 has had its 2
    assert admit_evaluation(tmp_path, 2, 1, limits)      # the 5th in total
    assert not admit_evaluation(tmp_path, 4, 0, limits)  # a fresh run still meets the total
    assert evaluation_counts(tmp_path) == (5, {1: {0: 1, 1: 1}, 2: {0: 1, 1: 1}, 3: {0: 1}})


@pytest.mark.parametrize("text", ["not json", '{"total": -1, "runs": {}}', '{"total": 1}',
                                  '{"total": 1, "runs": {"1": {"x": 1}}}', '{"total": 1, "runs": {"1": {"0": -2}}}'])
def test_an_unreadable_counter_answers_nothing(tmp_path: Path, text: str) -> None:
    """Fail closed: a damaged file stops evaluations until an operator looks at it."""
    (tmp_path / EVALUATIONS_FILE).write_text(text)
    with pytest.raises(RuntimeError, match="unreadable"):
        admit_evaluation(tmp_path, 1, 1, HospitalLimits())


def test_the_limits_must_be_positive() -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="limits.max_evaluations_total"):
        HospitalLimits(max_evaluations_total=0)
