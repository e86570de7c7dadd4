"""Round checkpoints: what a crash at the worst moment leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import LoraSettings
import server.checkpoint as checkpoint
from server.checkpoint import load_latest, save_round


def _save(run_dir: Path, rnd: int, history: list[dict]) -> None:
    adapter = {"base_model.model.layers.0.q_proj.lora_B.weight": torch.full((4, 2), float(rnd))}
    history.append({"server_round": rnd})
    save_round(run_dir, rnd, adapter, {"strategy": {"round": rnd}}, lora=LoraSettings(), base_model_name="",
               metrics_history=list(history))


@pytest.mark.parametrize("moment", ["metrics", "latest"])
def test_a_crash_while_finishing_a_round_never_loses_history_up_to_latest(tmp_path, monkeypatch, moment):
    """Killed while writing metrics.json or while swapping latest: latest stays at round 2,
    and metrics.json holds every round up to latest (a resume drops any after it)."""
    history: list[dict] = []
    _save(tmp_path, 1, history)
    _save(tmp_path, 2, history)
    real_write = checkpoint.write_json_atomic

    def write(path: Path, obj: object) -> None:
        if moment == "metrics" and Path(path).name == "metrics.json":
            raise KeyboardInterrupt("killed while writing metrics.json")
        real_write(path, obj)

    def swap(self: Path, target: object) -> None:
        raise KeyboardInterrupt("killed while swapping latest")

    monkeypatch.setattr(checkpoint, "write_json_atomic", write)
    if moment == "latest":
        monkeypatch.setattr(Path, "symlink_to", swap)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, history)
    monkeypatch.undo()
    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.server_round == 2
    assert torch.equal(next(iter(ckpt.adapter.values())), torch.full((4, 2), 2.0))
    rounds = [h["server_round"] for h in json.loads((tmp_path / "metrics.json").read_text())]
    assert [r for r in rounds if r <= ckpt.server_round] == [1, 2]
    _save(tmp_path, 3, history[:2])
    assert load_latest(tmp_path).server_round == 3  # type: ignore[union-attr]
    assert (tmp_path / "latest").resolve().name == "round-0003"
