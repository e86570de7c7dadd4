"""The processes `fedclimb hospital start` runs: started in their own process groups, stopped by them.

Each child starts in a new session (its own process group, which the processes it starts
in turn inherit: Flower's SuperExec and the ClientApp processes it launches). On Linux a
child is also asked to receive SIGTERM when `fedclimb` dies, even by SIGKILL
(:func:`common.stopping.die_with_parent`). Stopping signals exactly those groups: SIGTERM,
then SIGKILL after a grace period; nothing is ever signalled by name. Their output is forwarded line by line, with a prefix, to this
process's stdout and to a log file.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from common.stopping import die_with_parent

__all__ = ["Child"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Flower's empty log lines ("INFO :" and a timestamp with nothing after it): not forwarded.
_EMPTY = re.compile(r"(INFO|DEBUG)\s*:?|[\d/]+ [\d:]+:(INFO|DEBUG):")


class Child:
    """One started process group whose output is forwarded with ``prefix``."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], *, out: IO[str],
                 log: IO[str] | None, lock: threading.Lock) -> None:
        self.name = name
        self.proc = subprocess.Popen(  # noqa: S603 - argv built by fedclimb, no shell
            list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, errors="replace", start_new_session=True, preexec_fn=die_with_parent(),
        )
        self._out, self._log, self._lock = out, log, lock
        # The last lines it printed (why it exited, read by :meth:`recent_output`).
        self._recent: collections.deque[str] = collections.deque(maxlen=200)
        self._thread = threading.Thread(target=self._forward, name=f"forward-{name}", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _forward(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = _ANSI.sub("", raw.rstrip("\n"))
            self._recent.append(line)
            if not line.strip() or _EMPTY.fullmatch(line.strip()):
                continue
            text = f"[{self.name}] {line}\n"
            with self._lock:
                self._out.write(text)
                self._out.flush()
                if self._log is not None:
                    self._log.write(time.strftime("%Y-%m-%dT%H:%M:%S ") + text)
                    self._log.flush()

    def poll(self) -> int | None:
        return self.proc.poll()

    def recent_output(self, wait: float = 2.0) -> str:
        """Its last lines of output; once it has exited, waits up to ``wait`` s for the rest."""
        if self.proc.poll() is not None:
            self._thread.join(timeout=wait)
        return "\n".join(self._recent)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` s; its exit status."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not _group_alive(self.proc.pid):
                    self._thread.join(timeout=2)
                    return self.proc.returncode
                time.sleep(0.1)
        self._thread.join(timeout=2)
        return self.proc.poll()


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in group ``pgid`` (Linux /proc; else assume not)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    for entry in proc.glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
