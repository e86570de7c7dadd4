"""The server turns DP-released evaluation sums into per-domain metrics (post-processing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import keys
from common.config import load_config
from server.strategy import FedClimbStrategy
from simulation.inprocess import enter_task


@pytest.fixture(autouse=True)
def _task() -> None:
    enter_task()


def _strategy() -> FedClimbStrategy:
    cfg = load_config(overrides=["federation.domains=[cxr,ecg]"])
    return FedClimbStrategy(cfg, {"base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(4, 2)})


def _reply(node: int, metrics: dict[str, object]) -> Message:
    instr = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.EVALUATE)
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=instr)  # type: ignore[arg-type]


def _released(units: list[float], acc: list[float], reward: list[float], fmt: list[float]) -> dict[str, object]:
    return {keys.STATUS: 0, keys.NUM_EXAMPLES: 0, keys.E_DP_UNITS: units, keys.E_DP_ACCURACY_SUM: acc,
            keys.E_DP_REWARD_SUM: reward, keys.E_DP_FORMAT_SUM: fmt}


def _exact(records: list[float], reward: list[float], bal: list[float]) -> dict[str, object]:
    m: dict[str, object] = {keys.STATUS: 0, keys.NUM_EXAMPLES: 0, keys.E_RECORDS: records,
                            keys.E_MEAN_REWARD: reward, keys.E_BALANCED_ACCURACY: bal}
    m.update({k: [0.5, 0.5] for k in keys.EVAL_PER_DOMAIN if k not in m})
    return m


def test_released_sums_are_added_up_then_divided() -> None:
    s = _strategy()
    a = _released([10.0, -1.5], [6.0, 0.0], [5.0, 0.3], [9.0, 0.0])  # a noisy negative count for ecg
    b = _released([30.0, 4.0], [12.0, 2.0], [15.0, 4.5], [30.0, 4.0])
    exact = _exact([20.0, 0.0], [0.2, 0.0], [0.7, 0.0])
    s.aggregate_evaluate(1, [_reply(1, a), _reply(2, b), _reply(3, exact)])
    rows = s._combine_eval({"hospital-0": a, "hospital-1": b, "hospital-2": exact})
    cxr, ecg = rows["cxr"], rows["ecg"]
    # cxr: units 10 + 30 + 20 = 60; reward (5 + 15 + 20 * 0.2) / 60 = 0.4; accuracy (6 + 12 + 20 * 0.5) / 60
    assert cxr["records"] == pytest.approx(60.0)
    assert cxr["mean_reward"] == pytest.approx(0.4)
    assert cxr["accuracy"] == pytest.approx(28 / 60)
    # balanced accuracy is not released under DP: the exact hospital's value alone
    assert cxr["balanced_accuracy"] == pytest.approx(0.7)
    # ecg: units -1.5 + 4 = 2.5; reward (0.3 + 4.5) / 2.5 = 1.92 -> clipped to 1; no exact hospital holds ecg
    assert ecg["records"] == pytest.approx(2.5)
    assert ecg["mean_reward"] == 1.0
    assert "balanced_accuracy" not in ecg
    assert s.domain_means() == pytest.approx({"cxr": 0.4, "ecg": 1.0})


def test_incomplete_or_mixed_releases_are_dropped() -> None:
    s = _strategy()
    partial = {k: v for k, v in _released([5.0, 5.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]).items()
               if k != keys.E_DP_FORMAT_SUM}
    mixed = {**_exact([5.0, 5.0], [0.9, 0.9], [0.9, 0.9]), keys.E_DP_UNITS: [5.0, 5.0],
             keys.E_DP_ACCURACY_SUM: [1.0, 1.0], keys.E_DP_REWARD_SUM: [1.0, 1.0], keys.E_DP_FORMAT_SUM: [1.0, 1.0]}
    good = _released([10.0, 10.0], [5.0, 5.0], [2.5, 7.5], [10.0, 10.0])
    s.aggregate_evaluate(1, [_reply(1, partial), _reply(2, mixed), _reply(3, good)])
    assert s.domain_means() == pytest.approx({"cxr": 0.25, "ecg": 0.75})  # the complete release alone


def test_a_domain_whose_released_total_is_not_positive_has_no_estimate() -> None:
    s = _strategy()
    s.aggregate_evaluate(1, [_reply(1, _released([-2.0, 3.0], [1.0, 1.0], [1.0, 1.5], [0.0, 3.0]))])
    assert s.domain_means() == pytest.approx({"cxr": -1.0, "ecg": 0.5})  # cxr still unknown


def test_a_federation_with_dp_evaluation_end_to_end(tmp_path: Path) -> None:
    """Hospitals release noisy evaluation sums and no timing; the server accepts and divides them."""
    from client.client_app import app as client_app
    from server.federation import run_federation
    from simulation.inprocess import InProcessGrid
    from simulation.simulate import prepare_run

    cfg = load_config(overrides=[
        "simulation.hospitals=2", "simulation.synth_scale=0.25", "federation.rounds=1", "train.steps=1",
        "rollout.batch_prompts=4", "rollout.num_rollouts=2", "rollout.eval_batch_prompts=32",
        "federation.eval_max_records=12", "privacy.target_epsilon=20", "privacy.eval_release=dp",
        "privacy.eval_noise_multiplier=5", f"model.cache_dir={tmp_path / 'cache'}",
    ])
    run = prepare_run(cfg, tmp_path / "run")
    replies: list[Message] = []

    class Recording(InProcessGrid):
        def _deliver(self, msg: Message) -> Message:
            reply = super()._deliver(msg)
            replies.append(reply)
            return reply

    run_federation(Recording(client_app, len(run.roots), run_config=run.run_config, seed=0), run.cfg,
                   run_dir=run.run_dir)
    evaluate = [dict(r.content.metric_records[keys.METRICS]) for r in replies if r.metadata.message_type == "evaluate"]
    train = [dict(r.content.metric_records[keys.METRICS]) for r in replies if r.metadata.message_type == "train"]
    assert len(evaluate) == 4 and len(train) == 2  # rounds 0 and 1, two hospitals
    assert all(set(m) - {keys.SITE_PARTITION} == {keys.STATUS, keys.NUM_EXAMPLES, *keys.EVAL_DP_PER_DOMAIN}
               for m in evaluate)
    assert not any(keys.ROLLOUT_SECONDS in m or keys.UPDATE_SECONDS in m for m in train)
    history = json.loads((run.run_dir / "metrics.json").read_text())
    assert history[0]["evaluate"]["domains"] and history[1]["train"]["aggregated"]
    assert all(0.0 <= row["mean_reward"] <= 1.0 for row in history[1]["evaluate"]["domains"].values())
    for i in range(2):
        ledger = json.loads((run.sim_root / f"hospital-{i}" / "state" / "privacy_ledger.json").read_text())
        assert [e["kind"] for e in ledger["entries"]].count("eval_release") == 2
