"""Tests for server.validation: one test per kind of malformed reply."""

from __future__ import annotations

import pytest
import torch

from server.validation import (
    MetricSpec,
    ReplyVerdict,
    expected_from_adapter,
    validate_reply,
)

A = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"
GLOBAL = {A: torch.zeros(2, 8), B: torch.zeros(4, 2)}
SPECS = {
    "num-examples": MetricSpec("int", required=True),
    "train/loss": MetricSpec("float"),
    "domain/counts": MetricSpec("per_domain_int"),
    "domain/reward": MetricSpec("per_domain_float"),
}
NUM_DOMAINS = 3


def good_arrays() -> dict[str, torch.Tensor]:
    """A well-formed update: A += 0.1, B += 0.1 (norm sqrt(24 * 0.01) ~ 0.49)."""
    return {A: torch.full((2, 8), 0.1), B: torch.full((4, 2), 0.1)}


def good_metrics() -> dict[str, object]:
    """Well-formed metrics for three domains."""
    return {
        "num-examples": 12,
        "train/loss": 0.5,
        "domain/counts": [4, 8, 0],
        "domain/reward": [0.1, 0.2, 0.3],
    }


def check(
    arrays: dict[str, torch.Tensor] | None,
    metrics: dict[str, object] | None,
    *,
    max_update_norm: float | None = 10.0,
) -> ReplyVerdict:
    """validate_reply with the fixture's expectations."""
    return validate_reply(
        arrays,
        metrics,
        expected=expected_from_adapter(GLOBAL),
        allowed_metric_keys=SPECS,
        required_metric_keys={"num-examples"},
        max_update_norm=max_update_norm,
        global_adapter=GLOBAL,
        num_domains=NUM_DOMAINS,
    )


def assert_rejected(verdict: ReplyVerdict, *fragments: str) -> None:
    """The verdict is a rejection whose one-line reason contains every fragment."""
    assert (verdict.ok, verdict.status) == (False, "rejected")
    assert verdict.reason is not None and "\n" not in verdict.reason
    for fragment in fragments:
        assert fragment in verdict.reason


# ---------------------------------------------------------------------------
# Valid replies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_valid_reply_in_any_float_precision(dtype: torch.dtype) -> None:
    """fp32, fp16 and bf16 tensors are all accepted for fp32 expectations."""
    arrays = {k: v.to(dtype) for k, v in good_arrays().items()}
    verdict = check(arrays, good_metrics())
    assert verdict == ReplyVerdict(ok=True, reason=None, status="ok")


def test_optional_metrics_may_be_absent_and_status_zero_is_ok() -> None:
    """Only required metrics must be present; status 0 means trained."""
    verdict = check(good_arrays(), {"num-examples": 3, "status": 0})
    assert verdict.ok


def test_expected_from_adapter_restricts_to_keys() -> None:
    """In ffa mode only the B tensors are expected."""
    assert expected_from_adapter(GLOBAL, keys=[B]) == {B: ((4, 2), torch.float32)}


# ---------------------------------------------------------------------------
# Budget exhausted
# ---------------------------------------------------------------------------


def test_budget_exhausted_reply_is_not_an_error() -> None:
    """status 1 and no arrays: not aggregated, not rejected."""
    verdict = check(None, {"status": 1})
    assert (verdict.ok, verdict.status) == (False, "budget_exhausted")


def test_budget_exhausted_reply_with_tensors_is_rejected() -> None:
    """A client out of budget must not send an update."""
    assert_rejected(check(good_arrays(), {"status": 1, "num-examples": 2}), "status 1")


def test_unknown_status_is_rejected() -> None:
    """Only status 0 and 1 exist."""
    verdict = check(good_arrays(), {**good_metrics(), "status": 7})
    assert_rejected(verdict, "'status'", "7")


# ---------------------------------------------------------------------------
# Malformed tensors
# ---------------------------------------------------------------------------


def test_no_tensors_is_rejected() -> None:
    """A status-0 reply without tensors is malformed."""
    assert_rejected(check(None, good_metrics()), "no tensors")


def test_wrong_tensor_name_is_rejected() -> None:
    """A renamed tensor shows up as one missing and one unexpected name."""
    arrays = good_arrays()
    arrays["x.lora_B.weight"] = arrays.pop(B)
    verdict = check(arrays, good_metrics())
    assert_rejected(verdict, f"missing '{B}'", "unexpected 'x.lora_B.weight'")


def test_missing_tensor_is_rejected() -> None:
    """A dropped tensor is named."""
    arrays = good_arrays()
    del arrays[A]
    assert_rejected(check(arrays, good_metrics()), f"missing '{A}'")


def test_many_unexpected_names_are_truncated() -> None:
    """At most three names are listed, with a count of the rest."""
    arrays = {**good_arrays(), **{f"extra{i}": torch.zeros(1) for i in range(5)}}
    verdict = check(arrays, good_metrics())
    assert_rejected(verdict, "'extra0', 'extra1', 'extra2' and 2 more")


def test_wrong_shape_is_rejected() -> None:
    """The reason gives both shapes."""
    arrays = {**good_arrays(), B: torch.zeros(4, 3)}
    verdict = check(arrays, good_metrics())
    assert_rejected(verdict, f"tensor '{B}' has shape (4, 3), expected (4, 2)")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8])
