"""Validation of one client's training reply before it may be aggregated.

The server trusts nothing a hospital sends. :func:`validate_reply` checks the decoded
adapter tensors and the metrics of one reply and returns a :class:`ReplyVerdict`
instead of raising, so that a malformed reply is dropped (and logged by the caller)
while the round goes on. Checks stop at the first problem; the verdict's reason is
one line naming it.

The metric whitelist is data, not code: the caller maps each allowed metric name to a
:class:`MetricSpec`. This module knows a single metric name, the status key
(``STATUS_KEY``), whose value says whether the client trained at all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from common.keys import STATUS_EVAL_LIMIT, STATUS_REFUSED
from server.aggregation import update_norm

logger = logging.getLogger(__name__)

MetricKind = Literal["int", "float", "per_domain_float", "per_domain_int"]
ReplyStatus = Literal["ok", "budget_exhausted", "refused", "rejected"]

#: Metric with the client's status code; implicitly allowed, of kind "int".
STATUS_KEY = "status"
#: Status code of a client that trained and sends an update.
STATUS_OK = 0
#: Status code of a client whose privacy budget is spent: it sends no tensors.
STATUS_BUDGET_EXHAUSTED = 1
#: Status codes of a client that refused the instruction before spending anything, and
#: why (its log says which check failed); such a reply carries the status and nothing else
#: (STATUS_REFUSED, STATUS_EVAL_LIMIT from common.keys).
REFUSALS = {
    STATUS_REFUSED: "the hospital refused the instruction (an invalid value or adapter; its log says which)",
    STATUS_EVAL_LIMIT: "the hospital's evaluation limits are reached",
}

#: At most this many names are listed in a reason.
MAX_NAMES_IN_REASON = 3
#: Client-supplied text is quoted in a reason up to this many characters.
MAX_QUOTED_CHARS = 80

_KINDS = ("int", "float", "per_domain_float", "per_domain_int")


@dataclass(frozen=True)
class MetricSpec:
    """What one allowed metric must look like.

    Attributes
    ----------
    kind : {"int", "float", "per_domain_float", "per_domain_int"}
        ``int``: a Python int. ``float``: an int or float. ``per_domain_*``: a list of
        exactly ``num_domains`` such numbers. Bools, strings, bytes and nested lists
        never qualify, and every number must be finite.
    required : bool
        Whether a reply that carries an update must include the metric.
    low, high : float | None
        Inclusive bounds on every number of the metric (None: unbounded). Counts and
        rates have natural bounds; a value outside them is hostile or broken, and
        unbounded counts could overflow the server's sums.
    """

    kind: MetricKind
    required: bool = False
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        """Reject an unknown kind or empty bounds."""
        if self.kind not in _KINDS:
            raise ValueError(
                f"`MetricSpec.kind` must be one of {_KINDS}, got {self.kind!r}."
            )
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"`MetricSpec` bounds are empty: low {self.low} > high {self.high}.")


@dataclass(frozen=True)
class ReplyVerdict:
    """Outcome of :func:`validate_reply`.

    Attributes
    ----------
    ok : bool
        True only when the reply may be aggregated (``status == "ok"``).
    reason : str | None
        One line saying why the reply is not aggregated; None when ``ok``.
    status : {"ok", "budget_exhausted", "rejected"}
        ``budget_exhausted`` is a well-formed reply from a client whose privacy budget
        is spent: not an error, but nothing to aggregate. ``refused``: the client
        refused the instruction before spending anything (a status of ``REFUSALS``,
        nothing else in the reply). ``rejected`` is malformed.
    """

    ok: bool
    reason: str | None
    status: ReplyStatus


def expected_from_adapter(
    adapter: Mapping[str, torch.Tensor], *, keys: Collection[str] | None = None
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Build the ``expected`` argument of :func:`validate_reply` from an adapter.

    Parameters
    ----------
    adapter : Mapping[str, torch.Tensor]
        Usually the global adapter.
    keys : Collection[str] | None
        Names a reply must carry (e.g. only the lora_B names in ``ffa`` mode).
        Default: all of ``adapter``.

    Returns
    -------
    dict[str, tuple[tuple[int, ...], torch.dtype]]
        Shape and dtype per name, in the adapter's order.
    """
    names = list(adapter) if keys is None else [k for k in adapter if k in set(keys)]
    return {name: (tuple(adapter[name].shape), adapter[name].dtype) for name in names}


