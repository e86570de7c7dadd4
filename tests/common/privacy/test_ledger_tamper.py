"""Tamper evidence of the privacy ledger: hash chain, high-water mark, fresh-ledger refusal.

Each attack edits the files the way an operator or a script could (truncation, a larger
noise multiplier with matching epsilon fields, a deleted ledger beside released counts)
and checks that opening refuses and ``fedclimb privacy report`` exits 1 naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from common.privacy.ledger import (
    FORCE_NEW_LEDGER_ENV,
    LEDGER_FILENAME,
    MARK_FILENAME,
    LedgerError,
    PrivacyLedger,
    read_ledger,
    report,
    verify,
)
from common.privacy.ledger_chain import check_against_mark, entry_hash, genesis_hash, new_mark
from simulation.cli import main

DELTA = 1e-5


def fresh_epsilon(history) -> float:
    acc = RDPAccountant()
    acc.history = [tuple(m) for m in history]
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=DELTA))


def open_ledger(state_dir, **kwargs) -> PrivacyLedger:
    return PrivacyLedger.open(state_dir, delta=DELTA, target_epsilon=8.0, accountant="rdp", **kwargs)


@pytest.fixture()
def state(tmp_path) -> Path:
    """A state directory with four recorded mechanisms."""
    ledger = open_ledger(tmp_path)
    ledger.record(1, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    ledger.record(1, "stats_release", sample_rate=1.0, noise_multiplier=8.0, steps=1)
    ledger.record(2, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    ledger.record(3, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    return tmp_path


def edit(state: Path, change) -> None:
    path = state / LEDGER_FILENAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def report_fails(state: Path, capsys, fragment: str) -> None:
    capsys.readouterr()
    assert main(["privacy", "report", "--state", str(state)]) == 1
    assert fragment in capsys.readouterr().err


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("cut", [1, 3, 4])
def test_cutting_off_the_last_entries_is_refused(state, capsys, cut):
    """A ledger shorter than its high-water mark is refused by open and by report."""
    edit(state, lambda d: d.update(entries=d["entries"][:-cut]))
    message = f"ledger has {4 - cut} entries but the high-water mark records 4: entries were removed"
    with pytest.raises(LedgerError, match=message):
        open_ledger(state)
    report_fails(state, capsys, message)


# --------------------------------------------------------------------------- edits


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_larger_noise_multiplier_with_matching_epsilons_is_refused(state, capsys, index):
    """sigma x50 on one entry, every cumulative epsilon rewritten to match: refused."""

    def forge(data):
        data["entries"][index]["noise_multiplier"] *= 50
        history = []
        for entry in data["entries"]:
            history.append((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]))
            entry["epsilon"] = fresh_epsilon(history)

    edit(state, forge)
    if index < 3:  # the next entry's prev no longer matches
        fragment = f"entry #{index + 1} (round"
        problem = "hash chain broken"
    else:  # the last entry is checked against the mark
        fragment = "entry #3 (round 3, 'dpsgd') does not match the high-water mark"
        problem = fragment
    with pytest.raises(LedgerError, match=re.escape(problem)) as info:
        open_ledger(state)
    assert fragment in str(info.value)
    report_fails(state, capsys, fragment)


@pytest.mark.parametrize(
    "field, value",
    [("round", 9), ("kind", "eval_release"), ("sample_rate", 0.001), ("noise_multiplier", 30.0),
     ("steps", 7), ("epsilon", 0.01), ("time", "2020-01-01T00:00:00+00:00")],
)
def test_an_edit_of_any_field_of_any_entry_is_detected(state, field, value):
    """The chain (or, for the last entry, the mark) covers every field."""
    original = (state / LEDGER_FILENAME).read_text()
    for index in range(4):
        (state / LEDGER_FILENAME).write_text(original)
        edit(state, lambda d: d["entries"][index].update({field: value}))
        with pytest.raises(LedgerError, match=f"entry #{min(index + 1, 3)} "):
            report(state)


def test_removed_entry_in_the_middle_is_refused(state):
    edit(state, lambda d: d["entries"].pop(1))
    with pytest.raises(LedgerError, match=r"entry #1 \(round 2, 'dpsgd'\): hash chain broken"):
        open_ledger(state)


def test_header_delta_edit_breaks_the_chain(state, tmp_path_factory):
    """delta is bound into the first entry's prev (checked before the config comparison)."""
    edit(state, lambda d: d.update(delta=1e-3))
    with pytest.raises(LedgerError, match=r"entry #0 .*hash chain broken \(the ledger's header"):
        open_ledger(state)
    empty = tmp_path_factory.mktemp("empty")
    open_ledger(empty)
    edit(empty, lambda d: d.update(accountant="prv"))
    with pytest.raises(LedgerError, match="the ledger's header does not match the high-water mark"):
        report(empty)