def test_integer_dtype_is_rejected(dtype: torch.dtype) -> None:
    """Integer tensors are not in the float family."""
    arrays = {**good_arrays(), A: torch.zeros(2, 8, dtype=dtype)}
    assert_rejected(check(arrays, good_metrics()), f"tensor '{A}' has dtype {dtype}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_is_rejected(bad: float) -> None:
    """NaN and Inf anywhere are named by tensor."""
    arrays = good_arrays()
    arrays[B][3, 1] = bad
    assert_rejected(check(arrays, good_metrics()), f"tensor '{B}' contains NaN or Inf")


def test_huge_update_norm_is_rejected() -> None:
    """One entry moved by 100 gives norm 100 > 10."""
    arrays = {A: torch.zeros(2, 8), B: torch.zeros(4, 2)}
    arrays[B][0, 0] = 100.0
    verdict = check(arrays, good_metrics(), max_update_norm=10.0)
    assert_rejected(verdict, "update norm 100 exceeds the limit 10")


def test_update_norm_at_the_limit_is_accepted() -> None:
    """Entries 3 and 4 give norm exactly 5 <= 5."""
    arrays = {A: torch.zeros(2, 8), B: torch.zeros(4, 2)}
    arrays[A][0, 0], arrays[B][1, 1] = 3.0, 4.0
    assert check(arrays, good_metrics(), max_update_norm=5.0).ok
    assert not check(arrays, good_metrics(), max_update_norm=4.99).ok


def test_non_tensor_value_is_rejected() -> None:
    """A list where a tensor belongs is named."""
    arrays: dict[str, object] = {**good_arrays(), A: [[0.0] * 8] * 2}
    verdict = check(arrays, good_metrics())  # type: ignore[arg-type]
    assert_rejected(verdict, f"tensor '{A}' is a list")


# ---------------------------------------------------------------------------
# Malformed metrics
# ---------------------------------------------------------------------------


def test_missing_required_metric_is_rejected() -> None:
    """num-examples is required."""
    metrics = good_metrics()
    del metrics["num-examples"]
    verdict = check(good_arrays(), metrics)
    assert_rejected(verdict, "missing required metrics 'num-examples'")


def test_missing_metrics_record_is_rejected() -> None:
    """No metrics at all misses the required ones."""
    assert_rejected(check(good_arrays(), None), "'num-examples'")


def test_unknown_metric_is_rejected() -> None:
    """The whitelist is closed."""
    metrics = {**good_metrics(), "patient_id": 42}
    assert_rejected(check(good_arrays(), metrics), "'patient_id'", "whitelist")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("train/loss", "0.5", "has type str, expected float"),
        ("train/loss", b"\x00", "has type bytes, expected float"),
        ("train/loss", float("nan"), "expected a finite number"),
        ("train/loss", True, "has type bool"),
        ("num-examples", 12.0, "has type float, expected int"),
        ("domain/reward", [[0.1], [0.2], [0.3]], "entry 0 has type list"),
        ("domain/reward", [0.1, "x", 0.3], "entry 1 has type str"),
        ("domain/reward", 0.5, "expected a list of 3 numbers"),
        ("domain/counts", [1, 2.5, 3], "entry 1 has type float, expected int"),
    ],
)
def test_metric_of_wrong_type_is_rejected(
    key: str, value: object, fragment: str
) -> None:
    """Strings, bytes, bools, nested lists and non-finite numbers are rejected."""
    verdict = check(good_arrays(), {**good_metrics(), key: value})
    assert_rejected(verdict, f"metric '{key}'", fragment)


@pytest.mark.parametrize("length", [2, 4])
def test_per_domain_list_of_wrong_length_is_rejected(length: int) -> None:
    """Per-domain lists need exactly num_domains entries."""
    metrics = {**good_metrics(), "domain/reward": [0.1] * length}
    assert_rejected(check(good_arrays(), metrics), f"has {length} entries, expected 3")


def test_client_text_in_reason_is_one_short_line() -> None:
    """A hostile metric name cannot inject lines or flood the log."""
    name = "evil\n" + "x" * 1000
    verdict = check(good_arrays(), {**good_metrics(), name: 1})
    assert_rejected(verdict, "'evil\\nxxx", "chars)")
    assert verdict.reason is not None and len(verdict.reason) < 200


def test_budget_exhausted_reply_with_bad_metric_is_rejected() -> None:
    """Out-of-budget replies still obey the whitelist."""
    assert_rejected(check(None, {"status": 1, "note": "bye"}), "'note'")


def test_required_key_outside_whitelist_is_a_config_error() -> None:
    """A server misconfiguration raises instead of rejecting every client."""
    with pytest.raises(ValueError, match="'reward'"):
        validate_reply(
            good_arrays(),
            good_metrics(),
            expected=expected_from_adapter(GLOBAL),
            allowed_metric_keys=SPECS,
            required_metric_keys={"reward"},
            max_update_norm=None,
            global_adapter=GLOBAL,
            num_domains=NUM_DOMAINS,
        )


def test_metric_spec_rejects_unknown_kind() -> None:
    """MetricSpec validates its kind."""
    with pytest.raises(ValueError, match="'text'"):
        MetricSpec("text")  # type: ignore[arg-type]