def validate_reply(
    arrays: Mapping[str, torch.Tensor] | None,
    metrics: Mapping[str, object] | None,
    *,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    allowed_metric_keys: Mapping[str, MetricSpec],
    required_metric_keys: Collection[str] = frozenset(),
    max_update_norm: float | None,
    global_adapter: Mapping[str, torch.Tensor],
    num_domains: int,
    status_key: str = STATUS_KEY,
) -> ReplyVerdict:
    """Check one decoded training reply.

    In order: the status metric; for a refusal (``REFUSALS``) only that nothing else
    was sent; for a budget-exhausted reply (status 1, no tensors) only the metric
    types; otherwise tensor names, shapes, dtype family, finiteness,
    update norm, then metric names and types.

    Parameters
    ----------
    arrays : Mapping[str, torch.Tensor] | None
        Decoded adapter tensors of the reply (None or empty when none were sent).
    metrics : Mapping[str, object] | None
        The reply's metrics (a Flower ``MetricRecord`` is a mapping).
    expected : Mapping[str, tuple[tuple[int, ...], torch.dtype]]
        Name to (shape, dtype) of every tensor the reply must carry, and no others.
        A floating dtype accepts any floating dtype (the wire may send fp16/bf16);
        any other dtype must match exactly.
    allowed_metric_keys : Mapping[str, MetricSpec]
        Metric whitelist; ``status_key`` is always allowed as an int.
    required_metric_keys : Collection[str]
        Extra names to require on top of ``MetricSpec.required``; each must be in
        ``allowed_metric_keys``.
    max_update_norm : float | None
        Largest allowed L2 norm of ``arrays - global_adapter`` over the reply's
        tensors; None disables the check.
    global_adapter : Mapping[str, torch.Tensor]
        Current global adapter, the reference of the update norm.
    num_domains : int
        Length of every per-domain metric list.
    status_key : str
        Name of the status metric.

    Returns
    -------
    ReplyVerdict
        ``ok`` / ``budget_exhausted`` / ``rejected`` with a one-line reason.

    Raises
    ------
    ValueError
        Only for a server-side configuration mistake: a required metric missing from
        the whitelist, or (with ``max_update_norm``) no expected tensor in
        ``global_adapter``.
    """
    unknown_required = sorted(set(required_metric_keys) - set(allowed_metric_keys))
    if unknown_required:
        raise ValueError(
            f"`required_metric_keys` {unknown_required} are missing from "
            f"`allowed_metric_keys`; add a MetricSpec for each."
        )
    specs = {status_key: MetricSpec("int"), **allowed_metric_keys}
    required = set(required_metric_keys) | {k for k, s in specs.items() if s.required}
    metrics = {} if metrics is None else metrics

    status = metrics.get(status_key, STATUS_OK)
    if type(status) is int and status in REFUSALS:
        return _refusal(status, metrics, has_arrays=bool(arrays), status_key=status_key)
    if type(status) is not int or status not in (STATUS_OK, STATUS_BUDGET_EXHAUSTED):
        return _reject(
            f"metric {status_key!r} is {_quote(status)}, expected {STATUS_OK} "
            f"(trained), {STATUS_BUDGET_EXHAUSTED} (budget exhausted) or one of {sorted(REFUSALS)} (refused)"
        )
    if status == STATUS_BUDGET_EXHAUSTED:
        if arrays:
            return _reject(
                f"reply has status {STATUS_BUDGET_EXHAUSTED} (budget exhausted) but "
                f"carries {len(arrays)} tensors"
            )
        reason = _check_metrics(metrics, specs, required=set(), num_domains=num_domains)
        if reason is not None:
            return _reject(reason)
        return ReplyVerdict(
            ok=False,
            reason=f"privacy budget exhausted ({status_key}={status}); no update",
            status="budget_exhausted",
        )

    reason = _check_tensors(
        arrays, expected, max_update_norm=max_update_norm, global_adapter=global_adapter
    )
    if reason is None:
        reason = _check_metrics(
            metrics, specs, required=required, num_domains=num_domains
        )
    if reason is not None:
        return _reject(reason)
    return ReplyVerdict(ok=True, reason=None, status="ok")


def validate_metrics_reply(
    metrics: Mapping[str, object] | None,
    *,
    allowed_metric_keys: Mapping[str, MetricSpec],
    num_domains: int,
    has_arrays: bool = False,
    status_key: str = STATUS_KEY,
) -> ReplyVerdict:
    """Check a reply that must carry metrics only (e.g. an evaluation reply).

    Any tensor is a rejection (an evaluation never sends weights); the status must be a
    known code; metric names and types follow ``allowed_metric_keys``.
    """
    if has_arrays:
        return _reject("an evaluation reply must not carry tensors")
    specs = {status_key: MetricSpec("int"), **allowed_metric_keys}
    metrics = {} if metrics is None else metrics
    status = metrics.get(status_key, STATUS_OK)
    if type(status) is int and status in REFUSALS:
        return _refusal(status, metrics, has_arrays=has_arrays, status_key=status_key)
    if type(status) is not int or status not in (STATUS_OK, STATUS_BUDGET_EXHAUSTED):
        return _reject(f"metric {status_key!r} is {_quote(status)}, expected {STATUS_OK}, "
                       f"{STATUS_BUDGET_EXHAUSTED} or one of {sorted(REFUSALS)}")
    required = {k for k, spec in specs.items() if spec.required}
    reason = _check_metrics(metrics, specs, required=required, num_domains=num_domains)
    if reason is not None:
        return _reject(reason)
    return ReplyVerdict(ok=True, reason=None, status="ok")


