"""`fedclimb coordinator start DIR`: the SuperLink in the foreground, hospitals admitted as they arrive.

The SuperLink runs with TLS and hospital (SuperNode) authentication unless the directory
or the command says ``--insecure``, keeps its state in ``DIR/state.db``, never installs
an app's dependencies at run time, and finds Flower's helper programs (it starts
``flower-superexec`` by name) in this installation's ``bin/``. Its output, colour codes
removed, goes to the terminal and to ``DIR/logs/superlink.log``.

Every few seconds the keys in ``DIR/hospitals/`` are compared with the SuperLink's
registrations (server/registration.py). Ctrl-C, SIGTERM or SIGHUP stop the SuperLink and
everything it started (by process id and process group, nothing else); so does the
SuperLink's own exit, and the kernel sends it SIGTERM if this command is killed outright.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from common.files import write_text_atomic
from server.coordinator import CONNECTION, CoordinatorDir, CoordinatorSettings, insecure_warning, write_flwr_config
from server.flwr_control import Control
from server.registration import Registrar, try_sync
from simulation.processes import (
    Terminated,
    die_with_parent,
    raise_if_stop_pending,
    stop_signals_raise,
    stop_tree,
    tree,
    uninterruptible,
)

__all__ = ["superlink_command", "serve", "StartError", "flower_env", "flower_bin"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
READY_TIMEOUT_S = 90.0


class StartError(RuntimeError):
    """The SuperLink cannot be started (the message says why and what to do)."""


def flower_bin() -> Path:
    """The folder of this installation's programs (flower-superlink, flower-superexec, ...)."""
    return Path(sys.executable).parent


def flower_env(d: CoordinatorDir) -> dict[str, str]:
    """Environment of Flower's processes: this installation first on PATH, FLWR_HOME in DIR."""
    path = os.pathsep.join([str(flower_bin()), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(d.flwr_home), "PYTHONUNBUFFERED": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def superlink_command(d: CoordinatorDir, s: CoordinatorSettings, *, insecure: bool) -> list[str]:
    """The flower-superlink command line for this directory."""
    exe = flower_bin() / "flower-superlink"
    cmd = [str(exe) if exe.is_file() else "flower-superlink"]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(d.ca_cert), "--ssl-certfile", str(d.server_cert),
                "--ssl-keyfile", str(d.server_key), "--enable-supernode-auth"]
    cmd += ["--host", s.listen, "--port", str(s.port), "--database", str(d.database),
            "--disable-runtime-dependency-installation"]
    return cmd


@contextlib.contextmanager
def _single_start(d: CoordinatorDir) -> Iterator[None]:
    """One `coordinator start` per directory (the lock goes with the process, even on SIGKILL)."""
    d.logs.mkdir(parents=True, exist_ok=True)
    lock = open(d.logs / "start.lock", "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            pid = lock.read().strip() or "?"
            raise StartError(f"`fedclimb coordinator start` already runs for {d.root} (pid {pid}); "
                             "stop it first (Ctrl-C in its terminal)") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
    finally:
        lock.close()


def _check_port(s: CoordinatorSettings) -> None:
    family = socket.AF_INET6 if ":" in s.listen else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.listen, s.port))
        except OSError as exc:
            why = "is in use (another SuperLink or program listens there)" if exc.errno == errno.EADDRINUSE else \
                f"cannot be used ({exc.strerror})"
            raise StartError(f"port {s.port} on {s.listen} {why}; stop that program or choose another port with "
                             f"`fedclimb coordinator init {'DIR'} --address HOST:PORT --force`") from None


# Routine lines kept out of the terminal (they stay in logs/superlink.log): every HTTP
# request that succeeded, and the Control API calls this command and `coordinator run` poll with.
_ROUTINE = re.compile(r'\[uvicorn\.access\] .*" (200|204) *$|ControlServicer\.(ListNodes|ListRuns)$')


_NODE_ID = re.compile(r"\b\d{5,20}\b")


