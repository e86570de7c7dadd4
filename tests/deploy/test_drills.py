"""Fault drills of a real deployment: `fedclimb coordinator` and `fedclimb hospital` as processes on loopback.

One coordinator directory (TLS + hospital authentication, a free port) and two admitted
hospitals, alpha and beta, on the synthetic federation; the tiny preset with one local
step per round keeps a round to seconds. The drills run in file order on the same
federation, each with its own run folder:

(a) a stranger's key is refused (its `hospital start` tries again for two minutes, then
    gives up naming the key to send); a 2-round run completes, with a checkpoint per round
    and both privacy ledgers written (round 1: the number of units and the per-domain
    counts released once each, the DP-SGD round, the evaluation);
(b) kill -9 of alpha's SuperNode mid-round: Flower's heartbeat (every 30 s, two missed)
    drops it, the server log names alpha, the round completes with beta, the run
    finishes, and alpha, started again at once (it waits out the heartbeat by itself),
    answers a later round;
(c) kill -9 of the SuperLink mid-round: started again, `coordinator run` resumes after
    the last checkpoint, no completed round is lost, and the redone round is not charged
    to a ledger twice (the hospitals re-send the reply they already paid for);
(d) a hospital whose ledger was corrupted or deleted refuses to start, and says why.

Every process is started in its own session and stopped through its process tree
(simulation.processes.stop_tree: by process id and group) in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulation.launcher import free_port
from simulation.processes import stop_tree, tree

pytestmark = pytest.mark.slow

FEDCLIMB = [sys.executable, "-m", "simulation.cli"]
DOMAINS = "[synth_cxr,synth_derm,synth_ecg,synth_fundus,synth_labs]"
# Small rounds: 1 DP step of 2 prompts x 2 rollouts; evaluation of 6 test records.
RUN = ["train.steps=1", "rollout.batch_prompts=2", "rollout.num_rollouts=2", f"federation.domains={DOMAINS}",
       "federation.connect_timeout_s=120", "federation.round_timeout_s=600"]
NO_EVAL = ["federation.evaluate=false", "federation.evaluate_initial=false"]
ROOT = Path(__file__).resolve().parents[2]
# A hospital's log line when its app gate hands a message to the approved app.
APP_STARTED = "fedclimb hospital: running approved app"


class Proc:
    """A fedclimb command in its own session, output to a file, stopped by its process tree."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(  # noqa: S603 - fixed argv
                [*FEDCLIMB, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def child(self, needle: str) -> int | None:
        """The pid of a running process below this one whose command line holds ``needle``."""
        for pid in sorted(tree(self.pid) - {self.pid}):
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    return pid
        return None

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            stop_tree(self.pid, grace=15.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def wait_for(what: str, check: Callable[[], Any], timeout: float, *procs: Proc) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.output().splitlines()[-30:]) for p in procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def ledger(hospital: Path) -> list[dict[str, Any]]:
    path = hospital / "state" / "privacy_ledger.json"
    return json.loads(path.read_text())["entries"] if path.is_file() else []


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class Federation:
    """The coordinator directory, the hospitals and the processes of the drills."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.coord = root / "coord"
        self.port = free_port()
        self.env = {**os.environ, "FEDCLIMB_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "PYTHONWARNINGS": "ignore"}
        self.procs: list[Proc] = []
        self.hospitals: dict[str, Proc] = {}
        self.superlink: Proc | None = None
        self.starts = 0

    def fedclimb(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FEDCLIMB, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def spawn(self, name: str, *args: str) -> Proc:
        proc = Proc(name, list(args), self.logs, self.env)
        self.procs.append(proc)
        return proc

    def hospital_dir(self, name: str) -> Path:
        return self.root / name

    def init_hospital(self, name: str, data: Path) -> Path:
        """`fedclimb hospital init` (in this process: the setup, not the drill)."""
        from client.hospital_setup import init_hospital

        init_hospital(self.hospital_dir(name), coordinator=f"127.0.0.1:{self.port}",
                      ca=self.coord / "pki" / "ca.crt", data=data, name=name)
        config = self.hospital_dir(name) / "hospital.yaml"
        h = yaml.safe_load(config.read_text())
        # The hospital's own choices for short drills: a budget that lasts all of them and
        # a small evaluation split.
        h["privacy"].update(target_epsilon=50.0, planned_rounds=12)
        h["max_eval_records"] = 6
        config.write_text(yaml.safe_dump(h, sort_keys=False))
        return self.hospital_dir(name) / f"{name}.pub"

    def approve(self, digest: str) -> None:
        """Approve the app the coordinator submits (the same code: its digest is the installed one).

        On a machine where the working tree changes under a running test the digest can
        move between `hospital init` and `coordinator run`; tests/common/test_fab.py checks
        that the same code gives the same digest.
        """
        for name in ("alpha", "beta"):
            config = self.hospital_dir(name) / "hospital.yaml"
            h = yaml.safe_load(config.read_text())
            if digest not in h["approved_apps"]:
                h["approved_apps"].append(digest)
                config.write_text(yaml.safe_dump(h, sort_keys=False))

    def start_superlink(self) -> Proc:
        self.starts += 1
        proc = self.spawn(f"coordinator-start-{self.starts}", "coordinator", "start", str(self.coord))
        wait_for("the SuperLink", lambda: "SuperLink ready" in proc.output(), 120, proc)
        self.superlink = proc
        return proc

    def start_hospital(self, name: str) -> Proc:
        proc = self.spawn(f"{name}-{sum(p.name.startswith(name) for p in self.procs)}", "hospital", "start",
                          str(self.hospital_dir(name)))
        self.hospitals[name] = proc
        return proc

    def run(self, *words: str) -> Proc:
        proc = self.spawn(f"run-{sum(p.name.startswith('run-') for p in self.procs)}", "coordinator", "run",
                          str(self.coord), *RUN, *words)

        def digest() -> str | None:
            m = re.search(r"^app (sha256:[0-9a-f]{64})$", proc.output(), re.M)
            return m.group(1) if m else None

        self.approve(wait_for("the app digest", digest, 120, proc))
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    from server.coordinator import init_coordinator
    from simulation.synth import generate_federation

    f = Federation(tmp_path_factory.mktemp("drills"))
    try:
        generate_federation(f.root / "data", hospitals=2, scale=0.25)
        init_coordinator(f.coord, f"127.0.0.1:{f.port}", [])
        for i, name in enumerate(("alpha", "beta")):
            shutil.copy(f.init_hospital(name, f.root / "data" / f"hospital-{i}"), f.coord / "hospitals")
        f.init_hospital("stranger", f.root / "data" / "hospital-1")  # its key is never sent
        f.start_superlink()
        wait_for("both admitted", lambda: json.loads((f.coord / "registered.json").read_text()).keys()
                 == {"alpha", "beta"} if (f.coord / "registered.json").is_file() else False, 30, f.superlink)
        f.start_hospital("alpha")
        f.start_hospital("beta")
        yield f
    finally:
        f.stop_all()


def run_folder(fed: Federation, run: Proc) -> Path:
    """The run folder `coordinator run` chose (its first line after the app digest names it)."""
    m = wait_for("the run folder", lambda: re.search(r"^(run-\d{3}): ", run.output(), re.M), 60, run)
    return fed.coord / "runs" / m.group(1)


def _round_line(run: Proc, rnd: int) -> str:
    return next((line for line in run.output().splitlines() if line.startswith(f"round {rnd}/")), "")


def test_a_stranger_is_refused_and_a_two_round_run_completes(fed: Federation) -> None:
    stranger = fed.spawn("stranger", "hospital", "start", str(fed.hospital_dir("stranger")))
    run = fed.run("federation.rounds=2", "federation.evaluate_initial=false")

    assert run.wait(timeout=400) == 0, run.output()
    assert stranger.wait(timeout=300) == 1  # tried again for ACTIVATION_RETRY_S, then gave up
    said = stranger.output()
    assert "Failed to activate SuperNode" in said  # Flower's refusal (error 2004, exit code 305)
    assert "refused to activate this hospital (Flower error 2004)" in said and "Trying again in" in said
    assert "giving up after" in said and f"send {fed.hospital_dir('stranger') / 'stranger.pub'}" in said
    assert "No SuperNode found with the given public key" in (fed.coord / "logs" / "superlink.log").read_text()

    out = run.output()
    assert "run-001 complete: 2 round(s)" in out
    for rnd in (1, 2):
        assert _round_line(run, rnd).startswith(f"round {rnd}/2 | hospitals 2/2: alpha, beta"), out
    run_dir = fed.coord / "runs" / "run-001"
    assert sorted(p.name for p in run_dir.glob("round-*")) == ["round-0001", "round-0002"]
    assert (run_dir / "latest").resolve().name == "round-0002"
    for name in ("alpha", "beta"):
        # Round 1 releases the number of units (q and the DP-SGD divisor) and the per-domain
        # counts, each once for the training split; later rounds re-send them.
        assert [(e["round"], e["kind"]) for e in ledger(fed.hospital_dir(name))] == [
            (1, "stats_release"), (1, "dpsgd"), (1, "stats_release"), (1, "eval_release"),
            (2, "dpsgd"), (2, "eval_release")], name
    assert "connected: alpha, beta" in (run_dir / "server.log").read_text()


def test_a_killed_hospital_is_dropped_by_name_and_rejoins(fed: Federation) -> None:
    beta_before = len(ledger(fed.hospital_dir("beta")))
    # Rounds enough to outlast Flower's heartbeat (~60 s) plus the restarted hospital's wait.
    run = fed.run("federation.rounds=6", *NO_EVAL)
    alpha = fed.hospitals["alpha"]
    wait_for("alpha training round 1", lambda: alpha.child("client.app_gate"), 180, run, alpha)
    supernode = alpha.child("flower-supernode")
    assert supernode is not None
    os.kill(supernode, signal.SIGKILL)
    killed_at = time.monotonic()
    assert alpha.wait(timeout=60) == 1  # `hospital start` stops its executor and exits
    again = fed.start_hospital("alpha")  # at once, as a service manager would

    server_log = run_folder(fed, run) / "server.log"
    back: list[float] = []  # when alpha's new SuperNode was first seen

    def seen_back() -> bool:
        if not back and again.child("flower-supernode"):
            back.append(time.monotonic() - killed_at)
        return bool(back)

    def dropped() -> bool:
        seen_back()
        return server_log.is_file() and bool(re.search(r"round 1: dropped the reply of alpha: unreachable",
                                                        server_log.read_text()))

    wait_for("the server to drop alpha", dropped, 150, run)
    detected_s = time.monotonic() - killed_at
    wait_for("alpha's SuperNode again", seen_back, 150, again)
    assert run.wait(timeout=400) == 0, run.output()

    assert "the last SuperNode of alpha stopped without signing off" in again.output()
    # It came back only after the coordinator had let the old one go (had it come back
    # before, round 1 would have waited for the crashed SuperNode's reply until its timeout).
    assert back[0] >= detected_s - 1.0, (back, detected_s)
    back_s = back[0]
    assert _round_line(run, 1).startswith("round 1/6 | hospitals 1/2: beta (alpha: unreachable"), run.output()
    history = events(run_folder(fed, run))
    rejoined = [e["server_round"] for e in history if e["server_round"] > 1 and "alpha" in e["train"]["weights"]]
    assert rejoined, [e["train"] for e in history]
    assert {name for e in history for name in e["train"]["nodes"]} == {"alpha", "beta"}  # never node-<id>
    beta_trained = [e["round"] for e in ledger(fed.hospital_dir("beta"))[beta_before:] if e["kind"] == "dpsgd"]
    assert beta_trained == [1, 2, 3, 4, 5, 6]
    print(f"alpha's death was detected {detected_s:.0f} s after kill -9 (Flower heartbeat); restarted at once, "
          f"its SuperNode connected again after {back_s:.0f} s and answered round(s) {rejoined}")


def test_a_killed_superlink_resumes_without_losing_or_recharging_a_round(fed: Federation) -> None:
    before = {n: len(ledger(fed.hospital_dir(n))) for n in ("alpha", "beta")}
    hospitals = [fed.hospitals[n] for n in ("alpha", "beta")]
    started = [h.output().count(APP_STARTED) for h in hospitals]
    run = fed.run("federation.rounds=2", *NO_EVAL)
    run_dir = run_folder(fed, run)
    wait_for("round 1", lambda: any(e["server_round"] == 1 for e in events(run_dir)), 300, run)
    round1 = (run_dir / "round-0001" / "adapter" / "adapter_model.safetensors").read_bytes()
    # Round 2's instruction is in both hospitals' hands (the app gate passed it on): they train.
    wait_for("round 2 training", lambda: all(h.output().count(APP_STARTED) >= n + 2 for h, n in
                                            zip(hospitals, started, strict=True)), 120, run, *hospitals)

    assert fed.superlink is not None
    superlink = fed.superlink.child("flower-superlink")
    assert superlink is not None
    os.kill(superlink, signal.SIGKILL)
    assert fed.superlink.wait(timeout=60) == 1  # `coordinator start` stops what was left and exits
    run.stop()  # `coordinator run` goes down with it (a crash of its own is the same case)
    # The hospitals finish round 2 and keep their replies (a buffered reply is refused later).
    wait_for("round 2 replies computed", lambda: not any(h.child("client.app_gate") for h in hospitals), 120,
             *hospitals)
    charged = {n: [e["round"] for e in ledger(fed.hospital_dir(n))[before[n]:] if e["kind"] == "dpsgd"]
               for n in ("alpha", "beta")}

    fed.start_superlink()
    again = fed.run("federation.rounds=2", *NO_EVAL)
    assert again.wait(timeout=400) == 0, again.output()

    assert "was interrupted by a restart of the SuperLink" in again.output()
    assert f"{run_dir.name}: resuming after round 1 of 2" in again.output()
    assert [e["server_round"] for e in events(run_dir)] == [1, 2]
    assert (run_dir / "round-0001" / "adapter" / "adapter_model.safetensors").read_bytes() == round1
    assert _round_line(again, 2).startswith("round 2/2 | hospitals 2/2: alpha, beta"), again.output()
    for name in ("alpha", "beta"):
        trained = [e["round"] for e in ledger(fed.hospital_dir(name))[before[name]:] if e["kind"] == "dpsgd"]
        assert trained == [1, 2], (name, trained, "charged before the restart:", charged[name])
        assert "re-sending the train reply of round 2 already computed and paid for" in fed.hospitals[name].output()


@pytest.mark.parametrize("damage", ["corrupted", "deleted"])
def test_a_hospital_with_a_damaged_ledger_refuses_to_start(fed: Federation, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "alpha"
    shutil.copytree(fed.hospital_dir("alpha"), copy, ignore=shutil.ignore_patterns("replies", "apps", "flwr", "logs"))
    ledger_file = copy / "state" / "privacy_ledger.json"
    assert ledger_file.is_file()
    if damage == "corrupted":
        data = json.loads(ledger_file.read_text())
        data["entries"][0]["epsilon"] = data["entries"][0]["epsilon"] / 10  # less spent than recorded
        ledger_file.write_text(json.dumps(data))
    else:
        ledger_file.unlink()

    out = fed.fedclimb("hospital", "start", str(copy), timeout=120)

    assert out.returncode == 1, out.stdout + out.stderr
    said = (out.stdout + out.stderr).lower()
    assert "privacy ledger" in said and "starting supernode" not in said