def _refusal(status: int, metrics: Mapping[str, object], *, has_arrays: bool, status_key: str) -> ReplyVerdict:
    """The verdict on a reply with a refusal status: well-formed only with nothing but the status."""
    if has_arrays:
        return _reject(f"reply has status {status} (refused) but carries tensors")
    extra = [key for key in metrics if key != status_key]
    if extra:
        return _reject(f"reply has status {status} (refused) but carries metrics {_some(extra)}")
    return ReplyVerdict(ok=False, reason=f"{REFUSALS[status]} ({status_key}={status}); nothing else was sent",
                        status="refused")


def _reject(reason: str) -> ReplyVerdict:
    """A rejected verdict; logged at DEBUG since the caller names the node."""
    logger.debug("reply rejected: %s", reason)
    return ReplyVerdict(ok=False, reason=reason, status="rejected")


def _check_tensors(
    arrays: Mapping[str, torch.Tensor] | None,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    max_update_norm: float | None,
    global_adapter: Mapping[str, torch.Tensor],
) -> str | None:
    """Return the first tensor problem, or None."""
    if not arrays:
        return "reply carries no tensors"
    missing = [name for name in expected if name not in arrays]
    unexpected = [name for name in arrays if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        return "tensor names differ from the expected ones: " + "; ".join(parts)
    for name, (shape, dtype) in expected.items():
        tensor = arrays[name]
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            kind = type(tensor).__name__
            return f"tensor {name!r} is a {kind}, expected a dense torch.Tensor"
        if tuple(tensor.shape) != tuple(shape):
            return (
                f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(shape)}"
            )
        if not _same_dtype_family(tensor.dtype, dtype):
            return f"tensor {name!r} has dtype {tensor.dtype}, expected {dtype}"
    for name in expected:
        if not bool(torch.isfinite(arrays[name]).all()):
            return f"tensor {name!r} contains NaN or Inf"
    if max_update_norm is not None:
        shared = [name for name in expected if name in global_adapter]
        norm = update_norm(global_adapter, arrays, keys=shared)
        if norm > max_update_norm:
            return f"update norm {norm:.6g} exceeds the limit {max_update_norm:.6g}"
    return None


def _same_dtype_family(got: torch.dtype, want: torch.dtype) -> bool:
    """Floating dtypes form one family; any other dtype must match exactly."""
    if want.is_floating_point:
        return got.is_floating_point
    return got == want


def _check_metrics(
    metrics: Mapping[str, object],
    specs: Mapping[str, MetricSpec],
    *,
    required: set[str],
    num_domains: int,
) -> str | None:
    """Return the first metric problem, or None."""
    missing = sorted(required - set(metrics))
    if missing:
        return f"missing required metrics {_some(missing)}"
    unknown = [key for key in metrics if key not in specs]
    if unknown:
        return f"metrics {_some(unknown)} are not in the whitelist"
    for key, value in metrics.items():
        problem = _metric_problem(value, specs[key], num_domains=num_domains)
        if problem is not None:
            return f"metric {key!r} {problem}"
    return None


def _metric_problem(value: object, spec: MetricSpec, *, num_domains: int) -> str | None:
    """Describe how ``value`` fails ``spec``, or return None if it fits."""
    kind = spec.kind
    if kind in ("int", "float"):
        return _number_problem(value, integer=kind == "int", low=spec.low, high=spec.high)
    if not isinstance(value, list | tuple):
        kind_name = type(value).__name__
        return f"has type {kind_name}, expected a list of {num_domains} numbers"
    if len(value) != num_domains:
        return f"has {len(value)} entries, expected {num_domains} (one per domain)"
    for i, item in enumerate(value):
        problem = _number_problem(item, integer=kind == "per_domain_int", low=spec.low, high=spec.high)
        if problem is not None:
            return f"entry {i} {problem}"
    return None


def _number_problem(
    value: object, *, integer: bool, low: float | None = None, high: float | None = None
) -> str | None:
    """Describe how ``value`` fails to be a finite int (or float) in [low, high], or None."""
    # bool is a subclass of int but never a valid metric value.
    allowed: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        expected = "int" if integer else "float"
        return f"has type {type(value).__name__}, expected {expected}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value!r}, expected a finite number"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"is {_quote(value)}, outside [{low}, {high}]"
    return None


def _some(names: Sequence[object]) -> str:
    """The first few names, quoted, with a count of the rest."""
    shown = ", ".join(_quote(n) for n in names[:MAX_NAMES_IN_REASON])
    rest = len(names) - MAX_NAMES_IN_REASON
    return f"{shown} and {rest} more" if rest > 0 else shown


def _quote(value: object) -> str:
    """``repr(value)`` (one line: newlines are escaped), cut to MAX_QUOTED_CHARS."""
    text = repr(value)
    if len(text) <= MAX_QUOTED_CHARS:
        return text
    return text[:MAX_QUOTED_CHARS] + f"... ({len(text)} chars)"
