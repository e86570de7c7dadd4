"""An in-process Grid: the real ServerApp loop and ClientApp, without Ray or sockets.

``InProcessGrid`` delivers each Message by calling the ClientApp object in this process
with the node's own Context (partition id, run config), and returns the replies — the
same Messages the simulation engine would carry. It is used by the tests (ServerApp and
ClientApp exercised together with Messages) and by ``fedclimb simulate --compare``,
where a dozen short federations would otherwise pay the engine's start-up each time.

Messages can only be built inside a Flower task (``TaskIdentity``); this sets a task
identity for the process, which is what the simulation engine does for its own tasks.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from client.site import in_process_engine

__all__ = ["InProcessGrid", "enter_task"]


def enter_task(run_id: int = 1) -> None:
    """Let this process build Messages (as a task of run ``run_id``)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0


class InProcessGrid(Grid):
    """Delivers Messages to ``num_nodes`` virtual nodes served by ``client_app``."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: Mapping[str, Any] | None = None,
        node_configs: list[dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        enter_task()
        rng = random.Random(seed)
        self.client_app = client_app
        self.node_ids = [rng.getrandbits(63) for _ in range(num_nodes)]
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                         run_config=dict(run_config or {}))
            for nid, cfg in zip(self.node_ids, configs, strict=True)
        }
        self._ids = itertools.count(1)
        self._inbox: dict[str, Message] = {}
        self._run: Any = None

    # Grid API ---------------------------------------------------------------------

    @property
    def run(self) -> Any:  # pragma: no cover - not used by fedclimb
        return self._run

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        self._run = run_id

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            self._inbox[mid] = self._deliver(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._inbox.pop(mid) for mid in message_ids if mid in self._inbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        t0 = time.monotonic()
        replies = list(self.pull_messages(self.push_messages(messages)))
        if timeout is not None and time.monotonic() - t0 > timeout:
            return []
        return replies

    # ------------------------------------------------------------------------------

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node not in self.contexts:
            raise KeyError(f"no node {node} in this in-process grid")
        try:
            with in_process_engine():  # lets the ClientApp honour the run config's sim-root
                return self.client_app(msg, self.contexts[node])
        except Exception as exc:  # the engine turns a ClientApp exception into an error reply
            return Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
