"""Tests of common.privacy.ledger: recomputed epsilons, persistence, atomic writes.

Every expected epsilon comes from a brand-new Opacus accountant fed the ledger's own
(noise_multiplier, sample_rate, steps) history, never from the ledger code.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy.ledger import (
    LEDGER_FILENAME,
    MARK_FILENAME,
    LedgerError,
    PrivacyLedger,
    format_report,
    read_ledger,
    report,
)

DELTA = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[3]


def fresh_epsilon(history, accountant: str) -> float:
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [tuple(m) for m in history]
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=DELTA))


def open_ledger(state_dir, *, target=8.0, accountant="rdp", delta=DELTA) -> PrivacyLedger:
    return PrivacyLedger.open(state_dir, delta=delta, target_epsilon=target, accountant=accountant)


def record_some(ledger: PrivacyLedger) -> None:
    ledger.record(1, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    ledger.record(1, "stats_release", sample_rate=1.0, noise_multiplier=4.0, steps=1)
    ledger.record(2, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    ledger.record(2, "eval_release", sample_rate=1.0, noise_multiplier=6.0, steps=1)


# ---------------------------------------------------------------------------
# Recorded epsilons and the budget
# ---------------------------------------------------------------------------


def test_new_ledger_file_has_the_documented_schema(tmp_path):
    """Opening an empty state directory writes the schema with no entries."""
    open_ledger(tmp_path, target=5.0)
    data = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    ledger_id = data.pop("id")
    assert isinstance(ledger_id, str) and len(ledger_id) == 32
    assert data == {
        "version": 2, "delta": DELTA, "target_epsilon": 5.0, "accountant": "rdp", "entries": []
    }
    mark = json.loads((tmp_path / MARK_FILENAME).read_text())
    assert mark["entries"] == 0 and mark["epsilon"] == 0.0 and mark["ledger_id"] == ledger_id


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_recorded_epsilons_equal_a_fresh_accountant(tmp_path, accountant):
    """Each entry's epsilon is a fresh accountant's epsilon of the history up to it."""
    ledger = open_ledger(tmp_path, accountant=accountant)
    record_some(ledger)
    entries = json.loads((tmp_path / LEDGER_FILENAME).read_text())["entries"]
    assert [e["kind"] for e in entries] == ["dpsgd", "stats_release", "dpsgd", "eval_release"]
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    for i, entry in enumerate(entries):
        assert entry["epsilon"] == pytest.approx(fresh_epsilon(history[: i + 1], accountant), rel=1e-6)
        assert set(entry) == {
            "round", "kind", "sample_rate", "noise_multiplier", "steps", "epsilon", "time", "prev"
        }
        assert entry["time"].endswith("+00:00")
    assert ledger.spent_epsilon() == pytest.approx(fresh_epsilon(history, accountant), rel=1e-6)
    assert ledger.remaining() == pytest.approx(8.0 - ledger.spent_epsilon())


def test_epsilon_if_detects_a_plan_over_budget(tmp_path):
    """A planned round that would overshoot the target is visible before it runs."""
    ledger = open_ledger(tmp_path, target=2.5)
    ledger.record(1, "dpsgd", sample_rate=0.01, noise_multiplier=1.0, steps=1000)  # eps 2.1014
    small, large = [(1.0, 0.01, 10)], [(1.0, 0.01, 1000)]  # 1010 steps: 2.12; 2000: 2.87
    assert ledger.epsilon_if(small) == pytest.approx(
        fresh_epsilon([(1.0, 0.01, 1010)], "rdp"), rel=1e-9
    )
    assert ledger.fits(small)
    assert ledger.epsilon_if(large) > ledger.target_epsilon
    assert not ledger.fits(large)
    assert len(ledger.history()) == 1  # planning records nothing


def test_record_past_the_budget_still_records_and_warns(tmp_path, caplog):
    """A mechanism that already ran is recorded even over budget (refusing would forget it)."""
    ledger = open_ledger(tmp_path, target=1.0)
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        entry = ledger.record(1, "dpsgd", sample_rate=0.01, noise_multiplier=1.0, steps=1000)
    assert entry["epsilon"] > 1.0
    assert ledger.remaining() < 0
    assert "exceeded" in caplog.text


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"sample_rate": 0.0}, "sample_rate 0.0"),
        ({"noise_multiplier": -1.0}, "noise_multiplier -1.0"),
        ({"steps": 0}, "steps 0"),
    ],
)
def test_bad_entries_are_refused_before_writing(tmp_path, kwargs, fragment):
    """An impossible mechanism raises, naming the value, and leaves the file alone."""
    ledger = open_ledger(tmp_path)
    before = (tmp_path / LEDGER_FILENAME).read_bytes()
    args = {"sample_rate": 0.01, "noise_multiplier": 1.0, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        ledger.record(1, "dpsgd", **args)
    with pytest.raises(ValueError, match="'training'"):
        ledger.record(1, "training", sample_rate=0.01, noise_multiplier=1.0, steps=10)
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == before


# ---------------------------------------------------------------------------
# Persistence and refusals
# ---------------------------------------------------------------------------


def test_reopen_after_restart_gives_the_same_state(tmp_path):
    """A new process (new object) sees the same entries, spending and budget."""
    first = open_ledger(tmp_path)
    record_some(first)
    second = open_ledger(tmp_path)
    assert second.as_dict() == first.as_dict()
    assert second.history() == first.history()
    assert second.spent_epsilon() == pytest.approx(first.spent_epsilon(), rel=1e-12)
    second.record(3, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    assert len(open_ledger(tmp_path).entries()) == 5


def test_changed_delta_is_refused(tmp_path):
    """delta is fixed for a hospital's lifetime; the error names both values."""
    open_ledger(tmp_path)
    with pytest.raises(LedgerError, match=r"delta=1e-05 but privacy.delta is 1e-06"):
        open_ledger(tmp_path, delta=1e-6)


