"""`fedclimb hospital start DIR`: check everything, then run this hospital's SuperNode in the foreground.

Before anything starts: hospital.yaml, the coordinator address, CA certificate and node
key (unless insecure), the data root (client/hospital_checks.py) and the privacy ledger
must all pass; the first failure is printed with what to do, and nothing runs.

Then two process groups run until SIGINT/SIGTERM (or until one of them exits):

- ``flower-supernode --isolation process``: dials the coordinator over TLS with the node
  key, serves its runtime API on 127.0.0.1 at a free port, passes
  ``hospital-config="DIR/hospital.yaml"`` to the ClientApp;
- ``flower-superexec``: launches one process per message, ``flwr-clientapp`` from a
  private folder first on its PATH, which is client/app_gate.py: an app (FAB) whose
  digest hospital.yaml does not approve is refused before any of its code runs.

A fresh secret shared by the two (``--superexec-auth-secret-file``) keeps any other local
executor from taking this SuperNode's tasks. Both run with the Python environment's
``bin/`` on PATH, Flower's telemetry off and Flower's home in the state folder. Their
output, the ClientApp's per-round lines included, is forwarded to stdout and to
``<state_dir>/logs/hospital.log``.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from client.children import Child, StopRequested, stop_requests_raise
from client.hospital_checks import check_data, check_identity, check_ledger, load_checked
from client.hospital_setup import HOSPITAL_FILE
from common.config import HospitalConfig
from common.fab import installed_app_digest

__all__ = ["INSECURE_WARNING", "start_hospital", "supernode_argv"]

INSECURE_WARNING = ("WARNING: insecure mode: no TLS and no node authentication. Anyone on the network can read "
                    "this hospital's replies and pose as the coordinator. Use it for rehearsals only.")
#: Known SuperNode exit statuses and what the hospital can do about them.
_EXIT_HINTS = {
    305: "the coordinator refused this hospital's key: send {pub} to the coordinator (it goes into its "
         "hospitals/ folder), then start again",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin_dir() -> Path:
    """The folder of this Python's console scripts (a venv's bin/ or the system's)."""
    here = Path(sys.executable).parent
    if (here / "flower-supernode").exists():
        return here
    found = shutil.which("flower-supernode")
    if found is None:
        raise RuntimeError("flower-supernode not found beside this Python or on PATH; reinstall fedclimb")
    return Path(found).parent


def supernode_argv(h: HospitalConfig, config: Path, port: int, secret: Path, *, insecure: bool) -> list[str]:
    """The SuperNode's command line."""
    argv = ["flower-supernode", "--superlink", h.coordinator, "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(port),
            "--node-config", f"hospital-config={_toml_string(str(config))}",
            "--superexec-auth-secret-file", str(secret)]
    if insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", h.ca_cert, "--auth-supernode-private-key", h.node_key]
    return argv


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _gate_wrapper(folder: Path, config: Path, apps_home: Path) -> Path:
    """``flwr-clientapp`` that runs client/app_gate.py with this Python, isolated from cwd and PYTHON*."""
    path = folder / "flwr-clientapp"
    command = [sys.executable, "-I", "-m", "client.app_gate", "--hospital-config", str(config),
               "--apps-home", str(apps_home)]
    path.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(c) for c in command) + ' "$@"\n', encoding="utf-8")
    path.chmod(0o755)
    return path


def _environment(h: HospitalConfig, gate_bin: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(gate_bin), str(_bin_dir()), env.get("PATH", "")])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env["FLWR_HOME"] = str(Path(h.state_dir) / "flwr")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _say(text: str) -> None:
    print(f"fedclimb hospital: {text}", flush=True)


def _preflight(root: Path, insecure_flag: bool) -> tuple[HospitalConfig, bool]:
    """Every check before start; prints what it found. Raises HospitalCheckError."""
    config = root / HOSPITAL_FILE
    h = load_checked(config)
    insecure = insecure_flag or h.insecure
    check_identity(h, insecure=insecure)
    summary = check_data(h)
    _say(f"{h.name}: data {h.data_root}: " + "; ".join(summary.lines()))
    ledger = check_ledger(h)
    if ledger is None:
        _say("privacy: DP is OFF in hospital.yaml (privacy.enabled: false): replies are not differentially private")
    else:
        _say(f"privacy: epsilon spent {ledger.spent_epsilon():.3f} of {ledger.target_epsilon:g} "
             f"(left {max(ledger.remaining(), 0.0):.3f}, delta {ledger.delta:g}); ledger {ledger.path}")
    own = installed_app_digest()
    if not h.approved_apps:
        _say(f"WARNING: approved_apps in {config} is empty: every app the coordinator sends will be refused")
    elif own not in h.approved_apps:
        _say(f"note: this installation's own app {own} is not in approved_apps; only {', '.join(h.approved_apps)} "
             "will run")
    else:
        _say(f"approved apps: {', '.join(h.approved_apps)}")
    return h, insecure


def start_hospital(root: Path, *, insecure: bool = False, grace: float = 10.0) -> int:
    """Check, then run the SuperNode and its executor until a stop signal; the exit status.

    Raises
    ------
    HospitalCheckError
        Before anything started, naming what is wrong.
    """
    root = Path(root).absolute()
    h, insecure = _preflight(root, insecure)
    if insecure:
        _say(INSECURE_WARNING)
    config = root / HOSPITAL_FILE
    state = Path(h.state_dir)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    runtime = Path(tempfile.mkdtemp(prefix="fedclimb-hospital-"))
    children: list[Child] = []
    try:
        secret = runtime / "superexec.secret"
        secret.touch(mode=0o600)
        secret.write_text(secrets.token_hex(32), encoding="utf-8")
        gate = _gate_wrapper(runtime, config, state / "apps")
        env = _environment(h, runtime)
        if shutil.which("flwr-clientapp", path=env["PATH"]) != str(gate):
            raise RuntimeError(f"the app gate {gate} is not the flwr-clientapp found on PATH; not starting")
        port = _free_port()
        lock = threading.Lock()
        with open(state / "logs" / "hospital.log", "a", encoding="utf-8") as log, stop_requests_raise():
            mode = "INSECURE" if insecure else "TLS + node key"
            _say(f"starting SuperNode for {h.name} -> {h.coordinator} ({mode}); runtime port 127.0.0.1:{port}")
            children.append(Child("supernode", supernode_argv(h, config, port, secret, insecure=insecure), env,
                                  out=sys.stdout, log=log, lock=lock))
            children.append(Child("clientapp", ["flower-superexec", "--insecure", "--runtime-api-address",
                                                f"127.0.0.1:{port}", "--superexec-auth-secret-file", str(secret),
                                                "--parent-pid", str(os.getpid())], env,
                                  out=sys.stdout, log=log, lock=lock))
            _say(f"running (SuperNode pid {children[0].pid}, executor pid {children[1].pid}); Ctrl-C stops it")
            try:
                return _wait(children, root / f"{h.name}.pub")
            except (KeyboardInterrupt, StopRequested) as exc:
                _say(f"stopping ({exc or 'SIGINT'})")
                return 0
            finally:
                for child in reversed(children):
                    child.stop(grace)
                _say("stopped every process it started")
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _wait(children: list[Child], public_key: Path) -> int:
    """Until a child exits: report it and return a non-zero status."""
    while True:
        for child in children:
            code = child.poll()
            if code is not None:
                hint = _EXIT_HINTS.get(code, "see the lines above").format(pub=public_key)
                _say(f"{child.name} exited with status {code}: {hint}")
                return 1
        time.sleep(0.5)
