"""The SuperLink's Control API, through the flwr CLI's own client and connection config.

`flwr run` only builds a FAB from an app folder; the coordinator must submit exactly the
FAB it built (whose digest the hospitals approved), so it submits with the same client
and ``$FLWR_HOME/config.toml`` connection the flwr CLI uses. Registration and run status
go the same way (no CLI process per poll). Every call opens and closes its connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ControlError", "Control", "NodeRecord", "RunState", "public_key_bytes"]


class ControlError(RuntimeError):
    """The SuperLink refused a request or could not be reached."""


@dataclass(frozen=True)
class NodeRecord:
    node_id: int
    status: str
    public_key: bytes
    name: str


@dataclass(frozen=True)
class RunState:
    run_id: int
    status: str  # pending, starting, running, finished
    sub_status: str  # completed, failed, stopped (when finished)
    details: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def text(self) -> str:
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


def public_key_bytes(openssh_line: bytes) -> bytes:
    """An OpenSSH public key line -> the PEM bytes the SuperLink stores (ValueError if unusable)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    key = serialization.load_ssh_public_key(openssh_line.strip())
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise ValueError("not an ECDSA key on a NIST curve (make it with `fedclimb hospital init`)")
    return public_key_to_bytes(key)


@contextlib.contextmanager
def _flwr_home(path: Path) -> Iterator[None]:
    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous


class Control:
    """Control API calls on the connection named ``connection`` in ``flwr_home``/config.toml."""

    def __init__(self, flwr_home: Path, connection: str) -> None:
        self.flwr_home = Path(flwr_home)
        self.connection = connection

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        import click
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        with _flwr_home(self.flwr_home):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # "Using SuperLink: ..." on every call
                    conn = read_superlink_connection(self.connection)
                    client = init_http_client_from_connection(conn)
            except click.ClickException as exc:
                raise ControlError(exc.format_message()) from None
            try:
                yield client
            except ControlError:
                raise
            except Exception as exc:  # httpx / Flower errors: one readable line
                raise ControlError(_reason(exc)) from None
            finally:
                client.close()

    def ping(self) -> bool:
        """True when the SuperLink answers (TLS and all)."""
        try:
            self.list_nodes()
        except ControlError:
            return False
        return True

    def list_nodes(self) -> list[NodeRecord]:
        from flwr.proto.control_pb2 import ListNodesRequest

        with self._client() as client:
            res = client.ListNodes(ListNodesRequest())
        return [NodeRecord(int(n.node_id), str(n.status), bytes(n.public_key), str(n.name)) for n in res.nodes_info]

    def register(self, public_key: bytes, name: str) -> int:
        """Admit a hospital's key (PEM bytes); its node id."""
        from flwr.proto.control_pb2 import RegisterNodeRequest

        with self._client() as client:
            res = client.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name))
        if not res.node_id:
            raise ControlError("the SuperLink registered no node")
        return int(res.node_id)

    def unregister(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        with self._client() as client:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def start_run(self, fab: bytes, run_config: Mapping[str, Any]) -> int:
        """Submit ``fab`` (exactly these bytes) with run-config overrides; the run id."""
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        req = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                              override_config=user_config_to_proto(dict(run_config)))
        with self._client() as client:
            res = client.StartRun(req)
        if not res.HasField("run_id"):
            raise ControlError("the SuperLink did not start the run" + (f": {res.note}" if res.HasField("note") else ""))
        return int(res.run_id)

    def run_state(self, run_id: int) -> RunState | None:
        """The run's status, or None when the SuperLink does not know the run."""
        from flwr.proto.control_pb2 import ListRunsRequest

        try:
            with self._client() as client:
                res = client.ListRuns(ListRunsRequest(run_id=run_id))
        except ControlError as exc:
            if "not found" in str(exc).lower():
                return None
            raise
        run = res.run_dict.get(run_id)
        if run is None:
            return None
        return RunState(run_id, str(run.status.status), str(run.status.sub_status), str(run.status.details))

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        with self._client() as client:
            client.StopRun(StopRunRequest(run_id=run_id))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
