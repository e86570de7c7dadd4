"""SIGTERM or SIGHUP to a running `fedclimb simulate` leaves no process behind (real SuperLink and Ray).

A tiny federation is started as a subprocess in its own session; once Ray runs a
hospital, every process below it is recorded (with its start time, so a reused pid is
not mistaken for a survivor), the signal is sent, and all of them must be gone once the
command has exited 128 + signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulation.processes import tree

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

ROOT = Path(__file__).resolve().parents[2]
# Long enough (several rounds) that the signal lands while Ray runs a hospital; nothing is waited for.
TINY = ["--hospitals", "1", "federation.rounds=20", "train.steps=1", "simulation.synth_scale=0.1", "privacy=off",
        "federation.evaluate=false", "rollout.batch_prompts=2", "rollout.num_rollouts=2"]


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, start time, command name) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19]), name


def _survivors(seen: dict[int, tuple[int, str]]) -> dict[int, str]:
    """The recorded processes still running (same pid and start time, not a zombie)."""
    out = {}
    for pid, (start, name) in seen.items():
        now = _stat(pid)
        if now is not None and now[1] == start and now[0] != "Z":
            out[pid] = name
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_leaves_no_process_behind(tmp_path: Path, cache: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "simulation.cli", "simulate", "--quiet", "--out", str(out), *TINY,
           f"model.cache_dir={cache}"]
    parent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True, text=True)
    seen: dict[int, tuple[int, str]] = {}
    try:
        # Record the whole tree until Ray runs a hospital (the state that used to leak).
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and parent.poll() is None:
            for pid in tree(parent.pid) - {parent.pid}:
                stat = _stat(pid)
                if stat is not None:
                    seen.setdefault(pid, (stat[1], stat[2]))
            if any("ClientAppActor" in name or "raylet" in name for _, name in seen.values()):
                break
            time.sleep(0.5)
        names = sorted({name for _, name in seen.values()})
        assert parent.poll() is None, f"simulate ended before Ray ran: {parent.stderr.read()}"  # type: ignore[union-attr]
        assert any(n.startswith("flower-superlin") for n in names) and "raylet" in names, names
        time.sleep(1.0)  # let the hospital's actor start too
        for pid in tree(parent.pid) - {parent.pid}:
            stat = _stat(pid)
            if stat is not None:
                seen.setdefault(pid, (stat[1], stat[2]))

        os.kill(parent.pid, sig)
        code = parent.wait(timeout=60)
        err = parent.stderr.read()  # type: ignore[union-attr]

        deadline = time.monotonic() + 10  # the command stops its tree before exiting; allow reaping
        while _survivors(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _survivors(seen) == {}, f"left running after {sig.name}: {_survivors(seen)} (of {len(seen)})"
        assert code == 128 + sig, err
        assert f"stopped by {sig.name}" in err
    finally:
        # Stop whatever is still ours, by pid and start time (never by name).
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        for pid in _survivors(seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