def test_changed_accountant_is_refused(tmp_path):
    """The accountant is fixed too."""
    open_ledger(tmp_path, accountant="rdp")
    with pytest.raises(LedgerError, match="'rdp' accountant but privacy.accountant is 'prv'"):
        open_ledger(tmp_path, accountant="prv")


def test_raised_target_is_written_and_logged(tmp_path, caplog):
    """Raising target_epsilon is allowed; it is stored and logged as a warning."""
    record_some(open_ledger(tmp_path, target=4.0))
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        ledger = open_ledger(tmp_path, target=6.0)
    assert ledger.target_epsilon == 6.0
    assert read_ledger(tmp_path / LEDGER_FILENAME)["target_epsilon"] == 6.0
    assert "changed from 4 to 6" in caplog.text


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"version": 2, "delta": 1e-05, "target_eps', "not valid JSON"),
        ("", "not valid JSON"),
        ('{"version": 2, "id": "a", "delta": 1e-05, "target_epsilon": 8.0, "accountant": "rdp", '
         '"entries": [{"round": 1}]}', "entry #0 lacks"),
        ('[1, 2]', "expected a JSON object"),
    ],
)
def test_corrupt_file_is_an_error_and_is_left_alone(tmp_path, content, fragment):
    """An unreadable ledger is never reset: the error says to restore it."""
    path = tmp_path / LEDGER_FILENAME
    path.write_text(content)
    with pytest.raises(LedgerError, match=fragment) as info:
        open_ledger(tmp_path)
    assert "restore the ledger and its mark from a backup" in str(info.value)
    assert path.read_text() == content


def test_removed_entry_is_detected(tmp_path):
    """Deleting an entry by hand breaks the hash chain at the entry after it."""
    record_some(open_ledger(tmp_path))
    path = tmp_path / LEDGER_FILENAME
    data = json.loads(path.read_text())
    del data["entries"][0]
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match=r"entry #0 \(round 1, 'stats_release'\): hash chain broken"):
        open_ledger(tmp_path)


def test_missing_state_directory_is_refused(tmp_path):
    """A mistyped --state does not silently start a fresh ledger."""
    with pytest.raises(LedgerError, match="does not exist"):
        open_ledger(tmp_path / "no-such-dir")


def test_new_ledger_in_a_used_directory_warns(tmp_path, caplog):
    """Files but no ledger may mean a deleted ledger: starting from zero is logged loudly."""
    (tmp_path / "adapter.safetensors").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        open_ledger(tmp_path)
    assert "restore the ledger from a backup" in caplog.text


def test_new_ledger_beside_only_a_lock_file_does_not_warn(tmp_path, caplog):
    """A fresh hospital's round lock (a hidden file) is not evidence of a lost ledger."""
    (tmp_path / ".round.lock").write_text("")
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        open_ledger(tmp_path)
    assert "restore the ledger" not in caplog.text
    assert (tmp_path / LEDGER_FILENAME).exists()