def _pump(stream: IO[bytes], logf: IO[str], echo: Callable[[str], None], names: dict[int, str]) -> None:
    """Copy the SuperLink's output to the log file and the terminal.

    Colour codes are removed and every admitted node id gets its hospital's name
    (``node_id=123 (alpha)``); ``names`` is updated as hospitals are admitted.
    """
    for raw in iter(stream.readline, b""):
        line = _ANSI.sub("", raw.decode("utf-8", errors="replace")).rstrip("\n")
        if names:
            line = _NODE_ID.sub(lambda m: f"{m.group(0)} ({names[int(m.group(0))]})" if int(m.group(0)) in names
                                else m.group(0), line)
        stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
        logf.write(f"{stamp} {line}\n")
        logf.flush()
        if not _ROUTINE.search(line):
            echo(line)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _stop_leftovers(seen: dict[int, str | None], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the processes seen below the SuperLink that still run.

    A process counts as the same one only if its start time is unchanged (its id may
    have been reused by someone else's process since).
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        alive = [pid for pid, start in seen.items() if start is not None and _start_time(pid) == start]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in alive if _start_time(pid) == seen[pid]]
        if not alive:
            return


def write_started(d: CoordinatorDir, pid: int) -> None:
    """``DIR/logs/superlink.json``: when the running SuperLink started.

    A run submitted before that cannot still have its ServerApp (it ran under the
    previous SuperLink, stopped with it): `coordinator run` resumes it instead of waiting.
    """
    write_text_atomic(d.started, json.dumps({"pid": pid, "started": time.time()}) + "\n")


def _wait_ready(proc: subprocess.Popen, control: Control, s: CoordinatorSettings) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"the SuperLink exited while starting (code {proc.returncode}); its output is above "
                             "and in logs/superlink.log")
        if control.ping():
            return
        time.sleep(1.0)
    raise StartError(f"the SuperLink did not answer on {s.local_address} within {READY_TIMEOUT_S:.0f} s")


def serve(d: CoordinatorDir, s: CoordinatorSettings, *, insecure: bool, say: Callable[[str], None] = print,
          poll_s: float = 3.0) -> int:
    """Run the SuperLink until it exits or a stop signal arrives; the exit code for the command."""
    insecure = insecure or s.insecure
    if insecure:
        say(insecure_warning())
    if not insecure:
        missing = [p for p in (d.ca_cert, d.server_cert, d.server_key) if not p.is_file()]
        if missing:
            raise StartError(f"{', '.join(map(str, missing))} missing: run `fedclimb coordinator init` first")
    for folder in (d.hospitals, d.runs, d.logs):
        folder.mkdir(parents=True, exist_ok=True)
    with _single_start(d):
        _check_port(s)
        effective = CoordinatorSettings(address=s.address, sans=s.sans, insecure=insecure, listen=s.listen)
        write_flwr_config(d, effective)
        control = Control(d.flwr_home, CONNECTION)
        registrar = Registrar(d, control, say=say)
        cmd = superlink_command(d, s, insecure=insecure)
        say(f"starting the SuperLink on {s.listen}:{s.port} (hospitals dial {s.address}; "
            f"{'NO TLS, NO authentication' if insecure else 'TLS, hospital authentication on'}); "
            f"database {d.database}; log {d.logs / 'superlink.log'}")
        seen: dict[int, str | None] = {}
        names: dict[int, str] = {}
        proc: subprocess.Popen | None = None
        pump: threading.Thread | None = None
        logf = open(d.logs / "superlink.log", "a", encoding="utf-8")  # noqa: SIM115 - closed in finally
        try:
            with stop_signals_raise():
                try:
                    proc = subprocess.Popen(  # noqa: S603 - fixed argv
                        cmd, cwd=d.root, env=flower_env(d), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, start_new_session=True,
                        preexec_fn=die_with_parent(),  # noqa: PLW1509 - prctl only
                    )
                    assert proc.stdout is not None
                    pump = threading.Thread(target=_pump, args=(proc.stdout, logf, say, names), daemon=True)
                    pump.start()
                    _wait_ready(proc, control, s)
                    write_started(d, proc.pid)
                    admitted = try_sync(registrar) or {}
                    names.update({v: k for k, v in admitted.items()})
                    say(f"SuperLink ready; admitted hospitals: {', '.join(sorted(admitted)) or 'none yet'} "
                        f"(drop a hospital's NAME.pub into {d.hospitals} to admit it)")
                    while proc.poll() is None:
                        raise_if_stop_pending()
                        for pid in tree(proc.pid) - {proc.pid}:
                            seen.setdefault(pid, _start_time(pid))
                        changed = try_sync(registrar)
                        if changed is not None:
                            names.update({v: k for k, v in changed.items()})
                        time.sleep(poll_s)
                    say(f"the SuperLink exited (code {proc.returncode}); see {d.logs / 'superlink.log'}")
                    return 1
                except Terminated as exc:
                    say(f"{exc}: stopping the SuperLink")
                    return 0
                except KeyboardInterrupt:
                    say("interrupted: stopping the SuperLink")
                    return 0
        finally:
            with uninterruptible():
                if proc is not None:
                    if proc.poll() is None:
                        stop_tree(proc.pid)
                    _stop_leftovers(seen)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5.0)
                if pump is not None:
                    pump.join(timeout=5.0)
                logf.close()
