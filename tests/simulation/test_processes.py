"""simulation/processes.py with real (tiny) processes: tree kill, parent-death signal, stop signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from simulation.processes import (
    Terminated,
    kill_marked,
    stop_signals_raise,
    stop_tree,
    tree,
    uninterruptible,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, uses prctl")


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# A child that starts a grandchild in a session of its own and an orphan that stays in the
# child's process group (its parent exits at once), then prints their pids and waits.
FAMILY = textwrap.dedent("""
    import os, subprocess, sys, time
    own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    middle = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "stdout=subprocess.DEVNULL); print(p.pid)"],
        stdout=subprocess.PIPE, text=True)
    orphan = int(middle.communicate()[0])
    print(own.pid, orphan, flush=True)
    time.sleep(60)
""")


def test_stop_tree_reaches_other_sessions_and_orphans_in_the_group():
    child = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = [child.pid]
    try:
        own, orphan = (int(x) for x in child.stdout.readline().split())  # type: ignore[union-attr]
        pids += [own, orphan]
        assert own in tree(child.pid) and orphan not in tree(child.pid)  # the orphan now belongs to init
        stop_tree(child.pid, grace=5.0)
        child.wait(timeout=5)
        assert _wait_gone([own, orphan]) == []
    finally:
        _kill(pids)
        child.wait(timeout=5)


def test_stop_tree_never_signals_its_own_process_group():
    """A child left in the caller's group is stopped by pid; the group itself is not signalled."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stop_tree(child.pid, grace=5.0)  # this test process would die here if the group were signalled
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        _kill([child.pid])
        child.wait(timeout=5)


# A parent that starts a child with die_with_parent(), prints its pid, then is killed outright.
ORPHANED = textwrap.dedent("""
    import subprocess, sys, time
    from simulation.processes import die_with_parent
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                             preexec_fn=die_with_parent())
    print(child.pid, flush=True)
    time.sleep(60)
""")


def test_a_child_gets_sigterm_when_its_parent_is_killed_outright():
    parent = subprocess.Popen([sys.executable, "-c", ORPHANED], stdout=subprocess.PIPE, text=True,
                              start_new_session=True, cwd=os.getcwd())
    pids = [parent.pid]
    try:
        pids.append(int(parent.stdout.readline()))  # type: ignore[union-attr]
        assert _running(pids[1])
        os.kill(parent.pid, signal.SIGKILL)  # no finally, no handler can run
        parent.wait(timeout=5)
        assert _wait_gone(pids[1:]) == []
    finally:
        _kill(pids)
        parent.wait(timeout=5)


def test_die_with_parent_is_what_makes_the_child_go():
    """Control: the same child without the preexec_fn outlives its killed parent."""
    script = ORPHANED.replace("preexec_fn=die_with_parent()", "preexec_fn=None")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = [parent.pid]
    try:
        pids.append(int(parent.stdout.readline()))  # type: ignore[union-attr]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=5)
        assert _wait_gone(pids[1:], timeout=1.0) == pids[1:]
    finally:
        _kill(pids)
        parent.wait(timeout=5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signals_unwind_like_ctrl_c_and_the_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    caught = None
    try:
        with stop_signals_raise():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler interrupts this
    except Terminated as exc:
        caught = exc
    assert isinstance(caught, KeyboardInterrupt) and caught.signum == sig
    assert str(caught) == f"stopped by {signal.Signals(sig).name}"
    assert signal.getsignal(sig) == before


# A parent with a guard for MARKER. A marked child starts a marked grandchild and exits (the
# grandchild is then nobody's child of ours: only the marker finds it); an unmarked child
# in a session of its own starts an unmarked grandchild in its group (like Ray's agents,
# whose environment Ray rewrites: only the group finds them).
GUARDED = textwrap.dedent("""
    import os, subprocess, sys, time
    from simulation.processes import start_guard
    marker = sys.argv[1]
    guard = start_guard(marker)
    marked = dict(os.environ, **dict([marker.split("=", 1)]))
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    start = "import subprocess, sys, time; print(subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL).pid, flush=True)"
    middle = subprocess.Popen([sys.executable, "-c", start, *sleeper], env=marked, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    orphan = int(middle.communicate()[0])
    group = subprocess.Popen([sys.executable, "-c", start + "; time.sleep(60)", *sleeper], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    member = int(group.stdout.readline())
    print(guard.pid, orphan, group.pid, member, flush=True)
    time.sleep(60)
""")


def test_the_guard_stops_what_its_parent_started_when_the_parent_is_killed_outright(tmp_path):
    marker = f"FEDCLIMB_GUARD_TEST={tmp_path}"
    parent = subprocess.Popen([sys.executable, "-c", GUARDED, marker], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    control = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    pids = [parent.pid, control.pid]
    try:
        guard, orphan, leader, member = (int(x) for x in parent.stdout.readline().split())  # type: ignore[union-attr]
        pids += [guard, orphan, leader, member]
        assert all(_running(p) for p in pids)
        time.sleep(1.5)  # the guard looks at the tree once a second
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=5)
        assert _wait_gone([guard, orphan, leader, member]) == []
        assert _running(control.pid)  # nothing outside the parent's tree or the marker
    finally:
        _kill(pids)
        parent.wait(timeout=5)
        control.wait(timeout=5)


def test_kill_marked_matches_the_whole_variable_only(tmp_path):
    marker = f"FEDCLIMB_GUARD_TEST={tmp_path}"
    env = dict(os.environ, FEDCLIMB_GUARD_TEST=f"{tmp_path}-other")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        assert other.pid not in kill_marked(marker)
        assert _running(other.pid)
    finally:
        _kill([other.pid])
        other.wait(timeout=5)


def test_a_signal_during_the_stop_is_ignored_and_the_handlers_come_back():
    """While children are being stopped, a second Ctrl-C, SIGTERM or SIGHUP must not cut it short."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with stop_signals_raise():
        with uninterruptible():
            for sig in before:
                os.kill(os.getpid(), sig)
            time.sleep(0.2)  # a handler would have run by now
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    assert {sig: signal.getsignal(sig) for sig in before} == before
