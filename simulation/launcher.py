"""Run the Flower app on Flower's simulation engine, and leave nothing running after.

``flwr run .`` would start a *detached* SuperLink that outlives the run. Instead this
starts a private SuperLink (``--simulation``, its own FLWR_HOME and a free loopback port)
in a new process group, submits the run with ``flwr run . <connection> --stream``, and
finally stops every process below them (SuperLink, SuperExec, the simulation process and
Ray's workers, whatever their process group), also on Ctrl-C, SIGTERM, SIGHUP or an error.
Both children also get SIGTERM from the kernel if this process is killed outright
(simulation/processes.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulation.processes import (
    die_with_parent,
    kill_marked,
    raise_if_stop_pending,
    start_guard,
    stop_signals_raise,
    stop_tree,
    uninterruptible,
)

log = logging.getLogger(__name__)

__all__ = ["SimulationLaunch", "launch", "free_port", "app_dir", "toml_string", "sweep"]

CONNECTION = "fedclimb-sim"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_dir() -> Path:
    """The folder holding pyproject.toml with the Flower app sections."""
    here = Path(__file__).resolve().parent.parent
    if not (here / "pyproject.toml").is_file():
        raise RuntimeError(f"{here} has no pyproject.toml: `fedclimb simulate` runs from a source checkout")
    return here


def toml_string(value: str) -> str:
    """A TOML basic string literal (for --run-config values)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH; install flwr[simulation]")
    return found


@dataclass
class SimulationLaunch:
    """What to run and where to log."""

    run_config: Mapping[str, str]
    num_supernodes: int
    cpus_per_client: int
    gpus_per_client: float
    # CPUs Ray may hand out in total (None = what Ray detects).
    total_cpus: int | None
    log_file: Path
    flwr_home: Path
    env: Mapping[str, str]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited early (code {proc.returncode}); see its log")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not open 127.0.0.1:{port} within {timeout:.0f} s")


def sweep(flwr_home: Path) -> list[int]:
    """Kill any process still carrying this run's FLWR_HOME (e.g. a detached Ray worker).

    Linux only (reads /proc); returns the PIDs that were signalled.
    """
    killed = kill_marked(f"FLWR_HOME={flwr_home}")
    if killed:
        log.warning("killed %d leftover simulation process(es): %s", len(killed), killed)
    return killed


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a child and everything below it, then reap it."""
    if proc.poll() is not None:  # exited and reaped: its pid may already belong to someone else
        return
    stop_tree(proc.pid, grace=grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def _start(cmd: list[str], logf: Any, env: Mapping[str, str], **kwargs: Any) -> subprocess.Popen:
    """A child in its own session that gets SIGTERM if this process dies."""
    return subprocess.Popen(  # noqa: S603 - fixed argv
        cmd, stdout=logf, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True,
        preexec_fn=die_with_parent(), **kwargs,  # noqa: PLW1509 - prctl only, no locks taken
    )


@contextlib.contextmanager
def _guarded(flwr_home: Path) -> Iterator[None]:
    """If this process is killed outright, a watcher kills what carries this run's FLWR_HOME."""
    guard = start_guard(f"FLWR_HOME={flwr_home}")
    try:
        yield
    finally:
        if guard is not None:
            guard.kill()
            guard.wait()


@contextlib.contextmanager
def _superlink(spec: SimulationLaunch, port: int) -> Iterator[subprocess.Popen]:
    spec.flwr_home.mkdir(parents=True, exist_ok=True)
    (spec.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    logf = open(spec.log_file, "ab")  # noqa: SIM115 - closed in finally
    cmd = [
        _bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    proc: subprocess.Popen | None = None
    try:
        proc = _start(cmd, logf, spec.env)
        _wait_port(port, 60.0, proc)
        yield proc
    finally:
        with uninterruptible():
            if proc is not None:
                _stop(proc)
            sweep(spec.flwr_home)
            logf.close()


def launch(spec: SimulationLaunch, *, poll: Callable[[], None] | None = None, poll_s: float = 1.0) -> int:
    """Run the app to completion; returns ``flwr run``'s exit code.

    ``poll`` is called about every ``poll_s`` seconds while the run is going (to show
    progress). Every process started here is gone when this returns.
    """
    port = free_port()
    # The SuperLink starts flower-superexec (and that flwr-simulation) by name.
    path = os.pathsep.join([str(Path(sys.executable).parent), spec.env.get("PATH", os.environ.get("PATH", ""))])
    env = {**spec.env, "FLWR_HOME": str(spec.flwr_home), "PATH": path}
    spec = SimulationLaunch(**{**spec.__dict__, "env": env})
    run_cfg = " ".join(f"{k}={v}" for k, v in spec.run_config.items())
    fed_cfg = (
        f"num-supernodes={spec.num_supernodes} "
        f"client-resources-num-cpus={spec.cpus_per_client} "
        f"client-resources-num-gpus={spec.gpus_per_client:g}"
    )
    if spec.total_cpus:
        fed_cfg += f" init-args-num-cpus={spec.total_cpus}"
    with stop_signals_raise(), _guarded(spec.flwr_home), _superlink(spec, port):
        with open(spec.log_file, "ab") as logf:
            cmd = [_bin("flwr"), "run", str(app_dir()), CONNECTION, "--run-config", run_cfg,
                   "--federation-config", fed_cfg, "--stream"]
            proc = _start(cmd, logf, env, cwd=app_dir())
            try:
                while proc.poll() is None:
                    raise_if_stop_pending()
                    if poll:
                        poll()
                    time.sleep(poll_s)
                if poll:
                    poll()
            finally:
                with uninterruptible():
                    _stop(proc)
            return int(proc.returncode or 0)
