"""Live progress lines of `fedclimb simulate` (read from the server's events.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import load_config
from simulation.simulate import _Progress, format_round

EVENT = {
    "server_round": 2,
    "seconds": 12.5,
    "bytes_sent": 2_000_000,
    "bytes_received": 500_000,
    "train": {"nodes": {"hospital-0": {"dp.epsilon": 4.25}, "hospital-1": {"dp.epsilon": 4.5}},
              "rejected": {}},
    "evaluate": {"domains": {"a": {"mean_reward": 0.5, "balanced_accuracy": 0.6, "records": 10.0},
                             "b": {"mean_reward": 1.0, "balanced_accuracy": 1.0, "records": 30.0}}},
}


def test_round_line_has_hospitals_reward_epsilon_bytes_and_time() -> None:
    line = format_round(EVENT, rounds=4, elapsed=33.0)
    # records-weighted: reward (10 * 0.5 + 30 * 1.0) / 40 = 0.875, accuracy (6 + 30) / 40 = 0.9
    for part in ("round 2/4", "hospitals 2/2", "test reward 0.875", "bal-acc 0.900", "eps 0:4.25 1:4.50",
                 "sent 2.00 MB recv 0.50 MB", "12.5 s (elapsed 33 s)"):
        assert part in line, (part, line)


def test_modes_read_only_complete_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    cfg = load_config()
    out: dict[str, list[str]] = {"progress": [], "jsonl": [], "quiet": []}
    readers = {m: _Progress(events, cfg, m, out[m].append) for m in out}  # type: ignore[arg-type]
    events.write_text(json.dumps(EVENT) + "\n" + json.dumps({**EVENT, "server_round": 3})[:20])  # half a line
    for r in readers.values():
        r()
    assert len(out["progress"]) == 1 and out["progress"][0].startswith("round 2/8")
    assert [json.loads(x)["server_round"] for x in out["jsonl"]] == [2]
    assert out["quiet"] == []
    with open(events, "a") as f:  # the rest of the line arrives
        f.write(json.dumps({**EVENT, "server_round": 3})[20:] + "\n")
    for r in readers.values():
        r()
    assert [json.loads(x)["server_round"] for x in out["jsonl"]] == [2, 3]
