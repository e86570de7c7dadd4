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
    """Examples weighting without a cap unless ``over`` says otherwise."""
    over = {"aggregation.weighting": "examples", "aggregation.weight_cap": 0, **over}
    words = ["federation.domains=[cxr,ecg]", "federation.max_update_norm=10"]
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


def test_noisy_counts_are_summed_then_clamped() -> None:
    """N_d and the domain weights sum the hospitals' signed noisy counts before clamping.

    True counts: hospital 1 holds 100 cxr, hospital 2 holds 25 ecg; mu = 0.5 for both, so
    T = (sqrt(100) * 0.5, sqrt(25) * 0.5) = (5, 2.5) and the noiseless weights are
    100/5 : 25/2.5 = 20 : 10 = 2/3, 1/3. The DP noise is zero-sum per domain here:
    hospital 1 reports [116, -8], hospital 2 [-16, 33]. Summed, N = (100, 25) exactly and
    the weights are (116/5 - 8/2.5) : (-16/5 + 33/2.5) = 20 : 10 again. Clamping each
    count first made N = (116, 33) and dropped the negative terms: weights
    116/(sqrt(116) * 0.5) : 33/(sqrt(33) * 0.5) = 21.54 : 11.49 = 0.652 : 0.348.
    """
    s = _strategy(**{"aggregation.weighting": "domain"})
    s.domain_mu = {"cxr": 0.5, "ecg": 0.5}
    replies = [_reply(1, _b(0.0), _metrics(**{keys.SITE_PARTITION: 0, keys.D_COUNT: [116.0, -8.0]})),
               _reply(2, _b(3.0), _metrics(**{keys.SITE_PARTITION: 1, keys.D_COUNT: [-16.0, 33.0]}))]
    arrays, _ = s.aggregate_train(1, replies)
    assert s.domain_count == {"cxr": 100.0, "ecg": 25.0}
    assert s.temperatures() == pytest.approx({"cxr": 5.0, "ecg": 2.5})
    # B = 2/3 * 0 + 1/3 * 3 = 1
    assert torch.allclose(arrays.to_torch_state_dict()[B].float(), torch.ones(4, 2), atol=1e-6)  # type: ignore[union-attr]
    # A domain whose counts sum below 0 has N_d = 0, not a negative count.
    s.hospital_counts = {"hospital-0": [3.0, -2.0], "hospital-1": [-1.0, 1.0]}
    assert s.domain_count == {"cxr": 2.0, "ecg": 0.0}


def test_a_zero_reward_domain_is_bounded_by_the_floor_and_the_default_cap() -> None:
    """Held-out mean 0: T_d = sqrt(N) * 0.1 (not 1e-6), and no hospital above weight 0.5.

    Hospital 1 holds 100 cxr (mu 0), hospitals 2 and 3 100 ecg each (mu 0.5):
    T_cxr = 10 * 0.1 = 1, T_ecg = sqrt(200) * 0.5 = 7.0710678. Raw weights 100/1 = 100
    and 100/7.0710678 = 14.142136 each: uncapped 100/128.28427 = 0.7795 and 0.1102 each;
    with the default cap 0.5: 0.5, 0.25, 0.25. (T_cxr = 1e-6 gave hospital 1 ~1.)
    """
    counts = [[100.0, 0.0], [0.0, 100.0], [0.0, 100.0]]
    replies = [_reply(n, _b(v), _metrics(**{keys.SITE_PARTITION: n, keys.D_COUNT: c}))
               for n, v, c in zip((1, 2, 3), (1.0, 3.0, 3.0), counts, strict=True)]
    uncapped = _strategy(**{"aggregation.weighting": "domain"})
    uncapped.domain_mu = {"cxr": 0.0, "ecg": 0.5}
    arrays, _ = uncapped.aggregate_train(1, replies)
    assert uncapped.temperatures() == pytest.approx({"cxr": 1.0, "ecg": math.sqrt(200) * 0.5})
    w1 = 100 / (100 + 2 * 100 / (math.sqrt(200) * 0.5))  # 0.7795
    expected = w1 * 1.0 + (1 - w1) * 3.0
    assert torch.allclose(arrays.to_torch_state_dict()[B].float(), torch.full((4, 2), expected), atol=1e-6)  # type: ignore[union-attr]
    # The default configuration (domain weighting, default cap).
    default = FedClimbStrategy(load_config(overrides=["federation.domains=[cxr,ecg]", "federation.max_update_norm=10"]),
                               {A: torch.ones(2, 3), B: torch.zeros(4, 2)})
    assert default.cfg.aggregation.weighting == "domain"
    default.domain_mu = {"cxr": 0.0, "ecg": 0.5}
    arrays, _ = default.aggregate_train(1, replies)
    # 0.5 * 1 + 0.25 * 3 + 0.25 * 3 = 2
    assert torch.allclose(arrays.to_torch_state_dict()[B].float(), torch.full((4, 2), 2.0), atol=1e-6)  # type: ignore[union-attr]


