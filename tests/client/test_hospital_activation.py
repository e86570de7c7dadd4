"""`fedclimb hospital start` when the coordinator refuses to activate its SuperNode (Flower error 2004).

Flower prints the same refusal, and exits with status 1, whether the key was never
admitted or the coordinator still counts the hospital online after a crash (up to 60 s).
These tests run the command against fake ``flower-supernode`` and ``flower-superexec``
executables (shell scripts first on its PATH) that print what Flower 1.42 prints. After
a crash the next start waits until the coordinator can have noticed the old SuperNode gone
(client/supernode_presence.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from client import hospital_start, supernode_presence
from client.supernode_presence import Presence
from common.config import HospitalConfig
from conftest import lose_signal

# What flower-supernode prints before exiting with status 1 (flwr_exit with code 305).
REFUSAL = """ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink."""
UNREACHABLE = """ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[Errno 111] Connection refused
The SuperNode could not establish a connection to the SuperLink."""


def _fake_bin(folder: Path, refusals: int, other: str = "") -> Path:
    """A SuperNode refused ``refusals`` times, then running until stopped; or exiting with ``other``."""
    folder.mkdir()
    tries = folder / "tries"
    if other:
        body = f"cat <<'EOF'\n{other}\nEOF\nexit 1\n"
    else:
        body = (f'n=$(cat "{tries}" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "{tries}"\n'
                f"if [ \"$n\" -le {refusals} ]; then\ncat <<'EOF'\n{REFUSAL}\nEOF\nexit 1\nfi\n"
                f'echo "INFO : activated"; touch "{folder / "running"}"\nexec sleep 300\n')
    for name, text in (("flower-supernode", body), ("flower-superexec", "exec sleep 300\n")):
        (folder / name).write_text("#!/bin/sh\n" + text, encoding="utf-8")
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def hospital(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = HospitalConfig(name="st-a", data_root=str(tmp_path), state_dir=str(tmp_path / "state"),
                       coordinator="127.0.0.1:9092", insecure=True)
    monkeypatch.setattr(hospital_start, "_preflight", lambda root, flag: (h, True))
    monkeypatch.setattr(hospital_start, "ACTIVATION_BACKOFF_S", (0.2, 0.4))
    return tmp_path


def _recording(started: list[int]) -> type[hospital_start.Child]:
    """Child, recording the pid of every process group the command starts."""

    class Recorded(hospital_start.Child):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self.pid)

    return Recorded


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_a_refused_activation_is_tried_again_until_the_coordinator_lets_it_in(
        hospital: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A hospital restarted right after a crash: refused twice, then admitted, without a hand restart."""
    fake = _fake_bin(tmp_path / "bin", refusals=2)
    monkeypatch.setattr(hospital_start, "_bin_dir", lambda: fake)
    started: list[int] = []
    monkeypatch.setattr(hospital_start, "Child", _recording(started))

    def stop_when_running() -> None:
        deadline = time.monotonic() + 30
        # Once the third SuperNode is in and its executor started (3 tries x 2 process groups).
        while not ((fake / "running").exists() and len(started) >= 6) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as a service manager stops it

    threading.Thread(target=stop_when_running, daemon=True).start()
    assert hospital_start.start_hospital(hospital, grace=2.0) == 0

    out = capsys.readouterr().out
    assert (fake / "tries").read_text().strip() == "3"
    tries = [line for line in out.splitlines() if "refused to activate this hospital (Flower error 2004)" in line]
    assert len(tries) == 2, out
    assert "it may still see this hospital as online after a restart" in tries[0]
    assert f"send {hospital / 'st-a.pub'} to the coordinator" in tries[0] and "Trying again in" in tries[0]
    assert "stopping (SIGTERM)" in out and "giving up after" not in out
    assert len(started) == 6 and all(_gone(pid) for pid in started)  # every try's pair was stopped
    assert Presence.in_state(hospital / "state", "127.0.0.1:9092").last_alive() is None  # it signed off


