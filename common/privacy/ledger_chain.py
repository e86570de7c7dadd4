"""Tamper evidence for the privacy ledger: a hash chain and a high-water mark.

Every ledger entry carries ``prev``, the SHA-256 of the entry before it (canonical
JSON); the first entry carries the hash of the ledger's header (its ``id``, ``delta``
and ``accountant``). Editing any field of any entry, inserting, reordering or removing
entries therefore breaks the chain at the entry after the change. What the chain alone
cannot show is a change at its end (the last entries cut off, or the last entry
edited): that is what the *high-water mark* is for, a separate small file holding the
ledger's id, entry count, chain head (the hash of the last entry) and recomputed
epsilon, rewritten after every append. A ledger shorter than its mark, or whose entry
at the mark's position does not hash to the mark's head, is refused.

Pure functions only; :mod:`common.privacy.ledger` reads and writes the files. See
docs/privacy.md, "Tamper evidence", for what this does and does not protect against.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HASH_PATTERN",
    "MARK_VERSION",
    "ChainCheck",
    "check_against_mark",
    "chain_hashes",
    "entry_hash",
    "genesis_hash",
    "new_mark",
    "validate_mark",
    "verify_chain",
]

MARK_VERSION = 1
#: A SHA-256 hex digest.
HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
#: The header fields the first entry's ``prev`` binds (``target_epsilon`` may change).
GENESIS_KEYS: tuple[str, ...] = ("version", "id", "delta", "accountant")
#: A recomputed epsilon may fall below a recorded one by at most this (relative).
RECOMPUTE_REL_TOL = 1e-6


def _canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, floats as ``repr`` (exact round trip)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha256(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def genesis_hash(ledger: dict[str, Any]) -> str:
    """The ``prev`` of the first entry: the hash of the ledger's fixed header fields."""
    return _sha256({"genesis": {k: ledger.get(k) for k in GENESIS_KEYS}})


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of one entry (all of its fields, ``prev`` included), canonical JSON."""
    return _sha256(entry)


def chain_hashes(ledger: dict[str, Any]) -> list[str]:
    """``[genesis, hash(entry 0), ..., hash(entry n-1)]``; the last one is the chain head."""
    hashes = [genesis_hash(ledger)]
    hashes += [entry_hash(e) for e in ledger["entries"]]
    return hashes


def _describe(entries: list[dict[str, Any]], i: int) -> str:
    e = entries[i]
    return f"entry #{i} (round {e.get('round')!r}, {e.get('kind')!r})"


def verify_chain(ledger: dict[str, Any]) -> list[str]:
    """Check every entry's ``prev``; return :func:`chain_hashes`.

    Raises
    ------
    ValueError
        Naming the first entry whose ``prev`` does not match, and what that means.
    """
    hashes = chain_hashes(ledger)
    entries = ledger["entries"]
    for i, entry in enumerate(entries):
        if entry["prev"] != hashes[i]:
            if i == 0:
                cause = ("the ledger's header (id, delta or accountant) was changed, or "
                         "entries were removed from its start")
            else:
                cause = (f"entry #{i - 1} was edited, or entries were inserted, removed or "
                         f"reordered before {_describe(entries, i)}")
            raise ValueError(f"{_describe(entries, i)}: hash chain broken ({cause})")
    return hashes


def new_mark(ledger: dict[str, Any], *, head: str, epsilon: float) -> dict[str, Any]:
    """The high-water mark of ``ledger`` whose chain head is ``head``."""
    return {
        "version": MARK_VERSION,
        "ledger_id": ledger["id"],
        "entries": len(ledger["entries"]),
        "last_hash": head,
        "epsilon": float(epsilon),
    }


def validate_mark(mark: object) -> dict[str, Any]:
    """Check a parsed mark's structure; return it. Raises ValueError naming the problem."""
    if not isinstance(mark, dict):
        raise ValueError(f"expected a JSON object, got {type(mark).__name__}")
    if mark.get("version") != MARK_VERSION:
        raise ValueError(f"version is {mark.get('version')!r}, this program reads {MARK_VERSION}")
    if not isinstance(mark.get("ledger_id"), str):
        raise ValueError(f"ledger_id is {mark.get('ledger_id')!r}, expected a string")
    count = mark.get("entries")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        raise ValueError(f"entries is {count!r}, expected an integer >= 0")
    if not (isinstance(mark.get("last_hash"), str) and HASH_PATTERN.fullmatch(mark["last_hash"])):
        raise ValueError(f"last_hash is {mark.get('last_hash')!r}, expected a SHA-256 hex digest")
    eps = mark.get("epsilon")
    if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and eps >= 0):
        raise ValueError(f"epsilon is {eps!r}, expected a number >= 0")
    return mark


@dataclass(frozen=True)
class ChainCheck:
    """Outcome of :func:`check_against_mark` on a ledger that passed.

    Attributes
    ----------
    head : str
        Hash of the last entry (the genesis hash for an empty ledger).
    behind : int
        Entries the ledger has beyond the mark (> 0 only after a crash between the
        ledger write and the mark write; the caller rewrites the mark).
    """

    head: str
    behind: int


def check_against_mark(
    ledger: dict[str, Any], mark: dict[str, Any], *, spent: float
) -> ChainCheck:
    """Verify the chain, the mark, and the recomputed epsilon against both.

    Parameters
    ----------
    ledger : dict
        A structurally valid ledger (version 2).
    mark : dict
        Its high-water mark, structurally valid.
    spent : float
        Epsilon recomputed from all of the ledger's entries.

    Raises
    ------
    ValueError
        The first problem found, in words an operator can act on.
    """
    hashes = verify_chain(ledger)
    entries = ledger["entries"]
    n, m = len(entries), mark["entries"]
    if mark["ledger_id"] != ledger["id"]:
        raise ValueError(
            f"the ledger's id {ledger['id']!r} is not the {mark['ledger_id']!r} its high-water "
            "mark belongs to: the ledger was replaced by another one"
        )
    if n < m:
        raise ValueError(
            f"ledger has {n} entries but the high-water mark records {m}: entries were removed"
        )
    if hashes[m] != mark["last_hash"]:
        where = "the ledger's header" if m == 0 else _describe(entries, m - 1)
        raise ValueError(
            f"{where} does not match the high-water mark's hash: it was edited, or the "
            "ledger was rebuilt"
        )
    if not spent >= mark["epsilon"] * (1 - RECOMPUTE_REL_TOL):
        raise ValueError(
            f"the entries add up to epsilon {spent:.6g} but the high-water mark records "
            f"{mark['epsilon']:.6g}: entries were edited"
        )
    if entries:
        recorded = entries[-1]["epsilon"]
        if not spent >= recorded * (1 - RECOMPUTE_REL_TOL):
            raise ValueError(
                f"{_describe(entries, n - 1)} records cumulative epsilon {recorded:.6g} but "
                f"the entries add up to {spent:.6g}: entries were removed or edited"
            )
    return ChainCheck(head=hashes[-1], behind=n - m)
