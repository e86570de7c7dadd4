"""Child processes that never outlive `fedclimb`: stop signals, parent-death signal, tree kill.

- The stop signals and :func:`die_with_parent` come from :mod:`common.stopping` (shared
  with `fedclimb hospital start`). The parent-death signal reaches only direct children:
  Flower's SuperExec starts the simulation process (and it Ray) without passing it on, so :func:`start_guard` also starts a small watcher
  that notes the process groups below this process once a second and, when this process
  dies, kills those groups and every process whose environment holds a marker
  (``FLWR_HOME=<run>/.flwr``, which Flower passes down; Ray's agents rewrite theirs but
  stay in SuperExec's group).
- :func:`stop_tree`: SIGTERM a child, all its descendants and their process groups, then
  SIGKILL what is left. The tree is read from ``/proc`` *before* anything is signalled:
  a process whose parent dies is re-parented to init and no longer looks like ours, but
  keeps its process group (Ray's workers stay in the group of Flower's SuperExec).

Linux only where ``/proc`` and ``prctl`` are needed; elsewhere the tree kill falls back to
the child's process group and no parent-death signal is set.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.stopping import (
    STOP_SIGNALS,
    Terminated,
    die_with_parent,
    raise_if_stop_pending,
    stop_signals_raise,
    uninterruptible,
)

__all__ = ["STOP_SIGNALS", "Terminated", "die_with_parent", "kill_marked", "raise_if_stop_pending", "start_guard",
           "stop_signals_raise", "stop_tree", "tree", "uninterruptible"]


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from /proc."""
    out: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid, pgid = stat.rsplit(")", 1)[1].split()[:3]
        out[int(entry.name)] = (int(ppid), int(pgid), state)
    return out


def tree(root: int, table: dict[int, tuple[int, int, str]] | None = None) -> set[int]:
    """``root`` and every process below it (empty if ``root`` is gone)."""
    table = _table() if table is None else table
    if root not in table:
        return set()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pids: set[int], groups: set[int]) -> bool:
    table = _table()
    return any(
        (pid in pids or pgid in groups) and state != "Z" for pid, (_, pgid, state) in table.items()
    )


def stop_tree(root: int, *, grace: float = 10.0, poll: float = 0.2) -> None:
    """SIGTERM ``root``, its descendants and their process groups; SIGKILL them after ``grace`` s.

    Never signals this process or its own process group. Zombies count as stopped (their
    parent reaps them).
    """
    if not Path("/proc/self/stat").exists():  # no /proc: the child's own group is all we know
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, signal.SIGKILL)
        return
    me, my_group = os.getpid(), os.getpgrp()
    pids: set[int] = set()
    groups: set[int] = set()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        table = _table()
        for pid in {root, *pids}:  # what started since the last look joins the set
            pids |= tree(pid, table)
        pids.discard(me)
        groups |= {table[pid][1] for pid in pids if pid in table} - {my_group}
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pids, groups):
                return
            time.sleep(poll)


def kill_marked(marker: str) -> list[int]:
    """SIGKILL every other process whose environment holds ``marker`` (``NAME=value``); their pids.

    A process whose environment cannot be read (another user's, or a non-dumpable one such
    as Flower's SuperExec) is not seen.
    """
    wanted = marker.encode()
    killed = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0") and int(entry.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def start_guard(marker: str) -> subprocess.Popen | None:
    """A watcher that stops what this process started when it dies (even by SIGKILL).

    It kills the process groups it last saw below this process (not this process's own)
    and runs :func:`kill_marked`.

    Stop it with SIGKILL once the marked processes are stopped. None off Linux.
    """
    preexec = die_with_parent()
    if preexec is None:
        return None
    return subprocess.Popen(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "simulation.processes", marker, str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=preexec,  # noqa: PLW1509 - prctl only
    )


def _guard_main(marker: str, parent: int) -> None:
    """The watcher: note the groups below the parent until it dies, then kill them and the marked."""
    signal.signal(signal.SIGTERM, lambda *_: None)  # the parent-death signal only cuts the sleep short
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the parent is not for the watcher
    spared = {os.getpgrp(), os.getpgid(parent)}
    groups: set[int] = set()
    while os.getppid() == parent:
        table = _table()
        # Only groups alive a moment ago: an old group id may since belong to someone else.
        groups = {table[pid][1] for pid in tree(parent, table) if pid in table} - spared
        time.sleep(1.0)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for _ in range(3):  # a process being started as the parent died joins a moment later
        kill_marked(marker)
        time.sleep(1.0)


if __name__ == "__main__":
    _guard_main(sys.argv[1], int(sys.argv[2]))