def test_ledger_replaced_by_another_is_refused(state, tmp_path_factory):
    """A longer, valid ledger from elsewhere does not match this directory's mark."""
    other = tmp_path_factory.mktemp("other")
    ledger = open_ledger(other)
    for r in range(6):
        ledger.record(r, "dpsgd", sample_rate=0.02, noise_multiplier=5.0, steps=1)
    shutil.copyfile(other / LEDGER_FILENAME, state / LEDGER_FILENAME)
    with pytest.raises(LedgerError, match="the ledger was replaced by another one"):
        open_ledger(state)


# --------------------------------------------------------------------------- the mark


def test_missing_mark_beside_entries_is_refused(state, capsys):
    (state / MARK_FILENAME).unlink()
    with pytest.raises(LedgerError, match="has 4 entries but no high-water mark"):
        open_ledger(state)
    report_fails(state, capsys, "the mark was deleted")


def test_interrupted_write_leaves_the_mark_behind_and_open_repairs_it(state, caplog, capsys):
    """A crash between the ledger write and the mark write: the entries are all kept."""
    old_mark = (state / MARK_FILENAME).read_text()
    open_ledger(state).record(4, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    (state / MARK_FILENAME).write_text(old_mark)  # as if killed before the mark's rename
    assert main(["privacy", "report", "--state", str(state)]) == 0
    assert "high-water mark is 1 entry(ies) behind" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        ledger = open_ledger(state)
    assert "beyond its high-water mark" in caplog.text
    assert len(ledger.entries()) == 5
    mark = json.loads((state / MARK_FILENAME).read_text())
    assert mark["entries"] == 5 and mark["epsilon"] == pytest.approx(ledger.spent_epsilon())


def test_mark_is_written_after_every_record(state):
    ledger = open_ledger(state)
    mark = json.loads((state / MARK_FILENAME).read_text())
    data = read_ledger(state / LEDGER_FILENAME)
    assert mark["entries"] == 4
    assert mark["last_hash"] == entry_hash(data["entries"][-1])
    assert mark["epsilon"] == pytest.approx(ledger.spent_epsilon(), rel=1e-12)


# --------------------------------------------------------------------------- fresh ledgers


@pytest.mark.parametrize("name", [MARK_FILENAME, "released_domain_counts.json", "drpo"])
def test_missing_ledger_beside_privacy_state_is_refused(state, name, monkeypatch):
    """The ledger is gone but other privacy state is not: no silent fresh budget."""
    monkeypatch.delenv(FORCE_NEW_LEDGER_ENV, raising=False)
    (state / LEDGER_FILENAME).unlink()
    if name != MARK_FILENAME:
        (state / MARK_FILENAME).unlink()
        (state / name).mkdir() if name == "drpo" else (state / name).write_text("{}")
    with pytest.raises(LedgerError, match=f"holds privacy state \\['{name}'\\]") as info:
        open_ledger(state)
    assert f"{FORCE_NEW_LEDGER_ENV}=1" in str(info.value)
    assert not (state / LEDGER_FILENAME).exists()


def test_released_counts_file_name_is_known_privacy_state():
    from client.stats import RELEASE_FILE
    from common.privacy.ledger import PRIVACY_STATE_NAMES

    assert RELEASE_FILE in PRIVACY_STATE_NAMES


def test_forced_new_ledger_starts_empty_and_warns(state, monkeypatch, caplog):
    (state / LEDGER_FILENAME).unlink()
    monkeypatch.setenv(FORCE_NEW_LEDGER_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        ledger = open_ledger(state)
    assert ledger.entries() == [] and ledger.spent_epsilon() == 0.0
    assert "Starting a NEW privacy ledger" in caplog.text
    monkeypatch.delenv(FORCE_NEW_LEDGER_ENV)
    assert open_ledger(state).entries() == []  # the new mark belongs to the new ledger
    (state / LEDGER_FILENAME).unlink()
    assert open_ledger(state, force_new=True).entries() == []


# --------------------------------------------------------------------------- report and seal


def test_report_recomputes_epsilon_from_the_entries(state):
    data = read_ledger(state / LEDGER_FILENAME)
    spent, check = verify(data, json.loads((state / MARK_FILENAME).read_text()), source="x")
    assert spent == pytest.approx(
        fresh_epsilon([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in data["entries"]]),
        rel=1e-9,
    )
    assert check.head == entry_hash(data["entries"][-1]) and check.behind == 0
    assert f"spent eps = {spent:.4f} of target 8" in report(state)


def test_mark_epsilon_above_the_recomputed_one_is_refused():
    """Pure check: the recomputed epsilon may not fall below the mark's."""
    ledger = {"version": 2, "id": "i", "delta": DELTA, "accountant": "rdp", "entries": []}
    mark = new_mark(ledger, head=genesis_hash(ledger), epsilon=1.5)
    with pytest.raises(ValueError, match="add up to epsilon 1.2 but the high-water mark records 1.5"):
        check_against_mark(ledger, mark, spent=1.2)
    assert check_against_mark(ledger, mark, spent=1.5).behind == 0


def test_hashes_are_sha256_of_canonical_json():
    """The documented hash: SHA-256 of JSON with sorted keys and no spaces."""
    entry = {"round": 1, "kind": "dpsgd", "steps": 2, "prev": "ab"}
    text = '{"kind":"dpsgd","prev":"ab","round":1,"steps":2}'
    assert entry_hash(entry) == hashlib.sha256(text.encode()).hexdigest()
    header = {"version": 2, "id": "i", "delta": 1e-05, "accountant": "rdp", "target_epsilon": 3.0}
    text = '{"genesis":{"accountant":"rdp","delta":1e-05,"id":"i","version":2}}'
    assert genesis_hash(header) == hashlib.sha256(text.encode()).hexdigest()


def test_version_1_ledger_is_refused_until_sealed(tmp_path, capsys):
    """An old ledger is not trusted silently: `privacy seal` chains it once, explicitly."""
    history = [(1.1, 0.02, 20), (8.0, 1.0, 1)]
    entries = [
        {"round": 1, "kind": kind, "noise_multiplier": s, "sample_rate": q, "steps": n,
         "epsilon": fresh_epsilon(history[: i + 1]), "time": "2026-01-01T00:00:00+00:00"}
        for i, ((s, q, n), kind) in enumerate(zip(history, ["dpsgd", "stats_release"]))
    ]
    v1 = {"version": 1, "delta": DELTA, "target_epsilon": 8.0, "accountant": "rdp", "entries": entries}
    (tmp_path / LEDGER_FILENAME).write_text(json.dumps(v1))
    with pytest.raises(LedgerError, match="format version 1.*fedclimb privacy seal"):
        open_ledger(tmp_path)
    report_fails(tmp_path, capsys, "format version 1")
    assert main(["privacy", "seal", "--state", str(tmp_path)]) == 0
    assert "chained the 2 entries" in capsys.readouterr().out
    assert json.loads((tmp_path / "privacy_ledger.v1.json").read_text()) == v1
    ledger = open_ledger(tmp_path)
    assert ledger.history() == history
    assert ledger.spent_epsilon() == pytest.approx(fresh_epsilon(history), rel=1e-9)
    assert main(["privacy", "seal", "--state", str(tmp_path)]) == 1  # sealed once only
    assert "already sealed" in capsys.readouterr().err


def test_seal_refuses_a_version_1_ledger_missing_entries(tmp_path, capsys):
    v1 = {"version": 1, "delta": DELTA, "target_epsilon": 8.0, "accountant": "rdp", "entries": [
        {"round": 2, "kind": "dpsgd", "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 20,
         "epsilon": fresh_epsilon([(1.1, 0.02, 40)]), "time": "2026-01-01T00:00:00+00:00"}]}
    (tmp_path / LEDGER_FILENAME).write_text(json.dumps(v1))
    assert main(["privacy", "seal", "--state", str(tmp_path)]) == 1
    assert "entries were removed or edited" in capsys.readouterr().err
    assert not (tmp_path / MARK_FILENAME).exists()