def test_new_ledger_beside_a_reply_slot_reservation_does_not_warn(tmp_path, caplog):
    """Round 1 reserves its reply slot (replies/<key>.lock) before the ledger opens: no false alarm."""
    (tmp_path / "replies").mkdir()
    (tmp_path / "replies" / "abc.lock").write_text("")
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        open_ledger(tmp_path)
    assert "restore the ledger" not in caplog.text


@pytest.mark.parametrize("content", ["a stored reply", "a lock file that is not empty"])
def test_new_ledger_beside_a_stored_reply_still_warns(tmp_path, caplog, content):
    """A reply folder with anything but empty locks is a trace of past rounds."""
    (tmp_path / "replies").mkdir()
    (tmp_path / "replies" / "abc.lock").write_text("" if content == "a stored reply" else "x")
    if content == "a stored reply":
        (tmp_path / "replies" / "abc").mkdir()
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        open_ledger(tmp_path)
    assert "restore the ledger from a backup" in caplog.text


def test_stray_temporary_files_are_removed_on_open(tmp_path):
    """A write killed before its rename leaves a temporary file; the next open deletes it."""
    record_some(open_ledger(tmp_path))
    stray = tmp_path / f".{LEDGER_FILENAME}.abc123.tmp"
    stray.write_text('{"partial": ')
    assert len(open_ledger(tmp_path).entries()) == 4
    assert not stray.exists()