def test_a_key_never_admitted_gives_up_with_the_file_to_send(hospital: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    fake = _fake_bin(tmp_path / "bin", refusals=1000)
    monkeypatch.setattr(hospital_start, "_bin_dir", lambda: fake)
    monkeypatch.setattr(hospital_start, "ACTIVATION_RETRY_S", 1.5)

    t0 = time.monotonic()
    assert hospital_start.start_hospital(hospital, grace=2.0) == 1

    assert time.monotonic() - t0 < 30
    out = capsys.readouterr().out
    assert int((fake / "tries").read_text()) >= 3
    last = out.strip().splitlines()[-2]  # then "stopped every process it started"
    assert last.startswith("fedclimb hospital: giving up after ")
    assert "(Flower error 2004)" in last and f"send {hospital / 'st-a.pub'} to the coordinator" in last
    assert Presence.in_state(hospital / "state", "127.0.0.1:9092").last_alive() is None  # it was never online


def test_another_connection_failure_is_not_tried_again(hospital: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fake = _fake_bin(tmp_path / "bin", refusals=0, other=UNREACHABLE)
    monkeypatch.setattr(hospital_start, "_bin_dir", lambda: fake)

    assert hospital_start.start_hospital(hospital, grace=2.0) == 1

    out = capsys.readouterr().out
    assert out.count("starting SuperNode") == 1 and "Flower error 2004" not in out
    assert "supernode exited with status 1: it could not connect to the coordinator" in out


def test_after_a_crash_the_next_start_waits_until_the_coordinator_can_have_noticed(
        hospital: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 of the SuperNode: the record stays, and a start right after waits out Flower's heartbeat."""
    fake = _fake_bin(tmp_path / "bin", refusals=0)
    monkeypatch.setattr(hospital_start, "_bin_dir", lambda: fake)
    monkeypatch.setattr(supernode_presence, "OFFLINE_AFTER_S", 4.0)  # room for a loaded machine between crash and restart
    monkeypatch.setattr(supernode_presence, "SETTLE_S", 0.5)
    monkeypatch.setattr(supernode_presence, "ALIVE_EVERY_S", 0.5)
    started: list[int] = []
    monkeypatch.setattr(hospital_start, "Child", _recording(started))

    def crash_when_running() -> None:
        while not (fake / "running").exists():
            time.sleep(0.05)
        os.kill(started[0], signal.SIGKILL)

    threading.Thread(target=crash_when_running, daemon=True).start()
    assert hospital_start.start_hospital(hospital, grace=2.0) == 1
    presence = Presence.in_state(hospital / "state", "127.0.0.1:9092")
    crashed = presence.last_alive()
    assert crashed is not None and time.time() - crashed < 10
    assert "supernode exited with status -9" in capsys.readouterr().out

    (fake / "running").unlink()

    def stop_when_running() -> None:
        while not (fake / "running").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_running, daemon=True).start()
    t0, expected = time.monotonic(), presence.wait_s()
    assert expected > 0.5
    assert hospital_start.start_hospital(hospital, grace=2.0) == 0

    out = capsys.readouterr().out
    assert "the last SuperNode of st-a stopped without signing off" in out and "waiting " in out
    assert out.index("waiting ") < out.index("starting SuperNode")
    assert time.monotonic() - t0 >= expected - 0.1
    assert presence.last_alive() is None  # stopped cleanly: the next start need not wait


def test_the_wait_after_a_crash(tmp_path: Path) -> None:
    presence = Presence.in_state(tmp_path, "link:9092")
    assert presence.wait_s() == 0.0  # nothing recorded
    presence.restore(1000.0)
    full = supernode_presence.ALIVE_EVERY_S + supernode_presence.OFFLINE_AFTER_S + supernode_presence.SETTLE_S
    assert presence.wait_s(now=1000.0) == full
    assert presence.wait_s(now=1000.0 + full - 20) == 20.0
    assert presence.wait_s(now=1000.0 + full + 1) == 0.0  # long past
    assert presence.wait_s(now=0.0) == full  # a record from the future waits no longer than the whole time
    assert Presence.in_state(tmp_path, "another:9092").wait_s(now=1000.0) == 0.0  # another coordinator
    (tmp_path / "logs" / "supernode.json").write_text("{not json")
    assert presence.wait_s() == 0.0
    presence.restore(None)
    assert not (tmp_path / "logs" / "supernode.json").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_whose_exception_python_dropped_still_stops_it(hospital: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM delivered where Python drops the handler's exception (as in the fork of a child) still stops it."""
    fake = _fake_bin(tmp_path / "bin", refusals=0)
    monkeypatch.setattr(hospital_start, "_bin_dir", lambda: fake)
    started: list[int] = []
    recorded = _recording(started)

    class LosesTheSignal(recorded):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.name == "clientapp":
                lose_signal(signal.SIGTERM)

    monkeypatch.setattr(hospital_start, "Child", LosesTheSignal)
    t0 = time.monotonic()
    assert hospital_start.start_hospital(hospital, grace=2.0) == 0
    assert time.monotonic() - t0 < 30  # not the fake SuperNode's 300 s
    out = capsys.readouterr().out
    assert "stopping (SIGTERM)" in out
    assert len(started) == 2 and all(_gone(pid) for pid in started)
