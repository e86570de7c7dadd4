"""Crash-safe writes shared by the ledger, released statistics and checkpoints."""

from __future__ import annotations

import stat

import pytest

import common.files as files
from common.files import write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_replaces_whole_file_with_the_requested_permissions(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and _mode(target) == 0o644
    private = tmp_path / "privacy_ledger.json"
    write_text_atomic(private, "{}", mode=0o600)
    assert _mode(private) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "privacy_ledger.json"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