def test_a_second_writer_is_detected(tmp_path):
    """If another process appended meanwhile, record refuses instead of overwriting."""
    first, second = open_ledger(tmp_path), open_ledger(tmp_path)
    first.record(1, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    with pytest.raises(LedgerError, match="changed on disk"):
        second.record(1, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    assert len(open_ledger(tmp_path).entries()) == 1


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def test_format_report_by_hand():
    """The table lists each entry; the summary line has spent, target, delta, remaining."""
    ledger = {
        "version": 2, "id": "x", "delta": 1e-5, "target_epsilon": 8.0, "accountant": "rdp",
        "entries": [
            {"round": 1, "kind": "dpsgd", "sample_rate": 0.01, "noise_multiplier": 1.0,
             "steps": 1000, "epsilon": 2.10137, "time": "2025-01-01T00:00:00+00:00"},
            {"round": 1, "kind": "stats_release", "sample_rate": 1.0, "noise_multiplier": 5.0,
             "steps": 1, "epsilon": 2.5, "time": "2025-01-01T00:01:00+00:00"},
        ],
    }
    text = format_report(ledger, spent=2.5)
    lines = text.splitlines()
    assert lines[-1] == "spent eps = 2.5000 of target 8 at delta = 1e-05 (remaining 5.5000)"
    # The summary is the recomputed value passed in, never the stored field.
    assert format_report(ledger, spent=3.25).splitlines()[-1].startswith("spent eps = 3.2500 ")
    assert lines[3].split() == ["1", "dpsgd", "0.01", "1", "1000", "2.1014", "2025-01-01T00:00:00+00:00"]
    assert lines[4].split()[1:6] == ["stats_release", "1", "5", "1", "2.5000"]
    empty = format_report({**ledger, "entries": []}, spent=0.0)
    assert empty.splitlines()[-1] == "spent eps = 0.0000 of target 8 at delta = 1e-05 (remaining 8.0000)"


def test_report_reads_the_state_directory(tmp_path):
    """report(state_dir) formats the file; a directory without a ledger is an error."""
    record_some(open_ledger(tmp_path))
    entries = json.loads((tmp_path / LEDGER_FILENAME).read_text())["entries"]
    spent = fresh_epsilon([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries], "rdp")
    lines = report(tmp_path).splitlines()
    assert lines[-1].startswith(f"spent eps = {spent:.4f} of target 8 at delta = 1e-05")
    rows = [line.split()[:2] for line in lines[3:-2]]
    assert rows == [[str(e["round"]), e["kind"]] for e in entries]
    assert lines[-2].startswith("4 entries, hash chain and high-water mark verified; chain head ")
    empty = tmp_path / "other"
    empty.mkdir()
    with pytest.raises(LedgerError, match="no privacy ledger"):
        report(empty)


# ---------------------------------------------------------------------------
# Crash safety
# ---------------------------------------------------------------------------

# The host imports the ledger once, then forks writer children and SIGKILLs each at a
# random moment, copying the file after each kill. Phase "record": children append
# entries through PrivacyLedger.record in a tight loop (most time goes to accounting).
# Phase "raw": children rewrite a 2000-entry ledger with write_ledger_atomic in a tight
# loop on a simulated slow disk (fsync sleeps), so most kills land between creating the
# temporary file and renaming it; version j has target_epsilon j.
HOST = textwrap.dedent(
    """
    import os, random, shutil, signal, sys, time
    from common.privacy.ledger import PrivacyLedger, write_ledger_atomic
    root, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    entry = {"round": 0, "kind": "dpsgd", "sample_rate": 0.01, "noise_multiplier": 1.0,
             "steps": 10, "epsilon": 1.0, "time": "2025-01-01T00:00:00+00:00", "prev": "0" * 64}
    big = {"version": 2, "id": "big", "delta": 1e-5, "target_epsilon": 1.0, "accountant": "rdp",
           "entries": [entry] * 2000}

    def write_forever(phase, state, i):
        if phase == "raw":
            real_fsync = os.fsync
            def slow_fsync(fd):  # a slow disk: most of the time is spent mid-write
                real_fsync(fd)
                time.sleep(0.03)
            os.fsync = slow_fsync
            j = 1
            while True:
                write_ledger_atomic(os.path.join(state, "privacy_ledger.json"),
                                    {**big, "target_epsilon": float(j)})
                j += 1
        led = PrivacyLedger.open(state, delta=1e-5, target_epsilon=1e6, accountant="rdp")
        n = 0
        while True:
            if n % 2 == 0:
                led.record(i, "dpsgd", sample_rate=0.01, noise_multiplier=1.0, steps=10)
            else:
                led.record(i, "stats_release", sample_rate=1.0, noise_multiplier=5.0, steps=1)
            n += 1

    for phase, kills in (("record", RECORD_KILLS), ("raw", RAW_KILLS)):
        state, snaps = os.path.join(root, phase), os.path.join(root, phase + "-snaps")
        os.makedirs(state)
        os.makedirs(snaps)
        for i in range(kills):
            pid = os.fork()
            if pid == 0:
                try:
                    write_forever(phase, state, i)
                finally:
                    os._exit(3)  # only reached if the writer failed
            time.sleep(rng.uniform(0.15, 0.5))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                sys.exit(f"{phase} writer {i} exited by itself with status {status}")
            shutil.copyfile(os.path.join(state, "privacy_ledger.json"),
                            os.path.join(snaps, f"{i}.json"))
    """
)


RECORD_KILLS, RAW_KILLS = 4, 3


@pytest.fixture(scope="module")
def killed_writers(tmp_path_factory) -> Path:
    """Run the host once (one interpreter start) for both crash-safety tests."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    root = tmp_path_factory.mktemp("killed")
    host = f"RECORD_KILLS, RAW_KILLS = {RECORD_KILLS}, {RAW_KILLS}\n" + HOST
    result = subprocess.run(
        [sys.executable, "-c", host, str(root), "20240607"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def test_killed_writer_never_leaves_a_broken_ledger(killed_writers):
    """SIGKILL at random moments: the file always parses and is a consistent prefix history."""
    state, snaps, kills = killed_writers / "record", killed_writers / "record-snaps", RECORD_KILLS

    previous: list[dict] = []
    for i in range(kills):
        entries = read_ledger(snaps / f"{i}.json")["entries"]  # parses and validates
        assert entries[: len(previous)] == previous  # nothing lost or rewritten
        assert {e["round"] for e in entries[len(previous):]} <= {i}
        previous = entries
    assert len(previous) > kills  # the writers made progress

    # Every cumulative epsilon matches a fresh accountant (history built by hand: the
    # writers alternate two mechanisms, so a prefix is (a dpsgd runs, b releases)).
    dpsgd = releases = 0
    for entry in previous:
        if entry["kind"] == "dpsgd":
            dpsgd += 1
        else:
            releases += 1
        history = [(1.0, 0.01, 10 * dpsgd)] + ([(5.0, 1.0, releases)] if releases else [])
        assert entry["epsilon"] == pytest.approx(fresh_epsilon(history, "rdp"), rel=1e-9)
    assert open_ledger(state, target=1e6).history() == [
        (e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in previous
    ]


def test_killed_raw_writes_leave_an_old_or_new_file(killed_writers):
    """SIGKILL during slow atomic rewrites: the file is always one whole version."""
    snaps = killed_writers / "raw-snaps"
    for i in range(RAW_KILLS):
        data = read_ledger(snaps / f"{i}.json")
        assert data["target_epsilon"] == int(data["target_epsilon"]) >= 1
        assert len(data["entries"]) == 2000
