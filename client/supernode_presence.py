"""When this hospital's SuperNode was last alive, so that a restart after a crash does not rejoin too early.

Flower's SuperLink counts a SuperNode online until 2 heartbeat intervals (2 x 30 s) after
its last heartbeat. A SuperNode that stopped without signing off (kill -9, power loss,
a crashed container) is refused when it comes back within that time (error 2004). Worse,
one that comes back just after that time, before the coordinator's ServerApp has asked
for the round's replies again (every 3 s), is online again when it asks: the SuperLink
then makes no "node unavailable" reply for the instruction the dead SuperNode took, and
the round waits for it until ``federation.round_timeout_s`` (hours by default).

So `fedclimb hospital start` writes ``<state_dir>/logs/supernode.json`` every few seconds
while its SuperNode runs, removes it when the SuperNode stops cleanly (it then signs off),
and on the next start waits until :data:`OFFLINE_AFTER_S` + :data:`SETTLE_S` have passed
since the time recorded there.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from common.files import write_text_atomic

__all__ = ["ALIVE_EVERY_S", "OFFLINE_AFTER_S", "SETTLE_S", "Presence"]

FILE = "supernode.json"
#: Seconds between two records while the SuperNode runs.
ALIVE_EVERY_S = 5.0
#: Flower counts a silent SuperNode online this long after its last heartbeat (2 x 30 s).
OFFLINE_AFTER_S = 60.0
#: Then the coordinator's ServerApp needs one of its 3 s polls to see the node gone.
SETTLE_S = 10.0


@dataclass
class Presence:
    """The record of one hospital's SuperNode (``<state_dir>/logs/supernode.json``)."""

    path: Path
    coordinator: str

    @classmethod
    def in_state(cls, state_dir: Path, coordinator: str) -> Presence:
        return cls(Path(state_dir) / "logs" / FILE, coordinator)

    def last_alive(self) -> float | None:
        """When a SuperNode of this hospital (for this coordinator) was last seen running without signing off."""
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data["coordinator"] == self.coordinator:
                return float(data["alive"])
        return None

    def wait_s(self, now: float | None = None) -> float:
        """Seconds to wait before the SuperNode may connect (0 when nothing is recorded or it is long past)."""
        last = self.last_alive()
        if last is None:
            return 0.0
        now = time.time() if now is None else now
        return max(0.0, min(last + ALIVE_EVERY_S + OFFLINE_AFTER_S + SETTLE_S - now,
                            ALIVE_EVERY_S + OFFLINE_AFTER_S + SETTLE_S))

    def mark(self) -> None:
        """The SuperNode is running now."""
        self.restore(time.time())

    def restore(self, alive: float | None) -> None:
        """Record ``alive`` (None: remove the record, the SuperNode signed off)."""
        if alive is None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"coordinator": self.coordinator, "alive": alive}) + "\n")