def test_a_domain_without_statistics_gets_the_mean_temperature() -> None:
    """The server's fallback is the hospitals' DRPO fallback: the mean known T_d (1 if none)."""
    s = _strategy(**{"federation.domains": "[cxr,ecg,eeg]"})
    assert s.temperatures() == {"cxr": 1.0, "ecg": 1.0, "eeg": 1.0}  # nothing known yet
    s.hospital_counts = {"hospital-0": [16.0, 36.0, 5.0]}
    s.domain_mu = {"cxr": 0.5, "ecg": 0.5, "eeg": -1.0}  # eeg not evaluated yet
    # cxr: 4 * 0.5 = 2, ecg: 6 * 0.5 = 3, eeg: (2 + 3) / 2 = 2.5
    assert s.temperatures() == pytest.approx({"cxr": 2.0, "ecg": 3.0, "eeg": 2.5})


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


# --------------------------------------------------------------------------- hostile values


def _eval_reply(node: int, metrics: dict[str, object]) -> Message:
    instr = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.EVALUATE)
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=instr)  # type: ignore[arg-type]


def _eval_metrics(reward: list[float], records: list[float]) -> dict[str, object]:
    return {keys.STATUS: 0, keys.NUM_EXAMPLES: 8, keys.E_RECORDS: records, keys.E_MEAN_REWARD: reward,
            **{k: [0.5, 0.5] for k in keys.EVAL_PER_DOMAIN if k not in (keys.E_RECORDS, keys.E_MEAN_REWARD)}}


def test_a_partial_or_out_of_range_evaluation_is_dropped_not_fatal() -> None:
    s = _strategy()
    partial = {keys.STATUS: 0, keys.NUM_EXAMPLES: 1, keys.E_RECORDS: [5.0, 0.0]}  # no per-domain results
    huge = _eval_metrics([1.0, 1.0], [1e308, 1e308])  # would make mu = inf / inf = NaN
    rate = {**_eval_metrics([0.3, 0.3], [5.0, 5.0]), keys.E_BALANCED_ACCURACY: [7.0, 0.5]}  # a rate above 1
    good = _eval_metrics([0.25, 0.75], [4.0, 4.0])
    s.aggregate_evaluate(1, [_eval_reply(n, m) for n, m in ((1, partial), (2, huge), (3, rate), (4, good))])
    assert s.domain_means() == {"cxr": 0.25, "ecg": 0.75}  # the one complete, plausible reply


