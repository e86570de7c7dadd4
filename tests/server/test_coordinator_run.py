"""`fedclimb coordinator run`: configuration, run folders, submission, progress and resume.

The SuperLink is a fake that plays a run's life (events, checkpoints, status) so each
path of the command is checked in well under a second; tests/deploy/ runs the real one.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

import server.coordinator_run as cr
from common.config import ConfigError, load_config
from server.coordinator import CoordinatorDir, init_coordinator
from server.flwr_control import ControlError, NodeRecord, RunState
from server.progress import format_round
from simulation.cli import main as cli_main

NAMES = {"alpha": 11, "beta": 22}


def _event(rnd: int, **train: Any) -> dict[str, Any]:
    nodes = {n: {"dp.epsilon": 1.5 * rnd} for n in ("alpha", "beta")}
    return {"server_round": rnd, "train": {"nodes": nodes, "rejected": {}, "aggregated": True, **train} if rnd else {},
            "evaluate": {"domains": {"cxr": {"records": 10.0, "balanced_accuracy": 0.5 + rnd / 10,
                                             "mean_reward": 0.25}}},
            "bytes_sent": 2_000_000, "bytes_received": 500_000, "seconds": 12.0}


class FakeSuperLink:
    """Plays a submitted run: one round per status request, then ``final``."""

    def __init__(self, d: CoordinatorDir, final: str = "completed", details: str = "") -> None:
        self.d, self.final, self.details = d, final, details
        self.submitted: list[tuple[bytes, dict[str, Any]]] = []
        self.runs: dict[int, list[str]] = {}
        self.polls = 0
        self.run_dir: Path | None = None
        self.rounds = 0
        self.start_round = 0
        self.down = False
        self.frozen = False
        self.train: dict[int, dict[str, Any]] = {}  # round -> its train report's changes

    # the Control API the command uses
    def start_run(self, fab: bytes, run_config: dict[str, Any]) -> int:
        self.submitted.append((fab, run_config))
        words = dict(w.split("=", 1) for w in shlex.split(run_config["overrides"]))
        self.run_dir = self.d.root / json.loads(words["server.run_dir"])
        self.rounds = json.loads(words["federation.rounds"])
        latest = self.run_dir / "latest"
        self.start_round = int(latest.resolve().name.split("-")[1]) + 1 if latest.exists() else 0
        run_id = 500 + len(self.submitted)
        self.runs[run_id] = ["running"]
        self.polls = 0
        self.frozen = False
        return run_id

    def run_state(self, run_id: int) -> RunState | None:
        if self.down:
            raise ControlError("connection refused")
        if run_id not in self.runs:
            return None
        if self.runs[run_id][-1] != "running":
            status, sub = self.runs[run_id][-1].split(":")
            return RunState(run_id, status, sub, self.details)
        if self.frozen:  # its ServerApp is gone, the database still says running
            return RunState(run_id, "running", "", "")
        rnd = self.start_round + self.polls
        self.polls += 1
        if rnd <= self.rounds:
            assert self.run_dir is not None
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "events.jsonl", "a") as f:
                f.write(json.dumps(_event(rnd, **self.train.get(rnd, {}))) + "\n")
            (self.run_dir / f"round-{rnd:04d}").mkdir(exist_ok=True)
            (self.run_dir / "latest.tmp").symlink_to(f"round-{rnd:04d}")
            (self.run_dir / "latest.tmp").replace(self.run_dir / "latest")
            return RunState(run_id, "running", "", "")
        self.runs[run_id].append(f"finished:{self.final}")
        return RunState(run_id, "finished", self.final, self.details)

    def stop_run(self, run_id: int) -> None:
        self.runs[run_id].append("finished:stopped")

    def list_nodes(self) -> list[NodeRecord]:
        return [NodeRecord(i, "online", b"", n) for n, i in NAMES.items()]


@pytest.fixture
def coord(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CoordinatorDir:
    d, _ = init_coordinator(tmp_path / "coord", "127.0.0.1:9092", [])
    d.registered.write_text(json.dumps(NAMES))
    monkeypatch.setattr(cr, "POLL_S", 0.0)
    monkeypatch.setattr(cr, "STATUS_POLL_S", 0.0)
    monkeypatch.setattr(cr, "UNREACHABLE_GIVE_UP_S", 0.0)
    monkeypatch.setattr(cr, "build_app", lambda out: (b"FAB-BYTES", "sha256:" + "ab" * 32))
    return d


def _use(monkeypatch: pytest.MonkeyPatch, link: FakeSuperLink) -> None:
    monkeypatch.setattr(cr, "Control", lambda *a, **k: link)


def _words(link: FakeSuperLink, i: int = -1) -> dict[str, Any]:
    words = shlex.split(link.submitted[i][1]["overrides"])
    return {k: json.loads(v) for k, v in (w.split("=", 1) for w in words)}


def test_a_run_completes_with_one_line_per_round(coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    link = FakeSuperLink(coord)
    _use(monkeypatch, link)

    code = cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "app sha256:" + "ab" * 32
    rounds = [line for line in out if line.startswith("round ")]
    assert len(rounds) == 3 and rounds[0].startswith("round 0 (before training)")
    assert rounds[1].startswith("round 1/2 | hospitals 2/2: alpha, beta | test bal-acc 0.600")
    assert "eps alpha 1.50, beta 1.50" in rounds[1] and "sent 2.00 MB recv 0.50 MB" in rounds[1]
    assert out[-1].startswith("run-001 complete: 2 round(s)")
    words = _words(link)
    assert words["server.node_names"] == NAMES and words["federation.min_hospitals"] == 2
    assert words["server.run_dir"] == "runs/run-001"
    assert words["server.resume"] is True  # a fresh folder has no checkpoint; a resume then sends the same words
    assert link.submitted[0][0] == b"FAB-BYTES"
    assert link.submitted[0][1]["config-file"] == "" and link.submitted[0][1]["sim-root"] == ""
    state = json.loads((coord.runs / "run-001" / "coordinator.json").read_text())
    assert state["complete"] is True and state["submissions"][0]["fab"] == "sha256:" + "ab" * 32

    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 0  # the next one is new
    assert _words(link)["server.run_dir"] == "runs/run-002"


def test_the_words_resolve_to_the_same_configuration_everywhere(coord: CoordinatorDir,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ServerApp and every hospital load from the run config equals the coordinator's."""
    link = FakeSuperLink(coord)
    _use(monkeypatch, link)
    coord.federation.write_text(coord.federation.read_text().replace("domains: []", "domains: [cxr, 'a b']"))
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=1", "train.lr=1e-5"]) == 0

    words = shlex.split(link.submitted[0][1]["overrides"])
    remote = load_config(None, words)  # what config_from_run_config does on the other side
    local = load_config(coord.federation, ["federation.rounds=1", "train.lr=1e-5"])
    local.server.node_names, local.federation.min_hospitals = dict(NAMES), 2
    local.server.run_dir, local.server.resume = "runs/run-001", True
    assert remote == local
    assert remote.federation.domains == ["cxr", "a b"] and remote.train.lr == 1e-5


