"""Admit the hospitals whose public keys are in ``DIR/hospitals/`` (``NAME.pub``).

:class:`Registrar` compares the folder with the SuperLink's registered nodes and
registers each key the SuperLink does not know yet (``flwr supernode register``'s
request), under the file's stem as the hospital's name. A key the SuperLink already
holds (after a restart with the same database) is only looked up. When a hospital's key
file was replaced, the new key is registered and the old node unregistered. The result,
``NAME -> node id``, goes to ``DIR/registered.json``.

A folder that has not changed since the last look costs one ``stat`` per file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from common.files import write_text_atomic
from server.coordinator import HOSPITAL_NAME, CoordinatorDir
from server.flwr_control import ControlError, NodeRecord, public_key_bytes

log = logging.getLogger(__name__)

__all__ = ["Registrar", "read_registered", "ControlLike"]


class ControlLike(Protocol):
    def list_nodes(self) -> list[NodeRecord]: ...

    def register(self, public_key: bytes, name: str) -> int: ...

    def unregister(self, node_id: int) -> None: ...


def read_registered(d: CoordinatorDir) -> dict[str, int]:
    """``DIR/registered.json`` (empty when missing or unreadable)."""
    try:
        raw = json.loads(d.registered.read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


@dataclass
class Registrar:
    """Keeps the SuperLink's registrations in step with ``DIR/hospitals/*.pub``."""

    d: CoordinatorDir
    control: ControlLike
    say: Callable[[str], None] = print
    _seen: tuple[tuple[str, int, int], ...] | None = None
    _complained: set[tuple[str, int]] = field(default_factory=set)

    def _snapshot(self) -> tuple[tuple[str, int, int], ...]:
        files = []
        for p in sorted(self.d.hospitals.glob("*.pub")):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((p.name, st.st_mtime_ns, st.st_size))
        return tuple(files)

    def sync(self, *, force: bool = False) -> dict[str, int] | None:
        """Register what is new; the NAME -> node id map, or None when nothing changed.

        Raises ControlError when the SuperLink cannot be asked (the next call retries).
        """
        snapshot = self._snapshot()
        if snapshot == self._seen and not force:
            return None
        nodes = self.control.list_nodes()
        by_key = {n.public_key: n for n in nodes if n.status != "unregistered"}
        active = {n.node_id for n in by_key.values()}
        before = read_registered(self.d)
        after: dict[str, int] = {}
        for name_file, mtime, _ in snapshot:
            path = self.d.hospitals / name_file
            name = path.stem
            if not HOSPITAL_NAME.match(name):
                self._complain(name_file, mtime, f"hospitals/{name_file}: skipped, a hospital name is 1-64 letters, "
                                                 "digits, '.', '_' or '-' (rename the file NAME.pub)")
                continue
            try:
                key = public_key_bytes(path.read_bytes())
            except (OSError, ValueError) as exc:
                self._complain(name_file, mtime, f"hospitals/{name_file}: skipped, not a hospital public key "
                                                 f"({exc}); it is retried when the file changes")
                continue
            known = by_key.get(key)
            if known is not None:
                after[name] = known.node_id
                if before.get(name) != known.node_id:
                    self.say(f"hospital {name}: already admitted (node id {known.node_id})")
                continue
            node_id = self.control.register(key, name)
            after[name] = node_id
            active.add(node_id)
            self.say(f"hospital {name}: admitted (node id {node_id})")
            old = before.get(name)
            if old is not None and old != node_id and old in active:
                self.control.unregister(old)
                self.say(f"hospital {name}: its key was replaced; the old key (node id {old}) is no longer admitted")
        for name in sorted(set(before) - set(after)):
            if before[name] not in active:
                continue
            after[name] = before[name]  # still admitted: keep naming it
            self._complain(f"{name}.pub", -1, (
                f"hospital {name}: hospitals/{name}.pub is gone or unreadable, but node {before[name]} stays "
                f"admitted; `FLWR_HOME={self.d.flwr_home} flwr supernode unregister {before[name]}` revokes it"))
        if after != before or not self.d.registered.exists():
            write_text_atomic(self.d.registered, json.dumps(after, indent=2, sort_keys=True) + "\n")
        self._seen = snapshot
        return after

    def _complain(self, name_file: str, mtime: int, message: str) -> None:
        if (name_file, mtime) not in self._complained:
            self._complained.add((name_file, mtime))
            self.say(message)


def try_sync(registrar: Registrar) -> dict[str, int] | None:
    """:meth:`Registrar.sync`, logging (not raising) a SuperLink that does not answer."""
    try:
        return registrar.sync()
    except ControlError as exc:
        log.warning("could not update the registrations yet: %s", exc)
        return None
