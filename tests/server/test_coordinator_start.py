"""`fedclimb coordinator start`: the SuperLink's command line, environment, log and refusals.

The real SuperLink (TLS, authentication, registrations, stop by process group) is run by
tests/deploy/test_drills.py.
"""

from __future__ import annotations

import io
import socket
import sys
from pathlib import Path

import pytest

from server.coordinator import CoordinatorDir, CoordinatorSettings, init_coordinator, load_settings
from server.superlink import StartError, _pump, _single_start, flower_env, serve, superlink_command


@pytest.fixture
def coord(tmp_path: Path) -> tuple[CoordinatorDir, CoordinatorSettings]:
    init_coordinator(tmp_path / "c", "127.0.0.1:9092", [])
    return load_settings(tmp_path / "c")


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_the_superlink_runs_with_tls_authentication_a_database_and_no_runtime_installs(coord) -> None:
    d, s = coord
    cmd = superlink_command(d, s, insecure=False)
    assert Path(cmd[0]).name == "flower-superlink"
    assert _flag(cmd, "--ssl-ca-certfile") == str(d.ca_cert)
    assert _flag(cmd, "--ssl-certfile") == str(d.server_cert) and _flag(cmd, "--ssl-keyfile") == str(d.server_key)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert _flag(cmd, "--database") == str(d.database)
    assert "--disable-runtime-dependency-installation" in cmd
    assert (_flag(cmd, "--host"), _flag(cmd, "--port")) == ("127.0.0.1", "9092")


def test_insecure_drops_tls_and_authentication(coord) -> None:
    d, s = coord
    cmd = superlink_command(d, s, insecure=True)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd and "--ssl-certfile" not in cmd


def test_flower_programs_are_found_in_this_installation(coord) -> None:
    d, _ = coord
    env = flower_env(d)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert (Path(env["PATH"].split(":")[0]) / "flower-superexec").is_file()
    assert env["FLWR_HOME"] == str(d.flwr_home)


def test_the_log_is_plain_text_and_names_hospitals() -> None:
    out = io.BytesIO(b"\x1b[92mINFO \x1b[0m:      [Fleet.ActivateNode] Activated node_id=8134481816133988911\n"
                     b'2026 INFO [uvicorn.access] 127.0.0.1:1 - "POST /v1/fleet/pull-messages HTTP/1.1" 200\n'
                     b"INFO :      Push replies from node_id=123456\n")
    logf, echoed = io.StringIO(), []
    _pump(out, logf, echoed.append, {8134481816133988911: "alpha"})
    assert echoed == ["INFO :      [Fleet.ActivateNode] Activated node_id=8134481816133988911 (alpha)",
                      "INFO :      Push replies from node_id=123456"]  # request lines only in the file
    lines = logf.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b" not in logf.getvalue() and "(alpha)" in lines[0]


def test_a_busy_port_is_refused_with_the_reason(coord) -> None:
    d, s = coord
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        s.address = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(StartError, match="is in use"):
            serve(d, s, insecure=False, say=lambda _: None)


def test_one_start_per_directory(coord) -> None:
    d, _ = coord
    with _single_start(d):
        with pytest.raises(StartError, match="already runs"):
            with _single_start(d):
                pass
    with _single_start(d):  # released with the first
        pass


def test_missing_keys_are_named(coord) -> None:
    d, s = coord
    d.server_key.unlink()
    with pytest.raises(StartError, match="server.key"):
        serve(d, s, insecure=False, say=lambda _: None)
