"""`fedclimb coordinator run DIR`: submit the federation, follow it round by round, resume it.

What it does:

1. Resolves the run configuration: ``DIR/federation.yaml`` (or ``--config FILE``), then
   ``key=value`` words. ``federation.min_hospitals`` defaults to every admitted hospital.
2. Picks the run folder ``DIR/runs/run-NNN`` (``server.run_dir``): the last one if it is
   unfinished, else a new one. An unfinished run with checkpoints resumes after its last
   complete round (``server.resume=true`` is set, no flag needed); one still running on
   the SuperLink is only followed.
3. Builds the app (FAB) of this installation, prints its digest, submits exactly that FAB
   to the SuperLink (``DIR/flwr`` connection). The run configuration travels whole as
   ``key=value`` words, so the ServerApp and every hospital resolve the same values.
4. Prints one line per round from the run's ``events.jsonl`` and exits 0 when the run has
   finished every round and every round aggregated an update; non-zero with the reason
   otherwise (a round in which too few hospitals replied, or their replies were refused,
   fails the run with each hospital's reason, like ``fedclimb simulate``).

The instruction of a redone round is the same as the first time (same adapter and
domain statistics from the checkpoint, same configuration values; nothing run-specific
travels in it), so a hospital that already answered it re-sends its reply without
spending privacy budget again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.config import ConfigError, FedClimbConfig, load_config
from common.files import write_text_atomic
from server.coordinator import CONNECTION, CoordinatorDir, CoordinatorError, load_settings
from server.flwr_control import Control, ControlError, RunState
from server.progress import RoundPrinter, not_aggregated
from server.registration import read_registered

__all__ = ["run_command", "RunError", "config_words", "resolve_config", "RunFolder", "choose_run_folder",
           "build_app"]

RUN_PREFIX = "run-"
STATE_FILE = "coordinator.json"
EVENTS_FILE = "events.jsonl"
# Keys the coordinator sets itself; a resume may differ in them.
DERIVED = ("server.run_dir", "server.resume", "server.node_names", "federation.min_hospitals")
# Seconds between reads of the event file, between run-status requests (more often once
# the last round is in), and of SuperLink silence before giving up.
POLL_S = 2.0
STATUS_POLL_S = 15.0
UNREACHABLE_GIVE_UP_S = 30.0


class RunError(RuntimeError):
    """The run did not complete; ``code`` is the command's exit status.

    ``resumable``: its ServerApp died (no heartbeat), so submitting it again resumes it.
    """

    def __init__(self, message: str, code: int = 1, resumable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.resumable = resumable


# ----------------------------------------------------------------------------- configuration


def _leaf_words(obj: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out += _leaf_words(value, key + ".")
        else:
            out.append(f"{key}={json.dumps(value, sort_keys=True)}")
    return out


def config_words(cfg: FedClimbConfig) -> list[str]:
    """Every value of ``cfg`` as ``key=value`` words (JSON values, which YAML reads back).

    ``load_config(None, config_words(cfg))`` gives ``cfg`` again whatever the presets of
    configs/base.yaml, so the ServerApp and the hospitals resolve exactly these values.
    """
    return _leaf_words(cfg)


def _file_keys(path: Path) -> set[str]:
    """The dotted keys a fedclimb YAML file sets (``defaults`` aside)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read ({str(exc).splitlines()[0]})") from None
    out: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out.add(prefix[:-1])

    if isinstance(data, dict):
        walk({k: v for k, v in data.items() if k != "defaults"}, "")
    return out


def resolve_config(d: CoordinatorDir, config: str | None, overrides: Sequence[str]) -> tuple[FedClimbConfig, bool]:
    """The run configuration; True when the user chose ``federation.min_hospitals``."""
    path = Path(config) if config else d.federation
    if not path.is_file():
        raise ConfigError(f"{path} not found" + ("" if config else ": run `fedclimb coordinator init` first"))
    user = _file_keys(path) | {w.split("=", 1)[0].strip() for w in overrides if "=" in w}
    for key in DERIVED[:3]:
        if any(k == key or k.startswith(key + ".") for k in user):
            raise ConfigError(f"{key} is set by `fedclimb coordinator run` itself; remove it from {path.name} "
                              "and the command line")
    return load_config(path, overrides), "federation.min_hospitals" in user


def _comparable(cfg: FedClimbConfig) -> dict[str, str]:
    return {w.split("=", 1)[0]: w.split("=", 1)[1] for w in config_words(cfg)
            if w.split("=", 1)[0] not in DERIVED}


