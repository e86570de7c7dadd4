"""Admitting hospitals from DIR/hospitals/*.pub (server/registration.py) against a fake SuperLink."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.pki import new_node_keypair
from server.coordinator import CoordinatorDir, init_coordinator
from server.flwr_control import NodeRecord, public_key_bytes
from server.registration import Registrar, read_registered


class FakeSuperLink:
    """Registered nodes in memory, like the SuperLink's database."""

    def __init__(self) -> None:
        self.nodes: dict[int, NodeRecord] = {}
        self.calls: list[str] = []
        self._next = 1000

    def list_nodes(self) -> list[NodeRecord]:
        self.calls.append("list")
        return list(self.nodes.values())

    def register(self, public_key: bytes, name: str) -> int:
        self.calls.append(f"register {name}")
        if any(n.public_key == public_key for n in self.nodes.values()):
            raise AssertionError("a key the SuperLink holds was registered again")
        self._next += 1
        self.nodes[self._next] = NodeRecord(self._next, "registered", public_key, name)
        return self._next

    def unregister(self, node_id: int) -> None:
        self.calls.append(f"unregister {node_id}")
        n = self.nodes[node_id]
        self.nodes[node_id] = NodeRecord(n.node_id, "unregistered", n.public_key, n.name)


@pytest.fixture
def coord(tmp_path: Path) -> CoordinatorDir:
    return init_coordinator(tmp_path / "coord", "127.0.0.1:9092", [])[0]


def _admit(d: CoordinatorDir, name: str, tmp_path: Path) -> Path:
    new_node_keypair(tmp_path / f"{name}_key", d.hospitals / f"{name}.pub", name, force=True)
    return d.hospitals / f"{name}.pub"


def test_new_keys_are_registered_under_their_file_names(coord: CoordinatorDir, tmp_path: Path) -> None:
    link, said = FakeSuperLink(), []
    _admit(coord, "alpha", tmp_path)
    _admit(coord, "beta", tmp_path)

    names = Registrar(coord, link, say=said.append).sync()

    assert names == read_registered(coord) == {"alpha": 1001, "beta": 1002}
    assert {n.name for n in link.nodes.values()} == {"alpha", "beta"}
    assert link.nodes[1001].public_key == public_key_bytes((coord.hospitals / "alpha.pub").read_bytes())
    assert said == ["hospital alpha: admitted (node id 1001)", "hospital beta: admitted (node id 1002)"]


def test_a_file_added_later_is_picked_up_and_an_unchanged_folder_costs_nothing(coord: CoordinatorDir,
                                                                            tmp_path: Path) -> None:
    link = FakeSuperLink()
    registrar = Registrar(coord, link, say=lambda _: None)
    _admit(coord, "alpha", tmp_path)
    registrar.sync()
    calls = len(link.calls)
    assert registrar.sync() is None and len(link.calls) == calls  # nothing changed: no request

    _admit(coord, "gamma", tmp_path)
    assert registrar.sync() == {"alpha": 1001, "gamma": 1002}
    assert link.calls[calls:] == ["list", "register gamma"]


def test_keys_the_superlink_already_holds_are_looked_up_not_registered(coord: CoordinatorDir, tmp_path: Path) -> None:
    """After a restart with the same database (or a lost registered.json)."""
    link = FakeSuperLink()
    _admit(coord, "alpha", tmp_path)
    Registrar(coord, link, say=lambda _: None).sync()
    coord.registered.unlink()

    said: list[str] = []
    assert Registrar(coord, link, say=said.append).sync() == {"alpha": 1001}
    assert link.calls.count("register alpha") == 1
    assert said == ["hospital alpha: already admitted (node id 1001)"]


def test_a_replaced_key_is_admitted_and_the_old_one_revoked(coord: CoordinatorDir, tmp_path: Path) -> None:
    link = FakeSuperLink()
    registrar = Registrar(coord, link, say=lambda _: None)
    path = _admit(coord, "alpha", tmp_path)
    registrar.sync()
    stamp = path.stat().st_mtime_ns

    _admit(coord, "alpha", tmp_path)  # the hospital made a new key (hospital init --force)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert registrar.sync() == {"alpha": 1002}
    assert link.nodes[1001].status == "unregistered" and link.calls[-1] == "unregister 1001"


def test_bad_files_are_skipped_once_with_the_reason(coord: CoordinatorDir, tmp_path: Path) -> None:
    link, said = FakeSuperLink(), []
    registrar = Registrar(coord, link, say=said.append)
    (coord.hospitals / "broken.pub").write_text("ssh-rsa AAAA not a key\n")
    (coord.hospitals / "-bad name.pub").write_text("x\n")
    _admit(coord, "alpha", tmp_path)

    assert registrar.sync() == {"alpha": 1001}
    _admit(coord, "beta", tmp_path)
    registrar.sync()

    assert sum("broken.pub: skipped, not a hospital public key" in s for s in said) == 1
    assert sum("-bad name.pub: skipped, a hospital name" in s for s in said) == 1
    assert "register broken" not in link.calls


def test_a_removed_file_keeps_its_name_while_the_node_stays_admitted(coord: CoordinatorDir, tmp_path: Path) -> None:
    link, said = FakeSuperLink(), []
    registrar = Registrar(coord, link, say=said.append)
    path = _admit(coord, "alpha", tmp_path)
    registrar.sync()
    path.unlink()

    assert registrar.sync() == {"alpha": 1001}
    assert json.loads(coord.registered.read_text()) == {"alpha": 1001}
    assert any("flwr supernode unregister 1001" in s for s in said)
    assert "unregister 1001" not in link.calls  # revoking stays the coordinator's decision