def test_min_hospitals_chosen_by_the_coordinator_is_kept(coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch) -> None:
    link = FakeSuperLink(coord)
    _use(monkeypatch, link)
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=1", "federation.min_hospitals=1"]) == 0
    assert _words(link)["federation.min_hospitals"] == 1


def test_keys_the_command_sets_itself_are_refused(coord: CoordinatorDir, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["coordinator", "run", str(coord.root), "server.resume=true"]) == 2
    assert "server.resume is set by `fedclimb coordinator run` itself" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="server.run_dir"):
        cr.resolve_config(coord, None, ["server.run_dir=elsewhere"])


def _interrupted_run(coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch) -> FakeSuperLink:
    """run-001 of 3 rounds, checkpointed after round 1, then the SuperLink died."""
    link = FakeSuperLink(coord, final="failed", details="ServerApp lost the SuperLink")
    _use(monkeypatch, link)
    link.rounds = 3
    real_state = link.run_state

    def dies_after_round_1(run_id: int) -> RunState | None:
        state = real_state(run_id)
        if (coord.runs / "run-001" / "round-0001").exists():
            link.down = True
        return state

    monkeypatch.setattr(link, "run_state", dies_after_round_1)
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=3"]) == 3
    monkeypatch.setattr(link, "run_state", real_state)
    link.down, link.polls = False, 0
    link.runs[501] = ["running", "finished:failed"]  # what a restarted SuperLink reports
    return link


