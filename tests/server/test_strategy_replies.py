"""The strategy drops every kind of malformed reply and still completes the round."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from common import keys
from common.config import load_config
from common.wire import encode_adapter
from server.strategy import FedClimbStrategy
from simulation.inprocess import enter_task

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
DOMAINS = ["cxr", "ecg"]


@pytest.fixture(autouse=True)
def _task() -> None:
    enter_task()


def _strategy(**over: object) -> FedClimbStrategy:
    words = ["federation.domains=[cxr,ecg]", "federation.max_update_norm=10", "aggregation.weighting=examples"]
    words += [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(overrides=words)
    g = {A: torch.ones(2, 3), B: torch.zeros(4, 2)}
    return FedClimbStrategy(cfg, g)


def _metrics(**extra: object) -> dict[str, object]:
    m: dict[str, object] = {keys.STATUS: 0, keys.NUM_EXAMPLES: 10, keys.LOCAL_STEPS: 2,
                            keys.D_COUNT: [6.0, 4.0]}
    m.update(extra)
    return m


def _reply(node: int, arrays: dict[str, torch.Tensor] | ArrayRecord | None, metrics: dict[str, object]) -> Message:
    instr = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({keys.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    if arrays is not None:
        content[keys.ARRAYS] = arrays if isinstance(arrays, ArrayRecord) else encode_adapter(arrays)
    return Message(content, reply_to=instr)


def _b(value: float) -> dict[str, torch.Tensor]:
    return {B: torch.full((4, 2), value)}


def test_every_malformed_reply_is_dropped_and_the_round_completes() -> None:
    # ffa (the default): replies carry lora_B only.
    s = _strategy()
    replies = [
        _reply(1, _b(1.0), _metrics()),  # valid
        _reply(2, _b(3.0), _metrics(**{keys.NUM_EXAMPLES: 30})),  # valid
        _reply(3, {"other.lora_B.weight": torch.zeros(4, 2)}, _metrics()),  # wrong key
        _reply(4, {B: torch.zeros(4, 3)}, _metrics()),  # wrong shape
        _reply(5, {B: torch.full((4, 2), float("nan"))}, _metrics()),  # NaN
        _reply(6, _b(100.0), _metrics()),  # update norm 282 > 10
        _reply(7, _b(1.0), {keys.STATUS: 0, keys.LOCAL_STEPS: 2}),  # missing num-examples
        _reply(8, None, {keys.STATUS: keys.STATUS_BUDGET_EXHAUSTED, keys.EPSILON: 8.0}),  # budget exhausted
        _reply(9, _b(1.0), _metrics(**{"patient.age-mean": 61.5})),  # a metric outside the whitelist
        _reply(10, ArrayRecord({B: Array(np.zeros((4, 2), np.int64))}), _metrics()),  # integer tensor
        _reply(11, _b(1.0), _metrics(**{keys.D_COUNT: [1.0]})),  # per-domain list of the wrong length
    ]
    replies.append(Message(Error(code=1, reason="boom"), reply_to=replies[0]))  # an error reply
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    out = {k: v.float() for k, v in arrays.to_torch_state_dict().items()}
    # FedAvg by examples over the two valid replies: (10 * 1 + 30 * 3) / 40 = 2.5
    assert torch.allclose(out[B], torch.full((4, 2), 2.5))
    assert torch.equal(out[A], torch.ones(2, 3))  # A frozen in ffa
    assert metrics["accepted"] == 2
    assert s.rejected_total == 9  # 3..7, 9, 10, 11 and the error reply
    # Federation-wide domain counts come from the valid replies only: 6 + 6 and 4 + 4;
    # the mean rewards are unknown until an evaluation.
    assert s.domain_count == {"cxr": 12.0, "ecg": 8.0}
    assert s.domain_means() == {"cxr": -1.0, "ecg": -1.0}


def test_round_without_enough_valid_replies_keeps_the_adapter() -> None:
    s = _strategy(**{"federation.min_replies": 2})
    arrays, _ = s.aggregate_train(1, [_reply(1, _b(1.0), _metrics()), _reply(2, {B: torch.zeros(9, 9)}, _metrics())])
    assert arrays is None
    assert torch.equal(s.global_adapter[B], torch.zeros(4, 2))


def test_domain_weighting_uses_the_federation_temperatures() -> None:
    s = _strategy(**{"aggregation.weighting": "domain"})
    s.domain_mu = {"cxr": 0.5, "ecg": 0.5}  # as after an evaluation
    # Hospital 1 holds only cxr, hospital 2 only ecg: N = {cxr: 6, ecg: 4},
    # T_cxr = sqrt(6) * 0.5, T_ecg = sqrt(4) * 0.5 = 1.
    r1 = _reply(1, _b(1.0), _metrics(**{keys.D_COUNT: [6.0, 0.0]}))
    r2 = _reply(2, _b(3.0), _metrics(**{keys.D_COUNT: [0.0, 4.0]}))
    arrays, _ = s.aggregate_train(1, [r1, r2])
    w1 = 6 / (math.sqrt(6) * 0.5)
    w2 = 4 / 1.0
    expected = (w1 * 1.0 + w2 * 3.0) / (w1 + w2)
    got = arrays.to_torch_state_dict()[B].float()  # type: ignore[union-attr]
    assert torch.allclose(got, torch.full((4, 2), expected), atol=1e-6)


def test_a_noisy_count_is_clamped_once_and_replaced_not_accumulated() -> None:
    s = _strategy()
    s.aggregate_train(1, [_reply(1, _b(1.0), _metrics(**{keys.D_COUNT: [5.0, -2.0]}))])
    s.aggregate_train(2, [_reply(1, _b(1.0), _metrics(**{keys.D_COUNT: [5.0, -2.0]}))])
    assert s.domain_count == {"cxr": 5.0, "ecg": 0.0}  # the hospital's latest value, clamped at 0


def test_evaluation_sets_the_domain_means() -> None:
    s = _strategy()
    m = {keys.STATUS: 0, keys.NUM_EXAMPLES: 30, keys.E_RECORDS: [10.0, 20.0], keys.E_MEAN_REWARD: [0.2, 0.8],
         **{k: [0.0, 0.0] for k in keys.EVAL_PER_DOMAIN if k not in (keys.E_RECORDS, keys.E_MEAN_REWARD)}}
    m2 = {**m, keys.E_RECORDS: [30.0, 0.0], keys.E_MEAN_REWARD: [0.6, 0.0]}
    instr = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=MessageType.EVALUATE)
             for n in (1, 2)]
    replies = [Message(RecordDict({keys.METRICS: MetricRecord(mm)}), reply_to=i) for mm, i in zip((m, m2), instr)]
    s.aggregate_evaluate(1, replies)
    # cxr: (10 * 0.2 + 30 * 0.6) / 40 = 0.5; ecg: only hospital 1 holds it: 0.8
    assert s.domain_means() == pytest.approx({"cxr": 0.5, "ecg": 0.8})


def test_instruction_broadcasts_domain_stats_and_tunable_hparams() -> None:
    s = _strategy()
    s.hospital_counts = {"hospital-0": [6.0, 0.0], "hospital-1": [4.0, 0.0]}
    s.domain_mu = {"cxr": 0.4, "ecg": -1.0}
    values = dict(s._instruction(3))
    assert values[keys.DOMAIN_NAMES] == DOMAINS
    assert values[keys.DOMAIN_COUNT] == [10.0, 0.0]
    assert values[keys.DOMAIN_MEAN] == [0.4, -1.0]
    assert values[keys.SERVER_ROUND] == 3
    assert values[keys.ONLY_B] is True
    hps = {k for k in values if k.startswith(keys.HPARAM_PREFIX)}
    assert hps == {keys.HPARAM_PREFIX + k for k in keys.TUNABLE}
    assert not any("privacy" in k or "data" in k for k in values)
