"""Replies of a hospital that refused an instruction (status 4) or an evaluation (status 5)."""

from __future__ import annotations

import pytest
import torch

from common import keys
from server.strategy import EVAL_METRICS, TRAIN_METRICS
from server.validation import REFUSALS, STATUS_EVAL_LIMIT, STATUS_REFUSED, validate_metrics_reply, validate_reply

ADAPTER = {"w.lora_B.weight": torch.zeros(2, 2)}


def _train(arrays: dict[str, torch.Tensor] | None, metrics: dict[str, object]):
    return validate_reply(arrays, metrics, expected={"w.lora_B.weight": ((2, 2), torch.float32)},
                          allowed_metric_keys=TRAIN_METRICS, max_update_norm=None, global_adapter=ADAPTER,
                          num_domains=1)


def test_the_status_codes_agree_with_the_hospitals() -> None:
    assert (STATUS_REFUSED, STATUS_EVAL_LIMIT) == (keys.STATUS_REFUSED, keys.STATUS_EVAL_LIMIT)
    assert set(REFUSALS) == {keys.STATUS_REFUSED, keys.STATUS_EVAL_LIMIT}


@pytest.mark.parametrize("status", [keys.STATUS_REFUSED, keys.STATUS_EVAL_LIMIT])
def test_a_bare_refusal_is_refused_not_malformed(status: int) -> None:
    """Status alone: a well-formed reply with nothing to aggregate, and a reason saying why."""
    for verdict in (_train(None, {keys.STATUS: status}),
                    validate_metrics_reply({keys.STATUS: status}, allowed_metric_keys=EVAL_METRICS, num_domains=1)):
        assert not verdict.ok and verdict.status == "refused"
        assert verdict.reason is not None and f"status={status}" in verdict.reason


def test_a_refusal_carrying_anything_else_is_rejected() -> None:
    """'Nothing else is sent': tensors or metrics beside a refusal status make a malformed reply."""
    assert _train(dict(ADAPTER), {keys.STATUS: keys.STATUS_REFUSED}).status == "rejected"
    assert _train(None, {keys.STATUS: keys.STATUS_REFUSED, keys.NUM_EXAMPLES: 3}).status == "rejected"
    verdict = validate_metrics_reply({keys.STATUS: keys.STATUS_EVAL_LIMIT, keys.NUM_EXAMPLES: 3},
                                     allowed_metric_keys=EVAL_METRICS, num_domains=1)
    assert verdict.status == "rejected"