def test_implausible_counts_and_step_counts_are_rejected() -> None:
    s = _strategy(**{"aggregation.fednova": "true", "train.steps": 4})
    replies = [
        _reply(1, _b(1.0), _metrics()),
        _reply(2, _b(1.0), _metrics(**{keys.D_COUNT: [1e308, 1.0]})),  # would overflow N_d to inf
        _reply(3, _b(1.0), _metrics(**{keys.NUM_EXAMPLES: 2**62})),  # would take all the weight
        _reply(4, _b(1.0), _metrics(**{keys.LOCAL_STEPS: 2**62})),  # would scale FedNova's update
        _reply(5, _b(1.0), _metrics(**{keys.LOCAL_STEPS: 5})),  # more steps than asked for (4)
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics["accepted"] == 1
    assert s.rejected_total == 4
    assert s.domain_count == {"cxr": 6.0, "ecg": 4.0}
    assert torch.allclose(arrays.to_torch_state_dict()[B].float(), torch.ones(4, 2))


def test_a_node_cannot_speak_for_another_hospital_or_for_several() -> None:
    s = _strategy()
    as_zero = {keys.SITE_PARTITION: 0, keys.D_COUNT: [100.0, 0.0]}
    s.aggregate_train(1, [_reply(1, _b(1.0), _metrics(**as_zero)),
                          _reply(2, _b(1.0), _metrics(**{keys.SITE_PARTITION: 0, keys.D_COUNT: [50.0, 0.0]}))])
    assert s.domain_count == {"cxr": 100.0, "ecg": 0.0}  # node 2's claim to hospital-0 was refused
    s.aggregate_train(2, [_reply(1, _b(1.0), _metrics(**{keys.SITE_PARTITION: 1, keys.D_COUNT: [100.0, 0.0]}))])
    assert s.domain_count == {"cxr": 100.0, "ecg": 0.0}  # node 1 cannot add its counts again as hospital-1
    assert s.rejected_total == 2
    s.aggregate_train(3, [_reply(1, _b(1.0), _metrics(**{keys.SITE_PARTITION: 0, keys.D_COUNT: [80.0, 0.0]}))])
    assert s.domain_count == {"cxr": 80.0, "ecg": 0.0}  # its own name: the latest value replaces the old


def test_an_infeasible_cap_is_relaxed_over_the_hospitals_that_have_weight() -> None:
    """Examples [5, 5, 0] with cap 0.4: only two hospitals can share; 1/2 each, not a skipped round."""
    s = _strategy(**{"aggregation.weight_cap": 0.4})
    replies = [_reply(1, _b(1.0), _metrics(**{keys.NUM_EXAMPLES: 5})),
               _reply(2, _b(3.0), _metrics(**{keys.NUM_EXAMPLES: 5})),
               _reply(3, _b(2.0), _metrics(**{keys.NUM_EXAMPLES: 0}))]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics["accepted"] == 3
    assert torch.allclose(arrays.to_torch_state_dict()[B].float(), torch.full((4, 2), 2.0))


def test_domain_weighting_rejects_a_reply_without_counts_instead_of_switching_off() -> None:
    s = _strategy(**{"aggregation.weighting": "domain"})
    no_counts = {k: v for k, v in _metrics().items() if k != keys.D_COUNT}
    arrays, metrics = s.aggregate_train(1, [_reply(1, _b(1.0), _metrics(**{keys.D_COUNT: [6.0, 0.0]})),
                                            _reply(2, _b(3.0), _metrics(**{keys.D_COUNT: [0.0, 4.0]})),
                                            _reply(3, _b(1.0), no_counts)])
    assert metrics is not None and metrics["accepted"] == 2 and s.rejected_total == 1
    # T = 1 for both domains before any evaluation: weights 6 and 4 -> (6 * 1 + 4 * 3) / 10 = 1.8
    assert torch.allclose(arrays.to_torch_state_dict()[B].float(), torch.full((4, 2), 1.8))  # type: ignore[union-attr]


def test_a_reply_with_extra_records_is_rejected() -> None:
    """Only the adapter and the whitelisted metrics may travel: a side channel is refused."""
    s = _strategy()
    smuggler = _reply(2, _b(3.0), _metrics())
    smuggler.content["notes"] = ConfigRecord({"patient": "Jane Doe"})
    second = _reply(3, _b(3.0), _metrics())
    second.content["more"] = MetricRecord({"x": 1.0})
    arrays, metrics = s.aggregate_train(1, [_reply(1, _b(1.0), _metrics()), smuggler, second])
    assert metrics is not None and metrics["accepted"] == 1 and s.rejected_total == 2
    assert torch.allclose(arrays.to_torch_state_dict()[B].float(), torch.ones(4, 2))  # type: ignore[union-attr]


def test_messages_live_as_long_as_the_round_waits() -> None:
    s = _strategy(**{"federation.round_timeout_s": 86400})

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [3, 1]

    msgs = list(s.configure_train(1, encode_adapter(s.global_adapter), ConfigRecord(), Grid()))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 3]
    assert all(m.metadata.ttl == 86400 for m in msgs)
