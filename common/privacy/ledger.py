"""A hospital's privacy ledger: every mechanism run on its records, on disk, forever.

The ledger is ``<state_dir>/privacy_ledger.json`` (schema in docs/privacy.md,
"Privacy ledger"). It spans federation runs: a hospital that joins a second
federation keeps spending from the same budget. The file is the only memory of the
privacy already spent, so it is never reset: a missing file in an existing state
directory starts a new ledger, but an unreadable one is an error.

Pure functions build, validate, extend and format the ledger's dictionary;
:class:`PrivacyLedger` is the thin shell that reads and atomically writes the file.
Recording never refuses a mechanism that has already run (refusing would forget
spending); checking the budget *before* running is the caller's job, with
:meth:`PrivacyLedger.epsilon_if`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from common.files import write_text_atomic
from common.privacy.accounting import ACCOUNTANTS, Accountant, Mechanism, epsilon_for

__all__ = [
    "ENTRY_KINDS",
    "LEDGER_FILENAME",
    "LEDGER_VERSION",
    "LedgerError",
    "PrivacyLedger",
    "append_entry",
    "format_report",
    "ledger_history",
    "new_ledger",
    "read_ledger",
    "report",
    "validate_ledger",
    "write_ledger_atomic",
]

logger = logging.getLogger(__name__)

LEDGER_FILENAME = "privacy_ledger.json"
LEDGER_VERSION = 1
#: dpsgd: a training round; stats_release: DP-released per-domain statistics;
#: eval_release: DP-released evaluation metrics.
ENTRY_KINDS: tuple[str, ...] = ("dpsgd", "stats_release", "eval_release")
ENTRY_KEYS: tuple[str, ...] = (
    "round",
    "kind",
    "sample_rate",
    "noise_multiplier",
    "steps",
    "epsilon",
    "time",
)
#: A recomputed cumulative epsilon may fall below the last recorded one by at most this
#: (relative) before the ledger is treated as edited.
RECOMPUTE_REL_TOL = 1e-6
_RESTORE_HINT = (
    "restore the file from a backup; never delete it, since that would forget the "
    "privacy already spent"
)


class LedgerError(ValueError):
    """The privacy ledger is unreadable, inconsistent, or belongs to another setting."""


# ---------------------------------------------------------------------------
# Pure functions on the ledger dictionary
# ---------------------------------------------------------------------------


def new_ledger(
    *, delta: float, target_epsilon: float, accountant: Accountant
) -> dict[str, Any]:
    """An empty ledger dictionary.

    Parameters
    ----------
    delta : float
        The hospital's delta, in (0, 1); fixed for the ledger's lifetime.
    target_epsilon : float
        The hospital's total epsilon budget, > 0.
    accountant : {"rdp", "prv"}
        Accountant used for every cumulative epsilon; fixed for the ledger's lifetime.

    Returns
    -------
    dict
        ``{"version", "delta", "target_epsilon", "accountant", "entries": []}``.
    """
    if not (_is_number(delta) and 0 < delta < 1):
        raise ValueError(f"privacy.delta must be in (0, 1), got {delta!r}; use e.g. 1e-5")
    if not (_is_number(target_epsilon) and 0 < target_epsilon < math.inf):
        raise ValueError(
            f"privacy.target_epsilon must be a finite number > 0, got {target_epsilon!r}"
        )
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"privacy.accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}"
        )
    return {
        "version": LEDGER_VERSION,
        "delta": float(delta),
        "target_epsilon": float(target_epsilon),
        "accountant": accountant,
        "entries": [],
    }


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_float(value: object) -> object:
    """Numbers as Python floats (JSON-stable); anything else unchanged, for validation."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one entry, or None."""
    if not isinstance(entry, dict):
        return f"is not an object: {entry!r}"
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        return f"lacks {missing}"
    if not (_is_int(entry["round"]) and entry["round"] >= 0):
        return f"has round {entry['round']!r}, expected an integer >= 0"
    if entry["kind"] not in ENTRY_KINDS:
        return f"has kind {entry['kind']!r}, expected one of {list(ENTRY_KINDS)}"
    if not (_is_number(entry["sample_rate"]) and 0 < entry["sample_rate"] <= 1):
        return f"has sample_rate {entry['sample_rate']!r}, expected a number in (0, 1]"
    sigma = entry["noise_multiplier"]
    if not (_is_number(sigma) and math.isfinite(sigma) and sigma > 0):
        return f"has noise_multiplier {sigma!r}, expected a finite number > 0"
    if not (_is_int(entry["steps"]) and entry["steps"] >= 1):
        return f"has steps {entry['steps']!r}, expected an integer >= 1"
    eps = entry["epsilon"]
    if not (_is_number(eps) and eps >= 0):  # inf is allowed: no useful guarantee
        return f"has epsilon {eps!r}, expected a number >= 0"
    if not isinstance(entry["time"], str):
        return f"has time {entry['time']!r}, expected an ISO 8601 string"
    return None