# ----------------------------------------------------------------------------- run folders


@dataclass
class RunFolder:
    """``DIR/runs/run-NNN`` and what the coordinator recorded about it (``coordinator.json``)."""

    path: Path
    # The user's configuration (comparable values) and the exact words submitted.
    config: dict[str, str] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)
    submissions: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.state_file, json.dumps(
            {"config": self.config, "words": self.words, "submissions": self.submissions, "complete": self.complete},
            indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunFolder:
        try:
            raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls(path)
        return cls(path, dict(raw.get("config", {})), [str(w) for w in raw.get("words", [])],
                   list(raw.get("submissions", [])), bool(raw.get("complete")))

    def last_round(self) -> int | None:
        """The last checkpointed round (``latest``), None without one."""
        latest = self.path / "latest"
        m = re.match(r"^round-(\d+)$", latest.resolve().name) if latest.exists() else None
        return int(m.group(1)) if m else None

    @property
    def last_run_id(self) -> int | None:
        return int(self.submissions[-1]["flwr_run_id"]) if self.submissions else None


def choose_run_folder(d: CoordinatorDir) -> tuple[RunFolder, bool]:
    """The last unfinished run folder, or a new one; True when it is new."""
    d.runs.mkdir(parents=True, exist_ok=True)
    numbered = sorted((int(p.name[len(RUN_PREFIX):]), p) for p in d.runs.glob(f"{RUN_PREFIX}*")
                      if p.is_dir() and p.name[len(RUN_PREFIX):].isdigit())
    if numbered:
        last = RunFolder.load(numbered[-1][1])
        if not last.complete:
            return last, False
    number = numbered[-1][0] + 1 if numbered else 1
    return RunFolder(d.runs / f"{RUN_PREFIX}{number:03d}"), True


# ----------------------------------------------------------------------------- the app


def build_app(out_dir: Path) -> tuple[bytes, str]:
    """This installation's FAB (the bytes submitted) and its digest ``sha256:<hex>``."""
    from common.fab import build_fab, fab_digest

    fab = build_fab(out_dir)
    data = Path(fab).read_bytes()
    digest = fab_digest(data)
    if digest != "sha256:" + hashlib.sha256(data).hexdigest():
        raise RunError(f"the FAB digest {digest} is not the SHA-256 Flower computes; the hospitals would "
                       "see another digest")
    return data, digest


# ----------------------------------------------------------------------------- following a run


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Follower:
    """Reads a run's events as they come and watches its status on the SuperLink."""

    run: RunFolder
    control: Control
    run_id: int
    cfg: FedClimbConfig
    names: dict[str, int]
    say: Callable[[str], None]
    printer: RoundPrinter = field(init=False)
    _offset: int = 0
    _waiting_report: str = ""

    def __post_init__(self) -> None:
        self.printer = RoundPrinter(self.cfg.federation.rounds, self.say)

    def read_events(self) -> None:
        path = self.run.path / EVENTS_FILE
        if not path.is_file():
            return
        size = path.stat().st_size
        if size < self._offset:  # rewritten from the checkpointed history on resume
            self._offset = 0
        with open(path, encoding="utf-8") as f:
            f.seek(self._offset)
            for line in f:
                if not line.endswith("\n"):
                    break
                self._offset += len(line.encode())
                self.printer.emit(json.loads(line))

    def report_waiting(self) -> None:
        """Before the first round: who is connected (by name) out of those expected."""
        try:
            nodes = self.control.list_nodes()
        except ControlError:
            return
        by_id = {v: k for k, v in self.names.items()}
        online = sorted(by_id.get(n.node_id, f"node-{n.node_id}") for n in nodes if n.status == "online")
        absent = sorted(set(self.names) - set(online))
        text = (f"waiting for {self.cfg.federation.min_hospitals} hospital(s): connected "
                f"{', '.join(online) or 'none'}" + (f"; not connected: {', '.join(absent)}" if absent else ""))
        if text != self._waiting_report:
            self._waiting_report = text
            self.say(text)

    def follow(self) -> RunState:
        """Until the run finishes; its final state. RunError when the SuperLink is lost."""
        poll_s = POLL_S
        last_poll = -1e9
        unreachable_since: float | None = None
        state: RunState | None = None
        while True:
            self.read_events()
            now = time.monotonic()
            done_rounds = self.printer.last_round >= self.cfg.federation.rounds
            if now - last_poll >= (poll_s if done_rounds or unreachable_since else STATUS_POLL_S):
                last_poll = now
                try:
                    state = self.control.run_state(self.run_id)
                    unreachable_since = None
                except ControlError as exc:
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > UNREACHABLE_GIVE_UP_S:
                        raise RunError(self._lost(str(exc)), code=3) from None
                    continue
                if state is None:
                    raise RunError(f"the SuperLink does not know run {self.run_id} (was its database "
                                   f"replaced?). Run this command again to resume {self.run.name} in a new Flower "
                                   "run.", code=3)
                if state.finished:
                    self.read_events()
                    return state
                if self.printer.last_round < 0:
                    self.report_waiting()
            time.sleep(poll_s)

    def _lost(self, why: str) -> str:
        after = self.run.last_round()
        where = f"after round {after}" if after is not None else "before its first checkpoint"
        return (f"lost the SuperLink ({why}). {self.run.name} stopped {where}. Start the SuperLink again "
                f"(`fedclimb coordinator start DIR`) and run this command again: it resumes {where} "
                "without a flag.")


# ----------------------------------------------------------------------------- the command


def _submit(d: CoordinatorDir, control: Control, run: RunFolder, fab: bytes, digest: str, resume: bool,
            say: Callable[[str], None]) -> int:
    run_config = {"config-file": "", "overrides": " ".join(shlex.quote(w) for w in run.words), "sim-root": ""}
    previous = run.submissions[-1]["fab"] if run.submissions else None
    if previous and previous != digest:
        say(f"note: {run.name} ran app {previous} before; this installation's app is {digest} (hospitals "
            "must approve it)")
    try:
        run_id = control.start_run(fab, run_config)
    except ControlError as exc:
        raise RunError(f"the SuperLink refused the run or did not answer: {exc}. Is `fedclimb coordinator "
                       f"start {d.root}` running?", code=3) from None
    run.submissions.append({"flwr_run_id": run_id, "fab": digest, "resume": resume, "submitted_at": _now(),
                            "submitted": time.time()})
    run.save()
    return run_id


def run_command(root: Path, *, config: str | None = None, overrides: Sequence[str] = (),
                say: Callable[[str], None] = print) -> int:
    """`fedclimb coordinator run`: 0 once the run has completed every round."""
    d, _ = load_settings(root)
    if not (d.flwr_home / "config.toml").is_file():
        raise CoordinatorError(f"{d.flwr_home / 'config.toml'} missing: start the SuperLink first "
                               f"(`fedclimb coordinator start {root}`)")
    control = Control(d.flwr_home, CONNECTION)
    names = read_registered(d)
    cfg, chose_min = resolve_config(d, config, overrides)
    run, new = choose_run_folder(d)
    comparable = _comparable(cfg)
    if not new and run.config and run.config != comparable and run.last_round() is not None:
        changed = sorted(k for k in set(run.config) | set(comparable) if run.config.get(k) != comparable.get(k))
        raise RunError(
            f"{run.name} stopped after round {run.last_round()} and resumes with the configuration it started "
            f"with, but these values differ now: {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}. "
            f"Restore them to resume, or move {run.path} elsewhere to start a new run.", code=2)

    if run.last_run_id is not None:
        try:
            state = control.run_state(run.last_run_id)
        except ControlError as exc:
            raise RunError(f"the SuperLink does not answer ({exc}); is `fedclimb coordinator start {root}` "
                           "running?", code=3) from None
        if state is not None and not state.finished:
            if _outlived(d, run):
                # Its ServerApp stopped with the previous SuperLink; the database has not noticed yet.
                say(f"{run.name}: Flower run {run.last_run_id} was interrupted by a restart of the SuperLink")
                with contextlib.suppress(ControlError):
                    control.stop_run(run.last_run_id)
            else:  # this command was stopped or lost, the run was not: follow it
                say(f"{run.name}: Flower run {run.last_run_id} is still {state.text}; following it")
                try:
                    return _finish(d, run, Follower(run, control, run.last_run_id, cfg, names, say), say)
                except RunError as exc:
                    if not exc.resumable:
                        raise
                    say(f"{exc}; resuming it now")
        if run.last_round() == cfg.federation.rounds and run.config == comparable:
            run.complete = True
            run.save()
            say(f"{run.name} had already finished all {cfg.federation.rounds} rounds; its checkpoints are in "
                f"{run.path}")
            _fail_unaggregated(run, cfg)
            return 0

    if run.words and run.config == comparable:
        # Submitted before: exactly the same words again. The hospitals' reply caches are
        # keyed on the round's whole configuration, so a redone round must not differ in
        # any value (not even in a name), or it would be trained and charged again.
        cfg = load_config(None, run.words)
        late = sorted(set(names) - set(cfg.server.node_names))
        if late:
            say(f"note: {', '.join(late)} admitted after {run.name} started: in this run's logs as node ids")
    else:
        if not chose_min:
            cfg.federation.min_hospitals = max(len(names), 1)
        cfg.server.node_names = dict(names)
        cfg.server.run_dir = str(run.path.relative_to(d.root))  # the SuperLink's working directory is DIR
        # Always true: a fresh run folder has no checkpoint (the ServerApp starts at round 1),
        # and a resumed submission then carries the very same configuration.
        cfg.server.resume = True
        run.config, run.words = comparable, config_words(cfg)
    run.save()

    fab, digest = build_app(run.path / "app")
    say(f"app {digest}")
    last = run.last_round()
    if last is not None:
        say(f"{run.name}: resuming after round {last} of {cfg.federation.rounds}")
    else:
        say(f"{run.name}: {cfg.federation.rounds} round(s), waiting for {cfg.federation.min_hospitals} "
            f"hospital(s) ({', '.join(sorted(names)) or 'none admitted yet'})")
    run_id = _submit(d, control, run, fab, digest, last is not None, say)
    say(f"submitted as Flower run {run_id}; following {run.path / EVENTS_FILE}")
    return _finish(d, run, Follower(run, control, run_id, cfg, names, say), say)


def _finish(d: CoordinatorDir, run: RunFolder, follower: Follower, say: Callable[[str], None]) -> int:
    t0 = time.monotonic()
    try:
        state = follower.follow()
    except KeyboardInterrupt:
        say(f"stopped following; the run goes on in the SuperLink. `fedclimb coordinator run {d.root}` follows it "
            f"again; `FLWR_HOME={d.flwr_home} flwr stop {follower.run_id}` stops it")
        return 130
    rounds = follower.cfg.federation.rounds
    last = run.last_round()
    if state.sub_status == "completed" and last == rounds:
        run.complete = True
        run.save()
        say(f"{run.name} complete: {rounds} round(s) in {time.monotonic() - t0:.0f} s; checkpoints in {run.path} "
            f"(latest -> round-{rounds:04d})")
        _fail_unaggregated(run, follower.cfg)
        return 0
    where = f"after round {last}" if last is not None else "before its first checkpoint"
    reason = f" ({state.details})" if state.details else ""
    if state.sub_status == "completed":
        reason = f" with {last if last is not None else 'no'} of {rounds} rounds checkpointed"
    tail = _server_log_tail(run.path)
    if tail:
        say("the last lines of the server log:")
        for line in tail:
            say("  " + line)
    raise RunError(f"Flower run {follower.run_id} ended {state.text}{reason}; {run.name} stopped {where}. "
                   f"Fix the cause and run this command again to resume {where}.",
                   resumable=state.sub_status == "failed" and "heartbeat" in state.details.lower())


def _round_events(run: RunFolder) -> dict[int, dict[str, Any]]:
    """The last event of each round in the run's event file."""
    events: dict[int, dict[str, Any]] = {}
    path = run.path / EVENTS_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                events[int(event.get("server_round", -1))] = event
    return events


def _fail_unaggregated(run: RunFolder, cfg: FedClimbConfig) -> None:
    """RunError (exit 1) when a round of the finished run aggregated no update.

    Such a round left the global adapter unchanged: too few hospitals replied, or their
    replies were refused (an app they have not approved, an exhausted budget, ...). The
    run is finished either way (the next command starts a new one); the command must not
    report success.
    """
    events = _round_events(run)
    reasons = [why for rnd, event in sorted(events.items())
               if (why := not_aggregated(event, cfg.federation.min_replies))]
    if not reasons:
        return
    n = len(reasons)
    raise RunError(
        f"{run.name} ran all {cfg.federation.rounds} round(s), but {n} of them aggregated no update "
        f"(the global adapter did not change in {'it' if n == 1 else 'them'}): " + " | ".join(reasons)
        + f". Fix the cause (the hospitals' own logs say more) and run this command again: it starts a new run; "
        f"{run.path} is kept.")


def _outlived(d: CoordinatorDir, run: RunFolder) -> bool:
    """True when the SuperLink now running started after ``run``'s last submission."""
    try:
        started = float(json.loads(d.started.read_text(encoding="utf-8"))["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return float(run.submissions[-1].get("submitted", float("inf"))) < started


def _server_log_tail(run_dir: Path, lines: int = 15) -> list[str]:
    path = run_dir / "server.log"
    if not path.is_file():
        return []
    return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