def test_after_a_crash_the_run_resumes_from_its_last_checkpoint(coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    link = _interrupted_run(coord, monkeypatch)
    lost = capsys.readouterr()
    assert "lost the SuperLink" in lost.err and "resumes after round 1" in lost.err
    link.final = "completed"

    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=3"]) == 0

    out = capsys.readouterr().out
    assert "run-001: resuming after round 1 of 3" in out
    # the very same run configuration: every redone round is asked exactly as before
    assert link.submitted[1][1] == link.submitted[0][1]
    assert _words(link)["server.run_dir"] == "runs/run-001"
    # the rounds before the crash come back from the event file once, then the redone ones
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("round ")] == [
        "round 0 (before training)", "round 1/3", "round 2/3", "round 3/3"]
    submissions = json.loads((coord.runs / "run-001" / "coordinator.json").read_text())["submissions"]
    assert [s["resume"] for s in submissions] == [False, True]


def test_a_hospital_admitted_mid_run_does_not_change_the_resumed_configuration(
        coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    link = _interrupted_run(coord, monkeypatch)
    coord.registered.write_text(json.dumps({**NAMES, "gamma": 33}))
    link.final = "completed"
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=3"]) == 0
    assert "note: gamma admitted after run-001 started" in capsys.readouterr().out
    assert link.submitted[1][1] == link.submitted[0][1]


def test_a_changed_configuration_does_not_resume(coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    link = _interrupted_run(coord, monkeypatch)
    capsys.readouterr()
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=3", "train.lr=0.001"]) == 2
    err = capsys.readouterr().err
    assert "run-001 stopped after round 1" in err and "train.lr" in err and "move" in err
    assert len(link.submitted) == 1


def test_a_run_still_going_is_followed_not_submitted_again(coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    link = FakeSuperLink(coord)
    _use(monkeypatch, link)
    real_state = link.run_state
    calls = {"n": 0}

    def interrupt_once(run_id: int) -> RunState | None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C of `coordinator run`: the run goes on
        return real_state(run_id)

    monkeypatch.setattr(link, "run_state", interrupt_once)
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 130
    assert "the run goes on in the SuperLink" in capsys.readouterr().out
    monkeypatch.setattr(link, "run_state", real_state)

    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 0
    assert "Flower run 501 is still running; following it" in capsys.readouterr().out
    assert len(link.submitted) == 1


def test_a_run_interrupted_by_a_superlink_restart_is_resumed_at_once(
        coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The restarted SuperLink still lists the run as running; its ServerApp died with the old one."""
    import time

    link = FakeSuperLink(coord)
    _use(monkeypatch, link)
    real_state = link.run_state
    calls = {"n": 0}

    def crash_after_round_1(run_id: int) -> RunState | None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the command went down with the SuperLink
        return real_state(run_id)

    monkeypatch.setattr(link, "run_state", crash_after_round_1)
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 130
    monkeypatch.setattr(link, "run_state", real_state)
    link.frozen = True
    coord.started.write_text(json.dumps({"pid": 1, "started": time.time() + 1}))  # `coordinator start` again

    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 0
    out = capsys.readouterr().out
    assert "Flower run 501 was interrupted by a restart of the SuperLink" in out
    assert "run-001: resuming after round 1 of 2" in out
    assert link.runs[501][-1] == "finished:stopped" and link.submitted[1][1] == link.submitted[0][1]


def test_a_failed_run_exits_1_with_the_reason_and_the_server_log(coord: CoordinatorDir,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    link = FakeSuperLink(coord, final="failed", details="ServerApp failed with exception: boom")
    link_rounds = {"max": 0}
    _use(monkeypatch, link)
    original = link.start_run

    def start(fab: bytes, run_config: dict[str, Any]) -> int:
        run_id = original(fab, run_config)
        link.rounds = link_rounds["max"]  # the ServerApp dies after round 0
        assert link.run_dir is not None
        link.run_dir.mkdir(parents=True, exist_ok=True)
        (link.run_dir / "server.log").write_text("INFO connected: alpha, beta\nERROR boom\n")
        return run_id

    monkeypatch.setattr(link, "start_run", start)
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 1
    captured = capsys.readouterr()
    assert "ended finished:failed (ServerApp failed with exception: boom)" in captured.err
    assert "run this command again to resume after round 0" in captured.err
    assert "  ERROR boom" in captured.out


UNAPPROVED = "the hospital reported an error: the hospital has not approved app sha256:" + "ab" * 32


def test_a_round_that_aggregated_nothing_fails_the_run_naming_each_hospital(
        coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Every round ran, but in round 1 no hospital's update arrived: exit 1, not 0."""
    link = FakeSuperLink(coord)
    _use(monkeypatch, link)
    link.train[1] = {"nodes": {"alpha": {}}, "aggregated": False, "rejected": {"alpha": UNAPPROVED},
                     "missing": ["beta"]}

    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 1

    captured = capsys.readouterr()
    assert "round 1/2 | hospitals 0/2" in captured.out and "not aggregated" in captured.out
    err = captured.err
    assert "run-001 ran all 2 round(s), but 1 of them aggregated no update" in err
    assert "round 1: no update aggregated (fewer than federation.min_replies=1 accepted)" in err
    assert f"alpha: {UNAPPROVED}" in err and "beta: no reply within federation.round_timeout_s" in err
    assert "round 2:" not in err  # round 2 aggregated
    # the run is over (its checkpoints kept); the next command starts a new one
    assert json.loads((coord.runs / "run-001" / "coordinator.json").read_text())["complete"] is True
    link.train.clear()
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 0
    assert _words(link)["server.run_dir"] == "runs/run-002"


def test_a_run_found_finished_with_a_skipped_round_fails_too(
        coord: CoordinatorDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The command was away while the run ended; coming back must not turn the failure into 0."""
    link = FakeSuperLink(coord)
    _use(monkeypatch, link)
    link.train[2] = {"nodes": {}, "aggregated": False, "rejected": {}, "missing": []}
    real_state = link.run_state
    calls = {"n": 0}

    def interrupt_once(run_id: int) -> RunState | None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_state(run_id)

    monkeypatch.setattr(link, "run_state", interrupt_once)
    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 130
    monkeypatch.setattr(link, "run_state", real_state)
    while real_state(501).status != "finished":  # the run goes on without the command
        pass
    capsys.readouterr()

    assert cli_main(["coordinator", "run", str(coord.root), "federation.rounds=2"]) == 1
    err = capsys.readouterr().err
    assert "round 2: no update aggregated" in err and "no hospital was asked (none connected)" in err


def test_progress_names_left_out_hospitals_with_the_reason() -> None:
    line = format_round(_event(2, rejected={"beta": "unreachable: its SuperNode stopped sending heartbeats"},
                               missing=["gamma"]), rounds=3)
    assert line.startswith("round 2/3 | hospitals 1/3: alpha (beta: unreachable: its SuperNode stopped")
    assert "gamma: no reply" in line
    line = format_round(_event(1, aggregated=False, rejected={"alpha": "x", "beta": "y"}), rounds=3)
    assert "hospitals 0/2 (alpha: x; beta: y) - not aggregated" in line


def test_progress_says_when_the_test_numbers_are_dp_noised() -> None:
    exact = {"d": {"records": 40.0, "balanced_accuracy": 0.75, "accuracy": 0.8, "mean_reward": 0.7}}
    noisy = {"d": {"records": 38.2, "accuracy": 0.896, "mean_reward": 0.0}}  # eval_release: dp
    line = format_round({**_event(2), "evaluate": {"domains": exact}}, rounds=2)
    assert "| test bal-acc 0.750 acc 0.800 reward 0.700 |" in line
    line = format_round({**_event(2), "evaluate": {"domains": noisy}}, rounds=2)
    assert "| test (DP-noised, see docs/privacy.md) acc 0.896 reward 0.000 |" in line


def test_config_words_round_trip_every_value(tmp_path: Path) -> None:
    cfg = load_config(None, ["federation.domains=[a, 'b c']", "train.lr=1e-5", "server.node_names={x.y: 7}",
                             "prompt.system='say \"hi\"'", "model=smollm2-135m"])
    assert load_config(None, cr.config_words(cfg)) == cfg