def validate_ledger(ledger: object, *, source: str) -> dict[str, Any]:
    """Check the structure of a ledger dictionary; return it unchanged.

    Parameters
    ----------
    ledger : object
        A parsed ledger.
    source : str
        Where it came from (a path), for the error message.

    Returns
    -------
    dict
        ``ledger``.

    Raises
    ------
    LedgerError
        On the first problem found, naming it.
    """

    def bad(problem: str) -> LedgerError:
        return LedgerError(
            f"privacy ledger {source} is invalid: {problem}; {_RESTORE_HINT}"
        )

    if not isinstance(ledger, dict):
        raise bad(f"expected a JSON object, got {type(ledger).__name__}")
    if ledger.get("version") != LEDGER_VERSION:
        version = ledger.get("version")
        raise bad(f"version is {version!r}, this program reads {LEDGER_VERSION}")
    delta = ledger.get("delta")
    if not (_is_number(delta) and 0 < delta < 1):
        raise bad(f"delta is {delta!r}, expected a number in (0, 1)")
    target = ledger.get("target_epsilon")
    if not (_is_number(target) and math.isfinite(target) and target > 0):
        raise bad(f"target_epsilon is {target!r}, expected a number > 0")
    if ledger.get("accountant") not in ACCOUNTANTS:
        accountant = ledger.get("accountant")
        raise bad(f"accountant is {accountant!r}, expected one of {list(ACCOUNTANTS)}")
    entries = ledger.get("entries")
    if not isinstance(entries, list):
        raise bad(f"entries is {type(entries).__name__}, expected a list")
    for i, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem is not None:
            raise bad(f"entry #{i} {problem}")
    return ledger


