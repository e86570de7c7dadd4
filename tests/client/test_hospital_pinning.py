"""A hospital runs only the apps it approved: real SuperLink, `fedclimb hospital start`, TLS and node key.

A small Flower app whose digest the hospital approved runs and replies. The same app with
its client code changed (it would write a marker file when imported and when it trains)
is refused: the server gets an error reply naming the digest, the marker never appears,
the hospital's console says how to approve it and its audit log records the refusal.
Every process the test starts is stopped by its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from flwr.cli.build import build_fab_from_disk

from common.fab import fab_digest
from common.pki import new_ca, new_server_certificate

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*")]

BIN = Path(sys.executable).parent
FEDCLIMB = [sys.executable, "-c", "import sys; from simulation.cli import main; sys.exit(main())"]

SERVER = '''\
import json, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(120):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        time.sleep(1)
    msgs = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [{"error": r.error.reason if r.has_error() else None,
            "ok": r.content["config"]["ok"] if r.has_content() else None} for r in replies]
    with open(context.run_config["out"], "w") as f:
        f.write(json.dumps(out))
'''
CLIENT = '''\
{marker}from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    {marker_in_train}return Message(RecordDict({{"config": ConfigRecord({{"ok": 42}})}}), reply_to=msg)
'''
PYPROJECT = '''\
[project]
name = "pinprobe"
version = "1.0.0"
description = "app pinning probe"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "test"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "probe_client:app"

[tool.flwr.app.config]
out = ""
'''


def _app(folder: Path, marker: Path | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    (folder / "probe_server.py").write_text(SERVER, encoding="utf-8")
    write = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n" if marker else ""
    (folder / "probe_client.py").write_text(
        CLIENT.format(marker=write, marker_in_train=write.replace("\n", "\n    ") if marker else ""), encoding="utf-8")
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", FLWR_HOME=str(flwr_home),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_for(path: Path, what: str, timeout: float, procs: list[subprocess.Popen]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text(encoding="utf-8").strip():
            return path.read_text(encoding="utf-8")
        for p in procs:
            assert p.poll() is None, f"{p.args[:3]} exited with {p.returncode} while waiting for {what}"
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A TLS + node-auth SuperLink and one admitted hospital started with `fedclimb hospital start`."""
    from simulation.synth import generate_federation

    base = tmp_path_factory.mktemp("pinning")
    port = _free_port()
    ca = new_ca(base / "ca.crt", base / "ca.key")
    new_server_certificate(ca, base / "server.crt", base / "server.key", ["127.0.0.1", "localhost"])
    data = generate_federation(base / "fed", hospitals=1, seed=0, scale=0.25).hospital_roots[0]
    hospital = base / "h"
    subprocess.run([*FEDCLIMB, "hospital", "init", str(hospital), "--coordinator", f"127.0.0.1:{port}",
                    "--ca", str(base / "ca.crt"), "--data", str(data), "--name", "st-a"],
                   check=True, capture_output=True, text=True, timeout=300)
    approved = _app(base / "approved", None)
    changed = _app(base / "changed", base / "MARKER")
    config = hospital / "hospital.yaml"
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    digest = fab_digest(build_fab_from_disk(approved))
    text = config.read_text(encoding="utf-8").replace(settings["approved_apps"][0], digest)
    config.write_text(text, encoding="utf-8")

    flwr_home = base / "flwr"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "probe"\n[superlink.probe]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{base / "ca.crt"}"\n', encoding="utf-8")
    env = _env(flwr_home)
    procs: list[subprocess.Popen] = []
    link = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(base / "ca.crt"), "--ssl-certfile",
         str(base / "server.crt"), "--ssl-keyfile", str(base / "server.key"), "--enable-supernode-auth",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(base / "state.db"),
         "--disable-runtime-dependency-installation"],
        cwd=base, env=env, stdout=open(base / "superlink.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    procs.append(link)
    log = base / "hospital.log"
    try:
        for _ in range(60):
            done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(hospital / "st-a.pub"), "probe"],
                                  env=env, capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                break
            time.sleep(1)
        assert done.returncode == 0, done.stdout + done.stderr
        start = subprocess.Popen([*FEDCLIMB, "hospital", "start", str(hospital)], cwd=base, env=env,
                                 stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(start)
        yield {"base": base, "env": env, "approved": approved, "changed": changed, "digest": digest,
               "hospital": hospital, "log": log, "start": start, "procs": procs}
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _run(fed: dict[str, object], app: Path, out: Path) -> list[dict[str, object]]:
    env = fed["env"]
    assert isinstance(env, dict)
    subprocess.run([str(BIN / "flwr"), "run", str(app), "probe", "--run-config", f"out='{out}'"], env=env,
                   check=True, capture_output=True, text=True, timeout=120)
    procs = fed["procs"]
    assert isinstance(procs, list)
    return json.loads(_wait_for(out, f"the run of {app.name}", 240, procs))


def test_an_approved_app_runs(federation: dict[str, object]) -> None:
    base = federation["base"]
    assert isinstance(base, Path)
    replies = _run(federation, federation["approved"], base / "approved.json")  # type: ignore[arg-type]
    assert replies == [{"error": None, "ok": 42}]
    log = Path(str(federation["log"])).read_text(encoding="utf-8")
    assert f"running approved app {federation['digest']}" in log
    assert "TLS + node key" in log


def test_an_app_with_changed_client_code_is_refused_before_it_runs(federation: dict[str, object]) -> None:
    base, hospital = federation["base"], federation["hospital"]
    assert isinstance(base, Path) and isinstance(hospital, Path)
    changed = federation["changed"]
    assert isinstance(changed, Path)
    refused = fab_digest(build_fab_from_disk(changed))
    assert refused != federation["digest"]
    replies = _run(federation, changed, base / "changed.json")
    assert len(replies) == 1 and replies[0]["ok"] is None
    assert f"the hospital has not approved app {refused}" in str(replies[0]["error"])
    assert not (base / "MARKER").exists(), "code of the refused app ran"
    log = Path(str(federation["log"])).read_text(encoding="utf-8")
    assert "REFUSED run" in log and f'add "{refused}" to approved_apps in {hospital / "hospital.yaml"}' in log
    audit = [json.loads(line) for line in (hospital / "state" / "audit.jsonl").read_text().splitlines()]
    assert {"kind": "app_refused", "app": refused, "status": "refused"}.items() <= audit[-1].items()
    assert not list((hospital / "state" / "apps").glob(refused.split(":")[1] + "*")), "the refused FAB was unpacked"


def test_sigterm_stops_every_process_it_started(federation: dict[str, object]) -> None:
    start = federation["start"]
    assert isinstance(start, subprocess.Popen)
    log = Path(str(federation["log"]))
    text = log.read_text(encoding="utf-8")
    pids = [int(p) for p in text.split("SuperNode pid ")[1].split(")")[0].replace("executor pid ", "").split(", ")]
    os.kill(start.pid, signal.SIGTERM)
    assert start.wait(timeout=60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert "stopped every process it started" in log.read_text(encoding="utf-8")
