"""A hospital's privacy ledger: every mechanism run on its records, on disk, forever.

The ledger is ``<state_dir>/privacy_ledger.json`` and its high-water mark
``<state_dir>/privacy_ledger.mark.json`` (schemas in docs/privacy.md, "Privacy
ledger"). It spans federation runs: a hospital that joins a second federation keeps
spending from the same budget. The file is the only memory of the privacy already
spent, so it is never reset: entries are hash-chained and checked against the mark
(:mod:`common.privacy.ledger_chain`), the spent epsilon is always recomputed from the
entries, and a missing ledger beside other privacy state is refused unless the operator
forces a new one (``FEDCLIMB_FORCE_NEW_LEDGER=1``).

Pure functions build, validate, extend and format the ledger's dictionary;
:class:`PrivacyLedger` is the thin shell that reads and atomically writes the files.
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
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from common.files import write_text_atomic
from common.privacy.accounting import ACCOUNTANTS, Accountant, Mechanism, epsilon_for
from common.privacy.ledger_chain import (
    HASH_PATTERN,
    RECOMPUTE_REL_TOL,
    ChainCheck,
    chain_hashes,
    check_against_mark,
    entry_hash,
    new_mark,
    validate_mark,
)

__all__ = [
    "ENTRY_KINDS",
    "FORCE_NEW_LEDGER_ENV",
    "LEDGER_FILENAME",
    "LEDGER_VERSION",
    "MARK_FILENAME",
    "LedgerError",
    "PrivacyLedger",
    "append_entry",
    "format_report",
    "ledger_history",
    "new_ledger",
    "read_ledger",
    "report",
    "seal",
    "validate_ledger",
    "verify",
    "write_ledger_atomic",
]

logger = logging.getLogger(__name__)

LEDGER_FILENAME = "privacy_ledger.json"
MARK_FILENAME = "privacy_ledger.mark.json"
LEDGER_VERSION = 2
#: Set to 1 to start a new, empty ledger although the state directory holds other
#: privacy state (it forgets whatever the lost ledger had recorded).
FORCE_NEW_LEDGER_ENV = "FEDCLIMB_FORCE_NEW_LEDGER"
#: Names in a state directory that only exist once a hospital has trained or released
#: something: the mark, the released counts (client.stats.RELEASE_FILE) and the DRPO
#: history folder. A missing ledger beside any of them was lost, not never created.
PRIVACY_STATE_NAMES: tuple[str, ...] = (MARK_FILENAME, "released_domain_counts.json", "drpo")
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
    "prev",
)
_RESTORE_HINT = (
    "restore the ledger and its mark from a backup; never delete them, since that would "
    "forget the privacy already spent"
)


class LedgerError(ValueError):
    """The privacy ledger is unreadable, inconsistent, or belongs to another setting."""


# ---------------------------------------------------------------------------
# Pure functions on the ledger dictionary
# ---------------------------------------------------------------------------


def new_ledger(
    *, delta: float, target_epsilon: float, accountant: Accountant, ledger_id: str | None = None
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
    ledger_id : str or None
        The ledger's identity, bound into its hash chain; None draws 128 random bits.

    Returns
    -------
    dict
        ``{"version", "id", "delta", "target_epsilon", "accountant", "entries": []}``.
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
        "id": secrets.token_hex(16) if ledger_id is None else ledger_id,
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


def _entry_problem(entry: object, *, keys: Sequence[str] = ENTRY_KEYS) -> str | None:
    """What is wrong with one entry, or None."""
    if not isinstance(entry, dict):
        return f"is not an object: {entry!r}"
    missing = [k for k in keys if k not in entry]
    if missing:
        return f"lacks {missing}"
    extra = sorted(set(entry) - set(keys))
    if extra:
        return f"has unknown fields {extra}"
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
    if "prev" in keys and not (isinstance(entry["prev"], str) and HASH_PATTERN.fullmatch(entry["prev"])):
        return f"has prev {entry['prev']!r}, expected a SHA-256 hex digest"
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
    if ledger.get("version") == 1:
        raise LedgerError(
            f"privacy ledger {source} has format version 1, written by an older fedclimb "
            "without a hash chain; check it against your backups, then run "
            "`fedclimb privacy seal --state DIR` once to chain its entries (see "
            "docs/privacy.md, \"Upgrading a version-1 ledger\")"
        )
    if ledger.get("version") != LEDGER_VERSION:
        version = ledger.get("version")
        raise bad(f"version is {version!r}, this program reads {LEDGER_VERSION}")
    if not (isinstance(ledger.get("id"), str) and ledger["id"]):
        raise bad(f"id is {ledger.get('id')!r}, expected a non-empty string")
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
        history including it, with the ledger's delta and accountant, and whose
        ``prev`` is the hash of the ledger's last entry (or of its header).

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
        "prev": chain_hashes(ledger)[-1],
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


def format_report(ledger: dict[str, Any], *, spent: float, head: str = "") -> str:
    """A plain-text table of the ledger's entries and a summary line.

    Parameters
    ----------
    ledger : dict
        A valid ledger.
    spent : float
        Epsilon recomputed from all entries (never the stored fields).
    head : str
        Hash of the last entry, printed (abbreviated) when given.

    Returns
    -------
    str
        One row per entry (round, kind, sample rate, noise multiplier, steps,
        cumulative epsilon as recorded, time), an optional ``chain head`` line, then
        ``spent eps = X of target Y at delta = Z (remaining R)`` where X is ``spent``
        and R = Y - X (negative if overspent).
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
    if head:
        lines.append(
            f"{len(rows)} entries, hash chain and high-water mark verified; chain head {head}"
        )
    target = ledger["target_epsilon"]
    lines.append(
        f"spent eps = {spent:.4f} of target {target:g} at delta = {ledger['delta']:g} "
        f"(remaining {target - spent:.4f})"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# File I/O
# ---------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> object:
    """Parse a JSON file; FileNotFoundError passes through, other failures are LedgerError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"{what} {path} cannot be read ({err}); {_RESTORE_HINT}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LedgerError(f"{what} {path} is not valid JSON ({err}); {_RESTORE_HINT}") from err


def read_ledger(path: Path) -> dict[str, Any]:
    """Read and validate (structure only) a ledger file.

    Raises
    ------
    FileNotFoundError
        If there is no file.
    LedgerError
        If it cannot be read or parsed, or is invalid.
    """
    return validate_ledger(_read_json(path, "privacy ledger"), source=str(path))


def read_mark(path: Path) -> dict[str, Any]:
    """Read and validate a high-water mark file (FileNotFoundError if there is none)."""
    data = _read_json(path, "privacy ledger high-water mark")
    try:
        return validate_mark(data)
    except ValueError as err:
        raise LedgerError(
            f"privacy ledger high-water mark {path} is invalid: {err}; {_RESTORE_HINT}"
        ) from None


def write_ledger_atomic(path: Path, ledger: dict[str, Any]) -> None:
    """Replace ``path`` with ``ledger`` so that readers see the old or the new file whole.

    ``common.files.write_text_atomic``: temporary file, fsync, rename, fsync of the
    directory, readable by the owner only. A crash can leave a stray
    ``.privacy_ledger.json.*.tmp`` file, never a partial ledger.
    """
    write_text_atomic(path, json.dumps(ledger, indent=2) + "\n", mode=0o600)


def _write_mark(path: Path, mark: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(mark, indent=2) + "\n", mode=0o600)


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


def _recompute(ledger: dict[str, Any]) -> float:
    """Epsilon of all entries, recomputed (never read from the stored fields)."""
    return epsilon_for(
        ledger_history(ledger), delta=ledger["delta"], accountant=ledger["accountant"]
    )


def verify(
    ledger: dict[str, Any], mark: dict[str, Any] | None, *, source: str
) -> tuple[float, ChainCheck]:
    """Recompute the spent epsilon and check the hash chain and the high-water mark.

    Parameters
    ----------
    ledger : dict
        A structurally valid ledger.
    mark : dict or None
        Its high-water mark; None (missing) is accepted only for an empty ledger.
    source : str
        The ledger's path, for messages.

    Returns
    -------
    (float, ChainCheck)
        The recomputed epsilon of all entries, and the chain head and how many entries
        the ledger has beyond the mark.

    Raises
    ------
    LedgerError
        Naming the first problem: a broken chain (which entry), a ledger shorter than
        or different from its mark, a recomputed epsilon below a recorded one.
    """
    if mark is None:
        if ledger["entries"]:
            raise LedgerError(
                f"privacy ledger {source} has {len(ledger['entries'])} entries but no "
                f"high-water mark {MARK_FILENAME} beside it: the mark was deleted, and with "
                f"it the proof that no entries were removed; {_RESTORE_HINT}"
            )
        mark = new_mark(ledger, head=chain_hashes(ledger)[-1], epsilon=0.0)
    spent = _recompute(ledger)
    try:
        check = check_against_mark(ledger, mark, spent=spent)
    except ValueError as err:
        raise LedgerError(f"privacy ledger {source} fails its checks: {err}; {_RESTORE_HINT}") from None
    return spent, check


def report(state_dir: str | os.PathLike[str]) -> str:
    """The text of ``fedclimb privacy report --state DIR``, after :func:`verify`.

    Reads only; the spent epsilon is recomputed from the entries.

    Raises
    ------
    LedgerError
        If the directory has no ledger, or it is unreadable or fails its checks.
    """
    path = Path(state_dir) / LEDGER_FILENAME
    try:
        ledger = read_ledger(path)
    except FileNotFoundError:
        raise LedgerError(
            f"no privacy ledger at {path}; check --state (a hospital that never trained "
            "has no ledger yet)"
        ) from None
    try:
        mark: dict[str, Any] | None = read_mark(path.parent / MARK_FILENAME)
    except FileNotFoundError:
        mark = None
    spent, check = verify(ledger, mark, source=str(path))
    text = format_report(ledger, spent=spent, head=check.head)
    if check.behind:
        text += (
            f"\nnote: the high-water mark is {check.behind} entry(ies) behind (a write was "
            "interrupted); the next round brings it up to date"
        )
    return text


def _upgrade_v1(data: object, *, source: str) -> dict[str, Any]:
    """A version-1 ledger (no ids, no chain) as a chained version-2 ledger."""

    def bad(problem: str) -> LedgerError:
        return LedgerError(f"version-1 privacy ledger {source} is invalid: {problem}; {_RESTORE_HINT}")

    if not isinstance(data, dict) or data.get("version") != 1:
        raise bad("it is not a version-1 ledger")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise bad(f"entries is {type(entries).__name__}, expected a list")
    for i, entry in enumerate(entries):
        problem = _entry_problem(entry, keys=ENTRY_KEYS[:-1])
        if problem is not None:
            raise bad(f"entry #{i} {problem}")
    try:
        ledger = new_ledger(
            delta=data.get("delta"), target_epsilon=data.get("target_epsilon"),  # type: ignore[arg-type]
            accountant=data.get("accountant"),  # type: ignore[arg-type]
        )
    except ValueError as err:
        raise bad(str(err)) from None
    prev = chain_hashes(ledger)[-1]
    for entry in entries:
        chained = {**entry, "prev": prev}
        ledger["entries"].append(chained)
        prev = entry_hash(chained)
    spent = _recompute(ledger)
    if entries and not spent >= entries[-1]["epsilon"] * (1 - RECOMPUTE_REL_TOL):
        raise bad(
            f"it records epsilon {entries[-1]['epsilon']:.6g} but its entries add up to "
            f"{spent:.6g}: entries were removed or edited"
        )
    return ledger


def seal(state_dir: str | os.PathLike[str]) -> str:
    """``fedclimb privacy seal``: adopt a ledger that has no high-water mark yet.

    A version-1 ledger (written before the hash chain existed) is rewritten as version
    2, its entries chained in their order; the original is kept as
    ``privacy_ledger.v1.json``. A version-2 ledger whose mark is missing gets a new mark.
    Either way the operator vouches that the file is complete (check it against a
    backup first): sealing cannot tell what was removed before it.

    Returns
    -------
    str
        What was done.

    Raises
    ------
    LedgerError
        If there is no ledger, a mark already exists, or the ledger is invalid.
    """
    directory = Path(state_dir)
    path, mark_path = directory / LEDGER_FILENAME, directory / MARK_FILENAME
    if mark_path.exists():
        raise LedgerError(
            f"{mark_path} exists: the ledger is already sealed (seal only adopts a ledger "
            "that has no high-water mark); `fedclimb privacy report` checks it"
        )
    try:
        data = _read_json(path, "privacy ledger")
    except FileNotFoundError:
        raise LedgerError(f"no privacy ledger at {path}; check --state") from None
    if isinstance(data, dict) and data.get("version") == 1:
        ledger = _upgrade_v1(data, source=str(path))
        backup = directory / "privacy_ledger.v1.json"
        write_text_atomic(backup, path.read_text(encoding="utf-8"), mode=0o600)
        write_ledger_atomic(path, ledger)
        done = f"chained the {len(ledger['entries'])} entries of version-1 ledger {path} (original kept as {backup})"
    else:
        ledger = validate_ledger(data, source=str(path))
        done = f"wrote a high-water mark for {path} ({len(ledger['entries'])} entries)"
    # Chain and recorded epsilons checked; the mark to be written is trusted by the operator.
    unsealed = new_mark(ledger, head=chain_hashes(ledger)[-1], epsilon=0.0)
    spent, check = verify(ledger, unsealed, source=str(path))
    _write_mark(mark_path, new_mark(ledger, head=check.head, epsilon=spent))
    logger.warning("Sealed privacy ledger %s: %s; chain head %s", path, done, check.head)
    return f"{done}; spent eps = {spent:.4f}; chain head {check.head}"


def _privacy_state(directory: Path) -> tuple[list[str], list[str]]:
    """(privacy state, other visible files) in a state directory that has no ledger."""
    names = sorted(p.name for p in directory.iterdir()
                   if not p.name.startswith(".") and (p.name in PRIVACY_STATE_NAMES or not _only_locks(p)))
    state = [n for n in names if n in PRIVACY_STATE_NAMES]
    return state, [n for n in names if n not in state]


def _only_locks(path: Path) -> bool:
    """A folder that holds lock files and nothing else: no trace of past work.

    The client reserves its reply cache slot (``replies/<key>.lock``) before the first
    round opens the ledger, so a brand-new hospital's state directory looks like this.
    """
    if path.is_symlink() or not path.is_dir():
        return False
    children = list(path.iterdir())
    return bool(children) and all(child.is_file() and not child.is_symlink() and child.suffix == ".lock"
                                  and child.stat().st_size == 0 for child in children)


def _force_requested() -> bool:
    return os.environ.get(FORCE_NEW_LEDGER_ENV, "").strip() == "1"


# ---------------------------------------------------------------------------
# The stateful shell
# ---------------------------------------------------------------------------


class PrivacyLedger:
    """The privacy ledger of one hospital's state directory.

    Use :meth:`open`; every :meth:`record` rewrites the ledger, then its high-water
    mark, atomically before returning. One process at a time may write a ledger:
    :meth:`record` refuses if the file changed on disk since this object last read or
    wrote it.
    """

    def __init__(self, path: Path, ledger: dict[str, Any], *, spent: float | None = None) -> None:
        self.path = Path(path)
        self.mark_path = self.path.parent / MARK_FILENAME
        self._ledger = ledger
        self._spent = _recompute(ledger) if spent is None else spent

    @classmethod
    def open(
        cls,
        state_dir: str | os.PathLike[str],
        *,
        delta: float,
        target_epsilon: float,
        accountant: Accountant,
        force_new: bool | None = None,
    ) -> PrivacyLedger:
        """Open and verify the ledger in ``state_dir``, creating it in a fresh directory.

        Parameters
        ----------
        state_dir : path
            The hospital's state directory; must exist.
        delta, target_epsilon, accountant
            The configured privacy settings. ``delta`` and ``accountant`` must equal the
            ledger's; a different ``target_epsilon`` replaces the stored one (logged as
            a warning when raised).
        force_new : bool or None
            Start a new ledger although the directory has no ledger but holds other
            privacy state (its mark, released counts, DRPO history). None reads the
            environment variable ``FEDCLIMB_FORCE_NEW_LEDGER`` (``1`` forces).

        Raises
        ------
        LedgerError
            If the directory does not exist; the ledger is missing beside other privacy
            state (and no force); the file is unreadable, its hash chain is broken, it
            is shorter than or different from its high-water mark, or its recomputed
            epsilon is below a recorded one; or its delta or accountant differ from the
            configured ones.
        """
        directory = Path(state_dir)
        if not directory.is_dir():
            raise LedgerError(
                f"state directory {directory} does not exist; create it or fix --state "
                "(the privacy ledger lives there)"
            )
        path = directory / LEDGER_FILENAME
        mark_path = directory / MARK_FILENAME
        configured = new_ledger(
            delta=delta, target_epsilon=target_epsilon, accountant=accountant
        )
        _remove_stray_temporaries(path)
        _remove_stray_temporaries(mark_path)
        try:
            ledger = read_ledger(path)
        except FileNotFoundError:
            return cls._create(path, configured, _force_requested() if force_new is None else force_new)

        try:
            mark: dict[str, Any] | None = read_mark(mark_path)
        except FileNotFoundError:
            mark = None
        spent, check = verify(ledger, mark, source=str(path))
        opened = cls(path, ledger, spent=spent)
        if mark is None or check.behind:
            # An empty ledger whose mark was never written, or a crash between the
            # ledger write and the mark write: the entries are all there, bring the
            # mark up to them.
            if check.behind:
                logger.warning(
                    "Privacy ledger %s has %d entry(ies) beyond its high-water mark (an "
                    "interrupted write); updating the mark", path, check.behind,
                )
            _write_mark(mark_path, new_mark(ledger, head=check.head, epsilon=spent))
        recorded = ledger["entries"][-1]["epsilon"] if ledger["entries"] else 0.0
        if spent > recorded * (1 + RECOMPUTE_REL_TOL):
            logger.warning(
                "Privacy ledger %s: recomputed epsilon %.6g exceeds the recorded %.6g "
                "(the accounting library changed?); using the larger, recomputed value",
                path, spent, recorded,
            )

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

    @classmethod
    def _create(cls, path: Path, ledger: dict[str, Any], force: bool) -> PrivacyLedger:
        """A new ledger in a directory that has none (refused beside privacy state)."""
        directory = path.parent
        state, other = _privacy_state(directory)
        if state and not force:
            raise LedgerError(
                f"state directory {directory} has no {LEDGER_FILENAME} but holds privacy "
                f"state {state}: the ledger was lost, and a new one would forget the "
                f"privacy already spent. {_RESTORE_HINT[0].upper()}{_RESTORE_HINT[1:]}. Only if "
                f"none exists and you accept that the record of past spending is gone, start "
                f"a new ledger by running once with {FORCE_NEW_LEDGER_ENV}=1"
            )
        if state:
            logger.warning(
                "Starting a NEW privacy ledger in %s beside existing privacy state %s because "
                "%s is set: everything the lost ledger recorded is forgotten",
                directory, state, FORCE_NEW_LEDGER_ENV,
            )
        elif other:
            logger.warning(
                "State directory %s has files %s but no %s: starting a new ledger with "
                "nothing spent. If this hospital trained before, stop and restore "
                "the ledger from a backup",
                directory, other, LEDGER_FILENAME,
            )
        write_ledger_atomic(path, ledger)
        head = chain_hashes(ledger)[-1]
        _write_mark(directory / MARK_FILENAME, new_mark(ledger, head=head, epsilon=0.0))
        logger.info(
            "Created privacy ledger %s (target epsilon %g, delta %g, %s accountant)",
            path, ledger["target_epsilon"], ledger["delta"], ledger["accountant"],
        )
        return cls(path, ledger, spent=0.0)

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
        """Append a mechanism that has run; write the ledger, then its mark, atomically.

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
        head = entry_hash(entry)  # the new chain head (the entry as appended)
        _write_mark(self.mark_path, new_mark(ledger, head=head, epsilon=entry["epsilon"]))
        self._ledger = ledger
        self._spent = entry["epsilon"]
        logger.info(
            "Privacy ledger %s: %s round %s recorded, epsilon %.4f, %d entries, chain head %s",
            self.path, kind, round, self._spent, len(ledger["entries"]), head,
        )
        if self._spent > self.target_epsilon:
            logger.warning(
                "Privacy budget of %s exceeded: epsilon %.4f > target %g after %s round %s",
                self.path, self._spent, self.target_epsilon, kind, round,
            )
        return dict(entry)
