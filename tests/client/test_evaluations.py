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
            f"print(admit_evaluation(sys.argv[1], {server_round}, "
            "HospitalLimits(max_evaluations_per_round=2, max_evaluations_total=3)))")
    out = subprocess.run([sys.executable, "-c", code, str(state)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "True"


def test_limits_hold_across_process_restarts(tmp_path: Path) -> None:
    """2 per round, 3 in total, each call in its own process."""
    assert [_admit_in_a_new_process(tmp_path, r) for r in (1, 1, 1)] == [True, True, False]
    assert _admit_in_a_new_process(tmp_path, 2) is True
    assert _admit_in_a_new_process(tmp_path, 3) is False  # the 4th in total
    assert evaluation_counts(tmp_path) == (3, {1: 2, 2: 1})


def test_a_refused_evaluation_is_not_counted(tmp_path: Path) -> None:
    limits = HospitalLimits(max_evaluations_per_round=1, max_evaluations_total=10)
    assert admit_evaluation(tmp_path, 0, limits)
    assert not admit_evaluation(tmp_path, 0, limits)
    assert evaluation_counts(tmp_path) == (1, {0: 1})


@pytest.mark.parametrize("text", ["not json", '{"total": -1, "rounds": {}}', '{"total": 1}',
                                  '{"total": 1, "rounds": {"x": 1}}'])
def test_an_unreadable_counter_answers_nothing(tmp_path: Path, text: str) -> None:
    """Fail closed: a damaged file stops evaluations until an operator looks at it."""
    (tmp_path / EVALUATIONS_FILE).write_text(text)
    with pytest.raises(RuntimeError, match="unreadable"):
        admit_evaluation(tmp_path, 1, HospitalLimits())


def test_the_limits_must_be_positive() -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="limits.max_evaluations_total"):
        HospitalLimits(max_evaluations_total=0)
