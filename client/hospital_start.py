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

When the coordinator refuses to activate the SuperNode (Flower error 2004: the key is not
admitted, or the coordinator still counts this hospital online because it was restarted
within about a minute of a crash) both are started again with a growing pause, one line
each time, for up to two minutes; then the command gives up (status 1) naming the public
key to send. While the SuperNode runs, ``<state_dir>/logs/supernode.json`` records it
alive (client/supernode_presence.py); after a crash the next start first waits until the
coordinator can have noticed the old SuperNode gone (at most 75 s), so that it neither is
refused nor leaves a round waiting for the reply the crashed SuperNode took.

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
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from client.children import Child
from client.hospital_checks import check_data, check_identity, check_ledger, load_checked
from client.hospital_setup import HOSPITAL_FILE
from client.supernode_presence import ALIVE_EVERY_S, OFFLINE_AFTER_S, Presence
from common.config import HospitalConfig
from common.fab import installed_app_digest
from common.stopping import Terminated, raise_if_stop_pending, stop_signals_raise

__all__ = ["INSECURE_WARNING", "start_hospital", "supernode_argv"]

INSECURE_WARNING = ("WARNING: insecure mode: no TLS and no node authentication. Anyone on the network can read "
                    "this hospital's replies and pose as the coordinator. Use it for rehearsals only.")
#: The SuperNode's output when the SuperLink refused to activate it (Flower error 2004).
#: Flower exits with status 1 for it, so it is recognised by what it printed.
_ACTIVATION_REFUSED = ("[code: 2004]", "Failed to activate SuperNode")
#: The SuperNode's output when it could not set up its connection for another reason.
_CONNECTION_FAILED = ("Exit Code: 305", "Failed to initialize the connection to the SuperLink")
#: For how long refused activations are tried again. Flower keeps a node that stopped
#: without saying so (kill -9, power loss) online for up to 2 heartbeat intervals (60 s)
#: after its last heartbeat, and refuses to activate it again until then.
ACTIVATION_RETRY_S = 120.0
#: Seconds between tries (the last repeats).
ACTIVATION_BACKOFF_S = (5.0, 10.0, 15.0, 20.0)


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
        lock = threading.Lock()
        with open(state / "logs" / "hospital.log", "a", encoding="utf-8") as log, stop_signals_raise():
            mode = "INSECURE" if insecure else "TLS + node key"

            def launch() -> None:
                """The SuperNode and its executor, on a free runtime port."""
                port = _free_port()
                _say(f"starting SuperNode for {h.name} -> {h.coordinator} ({mode}); runtime port 127.0.0.1:{port}")
                children.append(Child("supernode", supernode_argv(h, config, port, secret, insecure=insecure), env,
                                      out=sys.stdout, log=log, lock=lock))
                children.append(Child("clientapp", ["flower-superexec", "--insecure", "--runtime-api-address",
                                                    f"127.0.0.1:{port}", "--superexec-auth-secret-file", str(secret),
                                                    "--parent-pid", str(os.getpid())], env,
                                      out=sys.stdout, log=log, lock=lock))
                _say(f"running (SuperNode pid {children[0].pid}, executor pid {children[1].pid}); Ctrl-C stops it")

            def stop_all() -> dict[str, int | None]:
                codes = {}
                while children:  # the last started first; removed once stopped
                    codes[children[-1].name] = children[-1].stop(grace)
                    children.pop()
                return codes

            presence = Presence.in_state(state, h.coordinator)
            try:
                _wait_for_the_last_one(h, presence)
                return _run(launch, stop_all, children, root / f"{h.name}.pub", presence)
            except KeyboardInterrupt as exc:  # Ctrl-C, or Terminated (SIGTERM, SIGHUP)
                _say(f"stopping ({signal.Signals(exc.signum).name if isinstance(exc, Terminated) else 'SIGINT'})")
                if stop_all().get("supernode", -signal.SIGKILL) != -signal.SIGKILL:
                    presence.restore(None)  # it signed off: a restart need not wait
                return 0
            finally:
                stop_all()
                _say("stopped every process it started")
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _wait_for_the_last_one(h: HospitalConfig, presence: Presence) -> None:
    """Wait while the coordinator may still count this hospital's crashed SuperNode online."""
    pause = presence.wait_s()
    if pause > 0:
        last = time.strftime("%H:%M:%S", time.localtime(presence.last_alive() or time.time()))
        _say(f"the last SuperNode of {h.name} stopped without signing off (a crash?) after {last}; the coordinator "
             f"counts it online for up to {OFFLINE_AFTER_S:.0f} s and would refuse it: waiting {pause:.0f} s before "
             "connecting")
        _sleep(pause)


