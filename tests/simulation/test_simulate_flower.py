"""A real 2-round federation of 3 hospitals on Flower's simulation engine (tiny model).

Checks the main job end to end: the same ServerApp/ClientApp as a deployment, the run
directory and report, live progress, and that no process is left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.config import load_config
from simulation.report import write_report
from simulation.simulate import run_simulation

pytestmark = pytest.mark.slow


def _alive_with(marker: str) -> list[int]:
    """PIDs of running (non-zombie) processes whose environment mentions ``marker``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state != "Z" and marker.encode() in environ and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def test_two_round_simulation_through_flower(tmp_path: Path) -> None:
    cfg = load_config(overrides=[
        "federation.rounds=2", "train.steps=3", "rollout.batch_prompts=8", "simulation.synth_scale=0.25",
        f"model.cache_dir={tmp_path / 'cache'}",
    ])
    lines: list[str] = []
    result = run_simulation(cfg, tmp_path / "run", mode="progress", out=lines.append)
    assert result.ok, "\n".join(lines)
    run_dir = result.run_dir
    # live progress: a line before training and one per round
    rounds = [ln for ln in lines if ln.startswith("round ")]
    assert len(rounds) == 3 and "round 2/2" in rounds[-1] and "eps" in rounds[-1]
    # checkpoints in the server's layout
    assert (run_dir / "latest").resolve().name == "round-0002"
    assert (run_dir / "round-0002" / "adapter" / "adapter_model.safetensors").is_file()
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [h["server_round"] for h in history] == [0, 1, 2]
    assert all(len(h["train"]["nodes"]) == 3 for h in history[1:])
    # the report
    report = write_report(run_dir, result.cfg, history, seconds=result.seconds, command="fedclimb simulate")
    text = report.read_text()
    assert "balanced accuracy" in text and "epsilon" in text and "hospital-2" in text
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {(r["round"], r["hospital"], r["domain"]) for r in rows if r["phase"] == "eval"}
    assert {r for r, _, _ in evals} == {0, 1, 2}
    assert {h for _, h, _ in evals} == {"hospital-0", "hospital-1", "hospital-2"}
    assert (run_dir / "learning_curves.png").stat().st_size > 10_000
    # nothing left running: no SuperLink, simulation process or Ray worker of this run
    assert _alive_with(str(run_dir / ".flwr")) == []
    assert not (run_dir / ".flwr").exists()
