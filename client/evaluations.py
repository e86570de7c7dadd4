"""How many held-out evaluations this hospital has answered (``limits.max_evaluations_*``).

Every answered evaluation sends exact metrics of an adapter the server chose; without a
bound a server could query the test split as an oracle. The counts live in the state
directory (``evaluations.json``, beside the privacy ledger) and survive restarts: per
server round of a Flower run, per run, and in total over the life of the state directory
(a server that starts run after run still meets the total). An evaluation is counted
before it runs, so one that crashes half-way still counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from common.config import HospitalLimits
from common.files import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["EVALUATIONS_FILE", "admit_evaluation", "evaluation_counts"]

EVALUATIONS_FILE = "evaluations.json"


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One counter update at a time per state directory (blocking: updates are short)."""
    with open(state_dir / f".{EVALUATIONS_FILE}.lock", "w", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def evaluation_counts(state_dir: str | Path) -> tuple[int, dict[int, dict[int, int]]]:
    """(total, {run id: {server round: evaluations}}) answered so far from ``state_dir``.

    Raises
    ------
    RuntimeError
        If the file exists but is not a counter this module wrote (the hospital then
        answers no evaluation until an operator looks at it).
    """
    path = Path(state_dir) / EVALUATIONS_FILE
    if not path.is_file():
        return 0, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        total = data["total"]
        runs = {int(run): {int(r): n for r, n in rounds.items()} for run, rounds in data["runs"].items()}
        counts = [n for rounds in runs.values() for n in rounds.values()]
        if type(total) is not int or total < 0 or any(type(n) is not int or n < 0 for n in counts):
            raise ValueError("counts must be non-negative integers")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RuntimeError(f"{path} is unreadable ({exc}); no evaluation is answered until it is repaired") from exc
    return total, runs


def admit_evaluation(state_dir: str | Path, run_id: int, server_round: int, limits: HospitalLimits) -> bool:
    """Count one evaluation of ``server_round`` of Flower run ``run_id`` if the limits allow it.

    Returns
    -------
    bool
        True when the evaluation may run (it is now counted); False when
        ``limits.max_evaluations_per_round`` (this round of this run),
        ``limits.max_evaluations_per_run`` or ``limits.max_evaluations_total`` is reached
        (nothing is counted).
    """
    state_dir = Path(state_dir)
    with _locked(state_dir):
        total, runs = evaluation_counts(state_dir)
        rounds = runs.setdefault(run_id, {})
        in_round, in_run = rounds.get(server_round, 0), sum(rounds.values())
        for count, limit, name in ((total, limits.max_evaluations_total, "max_evaluations_total"),
                                   (in_run, limits.max_evaluations_per_run, "max_evaluations_per_run"),
                                   (in_round, limits.max_evaluations_per_round, "max_evaluations_per_round")):
            if count >= limit:
                log.warning("evaluation of round %d (run %d) refused: limits.%s=%d answered already",
                            server_round, run_id, name, limit)
                return False
        rounds[server_round] = in_round + 1
        text = json.dumps({"total": total + 1, "runs": {
            str(run): {str(r): n for r, n in sorted(rs.items())} for run, rs in sorted(runs.items())}})
        write_text_atomic(state_dir / EVALUATIONS_FILE, text)
    return True