def _sleep(seconds: float) -> None:
    """``time.sleep`` in short steps, each ending with :func:`raise_if_stop_pending`."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))
        raise_if_stop_pending()


def _wait(children: list[Child], presence: Presence) -> tuple[Child, int]:
    """Until a child exits: that child and its exit status. Records the SuperNode alive meanwhile."""
    marked = -ALIVE_EVERY_S
    while True:
        if time.monotonic() - marked >= ALIVE_EVERY_S:  # first of all: it may have got online already
            presence.mark()
            marked = time.monotonic()
        raise_if_stop_pending()
        for child in children:
            code = child.poll()
            if code is not None:
                return child, code
        time.sleep(0.5)


def _run(launch: Callable[[], None], stop_all: Callable[[], dict[str, int | None]], children: list[Child],
         public_key: Path, presence: Presence) -> int:
    """Run the processes until one exits; try again while the coordinator refuses to activate this hospital.

    A refused activation (Flower error 2004) means either that the coordinator has not
    admitted this key, or that it still counts this hospital online after a crash; the
    two look the same from here, so the SuperNode is started again with a growing pause
    for up to :data:`ACTIVATION_RETRY_S`. Anything else that exits ends the command
    (status 1) with what the hospital can do.
    """
    refused_since: float | None = None
    tries = 0
    while True:
        before = presence.last_alive()
        launch()
        started = time.monotonic()
        child, code = _wait(children, presence)
        output = child.recent_output() if child.name == "supernode" else ""
        stop_all()
        now = time.monotonic()
        if any(marker in output for marker in _CONNECTION_FAILED):
            presence.restore(before)  # it never got online
        if not any(marker in output for marker in _ACTIVATION_REFUSED):
            _say(f"{child.name} exited with status {code}: {_exit_hint(output, public_key)}")
            return 1
        if refused_since is None or now - started > ACTIVATION_RETRY_S:
            refused_since, tries = started, 0
        waited = now - refused_since
        if waited >= ACTIVATION_RETRY_S:
            _say(f"giving up after {waited:.0f} s: the coordinator still refuses to activate this hospital "
                 f"(Flower error 2004), so it has not admitted this key: send {public_key} to the coordinator "
                 "(it goes into its hospitals/ folder), then start again")
            return 1
        pause = min(ACTIVATION_BACKOFF_S[min(tries, len(ACTIVATION_BACKOFF_S) - 1)], ACTIVATION_RETRY_S - waited)
        tries += 1
        _say(f"the coordinator refused to activate this hospital (Flower error 2004): it may still see this hospital "
             f"as online after a restart (for up to 60 s after a crash), or it has not admitted this key: send "
             f"{public_key} to the coordinator. Trying again in {pause:g} s (giving up {ACTIVATION_RETRY_S:.0f} s "
             "after the first refusal)")
        _sleep(pause)


def _exit_hint(output: str, public_key: Path) -> str:
    """What to do after the SuperNode or the executor exited, from what it printed."""
    if any(marker in output for marker in _CONNECTION_FAILED):
        return ("it could not connect to the coordinator: check `coordinator` and `ca_cert` in hospital.yaml (the "
                "address and CA certificate the coordinator gave), that the coordinator is running and that this "
                f"machine can reach it; if it says the key is unknown, send {public_key} to the coordinator")
    return "see the lines above"
