"""ServerApp loop + ClientApp exercised together with real Messages (in-process grid).

Covers: replies carry only adapter tensors and whitelisted numeric metrics; checkpoints
are standard PEFT folders; a resumed run ends with the same adapter as an
uninterrupted one; the server cannot turn a hospital's DP off or move its data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message

from client.client_app import app as client_app
from common import keys
from common.config import FedClimbConfig, load_config
from common.modeling.lora import read_peft_folder
from server.federation import run_federation
from server.strategy import EVAL_METRICS, TRAIN_METRICS
from simulation.inprocess import InProcessGrid
from simulation.simulate import prepare_run

BASE = [
    "simulation.hospitals=3",
    "simulation.synth_scale=0.25",
    "federation.rounds=3",
    "train.steps=2",
    "rollout.batch_prompts=4",
    "rollout.num_rollouts=2",
    "rollout.eval_batch_prompts=32",
    "federation.eval_max_records=12",
    "privacy.target_epsilon=20",
]


def _cfg(cache: Path, *extra: str) -> FedClimbConfig:
    return load_config(overrides=[*BASE, f"model.cache_dir={cache}", *extra])


class RecordingGrid(InProcessGrid):
    """Keeps every reply for inspection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def _deliver(self, msg: Message) -> Message:
        reply = super()._deliver(msg)
        self.replies.append(reply)
        return reply


def _run(cfg: FedClimbConfig, run_dir: Path, *, stop_after: int | None = None) -> RecordingGrid:
    run = prepare_run(cfg, run_dir)
    grid = RecordingGrid(client_app, len(run.roots), run_config=run.run_config, seed=cfg.seed)

    def stop(entry: dict[str, Any]) -> None:
        if stop_after is not None and entry["server_round"] == stop_after:
            raise KeyboardInterrupt("simulated crash")

    try:
        run_federation(grid, run.cfg, run_dir=run.run_dir, on_round=stop)
    except KeyboardInterrupt:
        pass
    return grid


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, RecordingGrid]:
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("full")
    grid = _run(_cfg(cache), run_dir)
    return run_dir, grid


def test_replies_carry_only_adapter_tensors_and_whitelisted_numbers(full_run: tuple[Path, RecordingGrid]) -> None:
    run_dir, grid = full_run
    adapter_keys = set(read_peft_folder(run_dir / "round-0001" / "adapter"))
    b_keys = {k for k in adapter_keys if k.endswith("lora_B.weight")}
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    evaluate = [r for r in grid.replies if r.metadata.message_type == "evaluate"]
    assert len(train) == 9 and len(evaluate) == 12  # 3 rounds x 3 hospitals (+ the round-0 evaluation)
    for r in train:
        assert not r.has_error()
        c = r.content
        assert set(c.array_records) == {keys.ARRAYS} and set(c.metric_records) == {keys.METRICS}
        assert not c.config_records  # no strings travel back
        assert set(c.array_records[keys.ARRAYS].keys()) == b_keys  # ffa: lora_B only
        metrics = dict(c.metric_records[keys.METRICS])
        assert set(metrics) <= set(TRAIN_METRICS) | {keys.STATUS}
        for v in metrics.values():
            assert isinstance(v, int | float) or (isinstance(v, list) and len(v) == 5)
    for r in evaluate:
        c = r.content
        assert not c.array_records and not c.config_records
        assert set(c.metric_records[keys.METRICS]) <= set(EVAL_METRICS) | {keys.STATUS}


def test_checkpoints_and_metrics(full_run: tuple[Path, RecordingGrid], cache: Path) -> None:
    run_dir, _ = full_run
    assert (run_dir / "latest").resolve().name == "round-0003"
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [h["server_round"] for h in history] == [0, 1, 2, 3]
    assert all(h["train"]["aggregated"] for h in history[1:])
    # every hospital spent privacy budget, within its target
    for h in history[1:]:
        for m in h["train"]["nodes"].values():
            assert 0 < m[keys.EPSILON] <= 20.0
    # the checkpoint is a standard PEFT folder that loads onto the base model
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from common.modeling.shapes import model_folder

    cfg = _cfg(cache)
    base = AutoModelForImageTextToText.from_pretrained(model_folder(cfg.model))
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "latest" / "adapter"))
    from common.modeling.lora import adapter_state

    loaded = adapter_state(peft_model)
    saved = read_peft_folder(run_dir / "latest" / "adapter")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_resume_gives_the_same_final_adapter(full_run: tuple[Path, RecordingGrid], tmp_path: Path, cache: Path) -> None:
    run_dir, _ = full_run
    resumed_dir = tmp_path / "resumed"
    _run(_cfg(cache), resumed_dir, stop_after=2)  # crashes right after round 2's checkpoint
    assert (resumed_dir / "latest").resolve().name == "round-0002"
    _run(_cfg(cache, "server.resume=true"), resumed_dir)
    a = read_peft_folder(run_dir / "latest" / "adapter")
    b = read_peft_folder(resumed_dir / "latest" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = json.loads((resumed_dir / "metrics.json").read_text())
    assert [h["server_round"] for h in history] == [0, 1, 2, 3]


def test_server_cannot_switch_a_hospitals_dp_off_or_move_its_data(tmp_path: Path, cache: Path) -> None:
    """The run config says DP off and a wrong data root; the hospital files win."""
    cfg = _cfg(cache, "federation.rounds=1")
    run = prepare_run(cfg, tmp_path / "run")
    hostile = load_config(overrides=[*BASE, f"model.cache_dir={cache}", "federation.rounds=1",
                                     "privacy.enabled=false", "data.root=/nonexistent"])
    hostile.federation.domains = run.cfg.federation.domains
    hostile.server.run_dir = str(run.run_dir)
    (run.run_dir / "config.yaml").write_text(__import__("common.config", fromlist=["to_yaml"]).to_yaml(hostile))
    grid = RecordingGrid(client_app, len(run.roots), run_config=run.run_config, seed=0)
    run_federation(grid, hostile, run_dir=run.run_dir)
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert train and all(keys.EPSILON in r.content.metric_records[keys.METRICS] for r in train)
    for i in range(3):
        ledger = json.loads((run.sim_root / f"hospital-{i}" / "state" / "privacy_ledger.json").read_text())
        assert "dpsgd" in [e["kind"] for e in ledger["entries"]]  # after the release of N (stats_release)