def ledger_history(ledger: dict[str, Any]) -> list[Mechanism]:
    """The ledger's mechanisms as ``(noise_multiplier, sample_rate, steps)`` triples."""
    return [
        (e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["entries"]
    ]


def append_entry(
    ledger: dict[str, Any],
    *,
    round: int,  # noqa: A002 - the ledger's field name
    kind: str,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    time: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new ledger with one more entry, its cumulative epsilon recomputed.

    Parameters
    ----------
    ledger : dict
        A valid ledger; not modified.
    round : int
        Federation round (>= 0). Rounds need not increase: a new federation run may
        start again from round 1 while the ledger keeps accumulating.
    kind : {"dpsgd", "stats_release", "eval_release"}
        What ran.
    sample_rate, noise_multiplier, steps
        The mechanism (see :mod:`common.privacy.accounting`); releases over all records
        use ``sample_rate = 1.0, steps = 1``.
    time : str
        UTC time, ISO 8601.

    Returns
    -------
    (dict, dict)
        The new ledger and the new entry, whose ``epsilon`` is the epsilon of the whole
        history including it, with the ledger's delta and accountant.

    Raises
    ------
    ValueError
        If the entry is malformed.
    """
    entry: dict[str, Any] = {
        "round": round,
        "kind": kind,
        "sample_rate": _as_float(sample_rate),
        "noise_multiplier": _as_float(noise_multiplier),
        "steps": int(steps) if _is_int(steps) else steps,
        "epsilon": 0.0,
        "time": time,
    }
    problem = _entry_problem(entry)
    if problem is not None:
        raise ValueError(f"cannot record a privacy ledger entry that {problem}")
    mechanism = (entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
    entry["epsilon"] = epsilon_for(
        [*ledger_history(ledger), mechanism],
        delta=ledger["delta"],
        accountant=ledger["accountant"],
    )
    return {**ledger, "entries": [*ledger["entries"], entry]}, entry


def format_report(ledger: dict[str, Any]) -> str:
    """A plain-text table of the ledger's entries and a summary line.

    Parameters
    ----------
    ledger : dict
        A valid ledger.

    Returns
    -------
    str
        One row per entry (round, kind, sample rate, noise multiplier, steps,
        cumulative epsilon, time), then
        ``spent eps = X of target Y at delta = Z (remaining R)`` where X is the last
        entry's cumulative epsilon (0 when empty) and R = Y - X (negative if overspent).
    """
    header = ("round", "kind", "q", "sigma", "steps", "eps (cumulative)", "time (UTC)")
    rows = [
        (
            str(e["round"]),
            e["kind"],
            f"{e['sample_rate']:.6g}",
            f"{e['noise_multiplier']:.6g}",
            str(e["steps"]),
            f"{e['epsilon']:.4f}",
            e["time"],
        )
        for e in ledger["entries"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"privacy ledger ({ledger['accountant']} accountant)"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if not rows:
        lines.append("(no entries: nothing has been spent)")
    spent = ledger["entries"][-1]["epsilon"] if ledger["entries"] else 0.0
    target = ledger["target_epsilon"]
    lines.append(
        f"spent eps = {spent:.4f} of target {target:g} at delta = {ledger['delta']:g} "
        f"(remaining {target - spent:.4f})"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# File I/O
# ---------------------------------------------------------------------------


def read_ledger(path: Path) -> dict[str, Any]:
    """Read and validate a ledger file.

    Raises
    ------
    FileNotFoundError
        If there is no file.
    LedgerError
        If it cannot be read or parsed, or is invalid.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(
            f"privacy ledger {path} cannot be read ({err}); {_RESTORE_HINT}"
        ) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LedgerError(
            f"privacy ledger {path} is not valid JSON ({err}); {_RESTORE_HINT}"
        ) from err
    return validate_ledger(data, source=str(path))


def write_ledger_atomic(path: Path, ledger: dict[str, Any]) -> None:
    """Replace ``path`` with ``ledger`` so that readers see the old or the new file whole.

    ``common.files.write_text_atomic``: temporary file, fsync, rename, fsync of the
    directory, readable by the owner only. A crash can leave a stray
    ``.privacy_ledger.json.*.tmp`` file, never a partial ledger.
    """
    write_text_atomic(path, json.dumps(ledger, indent=2) + "\n", mode=0o600)


def _remove_stray_temporaries(path: Path) -> None:
    """Delete temporary files left by writes that were killed before their rename.

    Only one process writes a ledger at a time; should another one be mid-write, its
    rename then fails and it raises instead of losing an entry.
    """
    for stray in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            stray.unlink()
            logger.info("Removed %s, left by an interrupted ledger write", stray)
        except OSError:
            pass


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def report(state_dir: str | os.PathLike[str]) -> str:
    """The text of ``fedclimb privacy report --state DIR``.

    Raises
    ------
    LedgerError
        If the directory has no ledger, or it is unreadable.
    """
    path = Path(state_dir) / LEDGER_FILENAME
    try:
        return format_report(read_ledger(path))
    except FileNotFoundError:
        raise LedgerError(
            f"no privacy ledger at {path}; check --state (a hospital that never trained "
            "has no ledger yet)"
        ) from None


# ---------------------------------------------------------------------------
# The stateful shell
# ---------------------------------------------------------------------------


class PrivacyLedger:
    """The privacy ledger of one hospital's state directory.

    Use :meth:`open`; every :meth:`record` rewrites the file atomically before
    returning. One process at a time may write a ledger: :meth:`record` refuses if the
    file changed on disk since this object last read or wrote it.
    """

    def __init__(self, path: Path, ledger: dict[str, Any]) -> None:
        self.path = Path(path)
        self._ledger = ledger
        self._spent = epsilon_for(
            ledger_history(ledger), delta=ledger["delta"], accountant=ledger["accountant"]
        )

    @classmethod
    def open(
        cls,
        state_dir: str | os.PathLike[str],
        *,
        delta: float,
        target_epsilon: float,
        accountant: Accountant,
    ) -> PrivacyLedger:
        """Open the ledger in ``state_dir``, creating it if the directory has none.

        Parameters
        ----------
        state_dir : path
            The hospital's state directory; must exist.
        delta, target_epsilon, accountant
            The configured privacy settings. ``delta`` and ``accountant`` must equal the
            ledger's; a different ``target_epsilon`` replaces the stored one (logged as
            a warning when raised).

        Raises
        ------
        LedgerError
            If the directory does not exist, the file is unreadable or inconsistent, or
            its delta or accountant differ from the configured ones.
        """
        directory = Path(state_dir)
        if not directory.is_dir():
            raise LedgerError(
                f"state directory {directory} does not exist; create it or fix --state "
                "(the privacy ledger lives there)"
            )
        path = directory / LEDGER_FILENAME
        configured = new_ledger(
            delta=delta, target_epsilon=target_epsilon, accountant=accountant
        )
        _remove_stray_temporaries(path)
        try:
            ledger = read_ledger(path)
        except FileNotFoundError:
            # Hidden files (lock files, interrupted temporaries) say nothing about past
            # training; anything else in the directory suggests a lost ledger.
            if any(not f.name.startswith(".") for f in directory.iterdir()):
                logger.warning(
                    "State directory %s has files but no %s: starting a new ledger with "
                    "nothing spent. If this hospital trained before, stop and restore "
                    "the ledger from a backup",
                    directory, LEDGER_FILENAME,
                )
            write_ledger_atomic(path, configured)
            logger.info(
                "Created privacy ledger %s (target epsilon %g, delta %g, %s accountant)",
                path, target_epsilon, delta, accountant,
            )
            return cls(path, configured)

        if not math.isclose(ledger["delta"], configured["delta"], rel_tol=1e-12):
            raise LedgerError(
                f"privacy ledger {path} was kept at delta={ledger['delta']:g} but "
                f"privacy.delta is {configured['delta']:g}; delta cannot change for a "
                f"hospital's records: set privacy.delta back to {ledger['delta']:g}"
            )
        if ledger["accountant"] != accountant:
            raise LedgerError(
                f"privacy ledger {path} was kept with the {ledger['accountant']!r} "
                f"accountant but privacy.accountant is {accountant!r}; set "
                f"privacy.accountant back to {ledger['accountant']!r}"
            )
        opened = cls(path, ledger)
        opened._check_recorded_epsilon()
        old_target = ledger["target_epsilon"]
        if not math.isclose(old_target, configured["target_epsilon"], rel_tol=1e-12):
            raised = configured["target_epsilon"] > old_target
            level = logging.WARNING if raised else logging.INFO
            logger.log(
                level,
                "Privacy target epsilon of %s changed from %g to %g (spent so far %.4f)",
                path, old_target, configured["target_epsilon"], opened._spent,
            )
            opened._ledger = {**ledger, "target_epsilon": configured["target_epsilon"]}
            write_ledger_atomic(path, opened._ledger)
        return opened

    def _check_recorded_epsilon(self) -> None:
        """Refuse a ledger whose history accounts for less than it once recorded."""
        entries = self._ledger["entries"]
        if not entries:
            return
        recorded = entries[-1]["epsilon"]
        if self._spent < recorded * (1 - RECOMPUTE_REL_TOL):
            raise LedgerError(
                f"privacy ledger {self.path} records epsilon {recorded:.6g} but its "
                f"entries now add up to {self._spent:.6g}: entries were removed or edited; "
                f"{_RESTORE_HINT}"
            )
        if self._spent > recorded * (1 + RECOMPUTE_REL_TOL):
            logger.warning(
                "Privacy ledger %s: recomputed epsilon %.6g exceeds the recorded %.6g "
                "(the accounting library changed?); using the larger, recomputed value",
                self.path, self._spent, recorded,
            )

    @property
    def delta(self) -> float:
        """The ledger's delta."""
        return float(self._ledger["delta"])

    @property
    def target_epsilon(self) -> float:
        """The configured total epsilon."""
        return float(self._ledger["target_epsilon"])

    @property
    def accountant(self) -> Accountant:
        """The ledger's accountant, ``"rdp"`` or ``"prv"``."""
        return cast(Accountant, self._ledger["accountant"])

    def as_dict(self) -> dict[str, Any]:
        """A copy of the ledger's dictionary (what is on disk)."""
        copy: dict[str, Any] = json.loads(json.dumps(self._ledger))
        return copy

    def entries(self) -> list[dict[str, Any]]:
        """Copies of the entries, oldest first."""
        entries: list[dict[str, Any]] = self.as_dict()["entries"]
        return entries

    def history(self) -> list[Mechanism]:
        """The recorded mechanisms as ``(noise_multiplier, sample_rate, steps)``."""
        return ledger_history(self._ledger)

    def spent_epsilon(self) -> float:
        """Epsilon of everything recorded, recomputed from the history."""
        return self._spent

    def remaining(self) -> float:
        """``target_epsilon - spent_epsilon()``; negative if the budget was overspent."""
        return self.target_epsilon - self._spent

    def epsilon_if(self, extra: Iterable[Sequence[float]]) -> float:
        """Epsilon the ledger would show after also running ``extra`` mechanisms.

        Parameters
        ----------
        extra : iterable of (noise_multiplier, sample_rate, steps)
            Planned mechanisms.

        Returns
        -------
        float
            Compare with :attr:`target_epsilon` before running them.
        """
        return epsilon_for(
            [*self.history(), *extra], delta=self.delta, accountant=self.accountant
        )

    def fits(self, extra: Iterable[Sequence[float]]) -> bool:
        """Whether ``epsilon_if(extra) <= target_epsilon``."""
        return self.epsilon_if(extra) <= self.target_epsilon

    def record(
        self,
        round: int,  # noqa: A002 - the ledger's field name
        kind: str,
        *,
        sample_rate: float,
        noise_multiplier: float,
        steps: int,
    ) -> dict[str, Any]:
        """Append a mechanism that has run, and write the ledger to disk atomically.

        Never refuses for budget reasons: the mechanism has already run. Logs a warning
        when the new cumulative epsilon exceeds the target.

        Returns
        -------
        dict
            The new entry (with its cumulative ``epsilon`` and ``time``).

        Raises
        ------
        LedgerError
            If the file on disk changed since this ledger last read or wrote it.
        """
        try:
            on_disk = read_ledger(self.path)
        except FileNotFoundError:
            on_disk = None
        if on_disk != self._ledger:
            raise LedgerError(
                f"privacy ledger {self.path} changed on disk since it was opened (another "
                "process using the same state directory?); stop the other process and "
                "reopen the ledger"
            )
        ledger, entry = append_entry(
            self._ledger,
            round=round,
            kind=kind,
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=steps,
            time=_utc_now(),
        )
        write_ledger_atomic(self.path, ledger)
        self._ledger = ledger
        self._spent = entry["epsilon"]
        if self._spent > self.target_epsilon:
            logger.warning(
                "Privacy budget of %s exceeded: epsilon %.4f > target %g after %s round %s",
                self.path, self._spent, self.target_epsilon, kind, round,
            )
        return dict(entry)
