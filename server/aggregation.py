"""Aggregation math for LoRA adapters: client weights and the three merge modes.

An adapter is a ``dict[str, torch.Tensor]`` with PEFT state-dict names. A LoRA layer
is the pair ``<prefix>.lora_A.weight`` (shape (r, in)) and ``<prefix>.lora_B.weight``
(shape (out, r)); its update is ``scaling * B @ A`` with ``scaling = alpha / r`` equal
for every client, so the merge itself ignores it. Every other tensor is "linear": it
is averaged element-wise in every mode.

All merges are written in delta form around the current global adapter ``g``, which
lets FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization") normalise each client's update by its number
of local steps ``tau_k``::

    new = g + tau_eff * sum_k w_k (x_k - g) / tau_k,   tau_eff = sum_k w_k tau_k
        = c_g g + sum_k c_k x_k,   c_k = tau_eff w_k / tau_k,   c_g = 1 - sum_k c_k

Without FedNova ``c_k = w_k`` and ``c_g = 1 - sum_k w_k = 0``. The "exact" merged
product of a layer is ``M = c_g B_g A_g + sum_k c_k B_k A_k``.

Modes
-----
``fedit``
    Average A and B separately (FedIT). Inexact; reports the relative error
    ``||M - B_avg A_avg||_F / ||M||_F``.
``ffa``
    FFA-LoRA: A is frozen from a shared seed, clients send only B, and only B is
    averaged. Exact, because ``sum_k c_k B_k A = B_avg A``.
``svd``
    Form ``M`` per layer and re-factorise it by a rank-r truncated SVD,
    ``A = a V_r^T``, ``B = U_r S_r / a``, with ``a`` the root-mean-square row norm of
    the global A (its non-zero rows). A keeps the scale it was initialised with, so the
    next round's gradients of B (which scale with A) and the effective learning rate
    stay as they were; ``sqrt(S_r) V_r^T`` would shrink A's rows to ``sqrt(s_i)``
    (e.g. 0.58 -> 0.11) and the next update about as much. Reports the truncation
    error.

The products are never materialised as (out, in) matrices: ``M = P Q`` with
``P = [c_g B_g, c_1 B_1, ..., c_K B_K]`` (out, R) and ``Q = [A_g; A_1; ...; A_K]``
(R, in), terms with a zero coefficient dropped. The SVD comes from the small core
``R_P R_Q^T`` of the QR factorisations ``P = Q_P R_P`` and ``Q^T = Q_Q R_Q``. The
``fedit`` error comes from Gram matrices (``P^T P``, ``Q Q^T``, ``P^T B``, ...): matrix
products, several times faster than QR, exact up to float64 rounding of the squared
norms (about 1e-16 of ``||M||^2``). Both cost O((out + in) R^2) per layer instead of
O(out * in * R). ``ffa`` is exact by construction: its error is 0 and only ``||B A||``
is computed, from two r x r Gram matrices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from common.advantages import fallback_temperature

logger = logging.getLogger(__name__)

WeightMode = Literal["examples", "uniform", "domain"]
AggregationMode = Literal["fedit", "ffa", "svd"]

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

#: Tolerance on ``sum(weights) == 1`` in :func:`aggregate`.
WEIGHT_SUM_TOL = 1e-6
#: Relative tolerance for a client's copy of the frozen A in ``ffa`` mode. A bf16 wire
#: rounds each value with relative error <= 2**-8, so 2**-7 accepts it with margin.
FROZEN_A_RTOL = 2.0**-7
#: Absolute tolerance for a client's copy of the frozen A in ``ffa`` mode.
FROZEN_A_ATOL = 1e-8
#: Slack when comparing a capped weight with the cap, absorbing float rounding.
CAP_TOL = 1e-12


# ---------------------------------------------------------------------------
# Client weights
# ---------------------------------------------------------------------------


def client_weights(
    mode: WeightMode,
    *,
    num_examples: Sequence[float],
    domain_counts: Sequence[Mapping[str, float]] | None = None,
    domain_temperature: Mapping[str, float] | None = None,
    cap: float | None = None,
) -> list[float]:
    """Normalised aggregation weights of K clients (they sum to 1).

    Raw weights, before normalisation:

    - ``examples`` (FedAvg): ``w_k = n_k``;
    - ``uniform``: ``w_k = 1``;
    - ``domain``: ``w_k = max(sum_d n_{k,d} / T_d, 0)`` (:func:`domain_raw_weights`).
      Counts may carry zero-mean DP noise: the noisy counts are summed first and the
      sum clamped, because clamping each count at 0 keeps only the positive noise and
      gives a hospital weight in domains it does not hold. A domain absent from
      ``domain_temperature`` uses the mean of the given temperatures, and 1 when there
      are none (:func:`common.advantages.fallback_temperature`).

    With ``cap``, no weight exceeds ``cap``: the excess of capped clients is
    redistributed to the others in proportion to their raw weights, repeatedly, until
    no weight exceeds the cap (water-filling).

    Parameters
    ----------
    mode : {"examples", "uniform", "domain"}
        Weighting rule.
    num_examples : Sequence[float]
        ``n_k`` per client (>= 0); its length defines K.
    domain_counts : Sequence[Mapping[str, float]] | None
        ``n_{k,d}`` per client and domain; required for ``domain``.
    domain_temperature : Mapping[str, float] | None
        ``T_d`` per domain (> 0), e.g. from
        :func:`common.advantages.domain_temperatures`.
    cap : float | None
        Largest allowed normalised weight, in (0, 1]. Needs ``cap * K >= 1``.

    Returns
    -------
    list[float]
        ``w_k`` per client, summing to 1.

    Raises
    ------
    ValueError
        On an unknown mode, missing or malformed inputs, all-zero raw weights, or an
        infeasible cap.
    """
    num_clients = len(num_examples)
    if num_clients == 0:
        raise ValueError("`num_examples` is empty; at least one client is needed.")
    for k, n in enumerate(num_examples):
        if not (math.isfinite(n) and n >= 0):
            raise ValueError(f"`num_examples[{k}]` must be finite and >= 0, got {n!r}.")

    if mode == "examples":
        raw = [float(n) for n in num_examples]
    elif mode == "uniform":
        raw = [1.0] * num_clients
    elif mode == "domain":
        raw = domain_raw_weights(num_clients, domain_counts, domain_temperature)
    else:
        raise ValueError(
            f"`mode` must be 'examples', 'uniform' or 'domain', got {mode!r}."
        )

    total = sum(raw)
    if total <= 0:
        raise ValueError(
            f"all raw weights are zero (clients {list(range(num_clients))}, mode "
            f"{mode!r}); no client has anything to contribute this round."
        )
    weights = [r / total for r in raw]
    if cap is not None:
        weights = _apply_cap(weights, cap=cap)
    return weights


def domain_raw_weights(
    num_clients: int,
    domain_counts: Sequence[Mapping[str, float]] | None,
    domain_temperature: Mapping[str, float] | None,
) -> list[float]:
    """Raw ``domain`` weights ``max(sum_d n_{k,d} / T_d, 0)``, before normalisation.

    Sum, then clamp: a hospital's noisy counts in domains it does not hold average
    out instead of adding their positive part. A domain without a temperature uses
    the mean of the given ones (1 when there are none).
    """
    if domain_counts is None or len(domain_counts) != num_clients:
        got = None if domain_counts is None else len(domain_counts)
        raise ValueError(
            f"mode 'domain' needs `domain_counts` for each of the {num_clients} "
            f"clients, got {got}."
        )
    temperature = dict(domain_temperature or {})
    for domain, value in temperature.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"temperature of domain {domain!r} must be finite and > 0, "
                f"got {value!r}."
            )
    fill = fallback_temperature(temperature.values())
    raw: list[float] = []
    for k, counts in enumerate(domain_counts):
        weight = 0.0
        for domain, count in counts.items():
            if not math.isfinite(count):
                raise ValueError(
                    f"`domain_counts[{k}][{domain!r}]` must be finite, got {count!r}."
                )
            weight += count / temperature.get(domain, fill)
        raw.append(max(weight, 0.0))
    return raw


def _apply_cap(weights: list[float], *, cap: float) -> list[float]:
    """Cap normalised weights at ``cap``, redistributing the excess proportionally."""
    num_clients = len(weights)
    if not (math.isfinite(cap) and 0 < cap <= 1):
        raise ValueError(f"`cap` must be in (0, 1], got {cap!r}.")
    if cap * num_clients < 1 - CAP_TOL:
        raise ValueError(
            f"`cap`={cap} is infeasible for {num_clients} clients: weights summing to "
            f"1 need cap >= 1/{num_clients} = {1 / num_clients:.6g}."
        )
    positive = [k for k, w in enumerate(weights) if w > 0]
    if cap * len(positive) < 1 - CAP_TOL:
        raise ValueError(
            f"`cap`={cap} is infeasible: only {len(positive)} of {num_clients} clients "
            f"have a non-zero weight, which needs cap >= 1/{len(positive)}."
        )
    capped: set[int] = set()
    result = list(weights)
    # Each pass caps at least one more client, so K passes always suffice.
    for _ in range(num_clients):
        over = [k for k in positive if k not in capped and result[k] > cap + CAP_TOL]
        if not over:
            break
        capped.update(over)
        free = [k for k in positive if k not in capped]
        free_raw = sum(weights[k] for k in free)
        remaining = 1.0 - cap * len(capped)
        for k in capped:
            result[k] = cap
        for k in free:
            result[k] = remaining * weights[k] / free_raw
    return result


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerReport:
    """Per-layer numbers of one merge.

    Attributes
    ----------
    reference_norm : float
        ``scaling * ||M||_F`` of the exact merged update ``M``.
    error_norm : float
        ``scaling * ||M - B_new A_new||_F``: FedIT factor-averaging error, ~0 for
        FFA, truncation error for SVD.
    """

    reference_norm: float
    error_norm: float


@dataclass(frozen=True)
class AggregationResult:
    """Outcome of :func:`aggregate`.

    Attributes
    ----------
    adapter : dict[str, torch.Tensor]
        New global adapter: same keys (order), shapes, dtypes and devices as the
        global adapter passed in.
    fedit_error : float | None
        ``sqrt(sum_l ||M_l - B_l A_l||_F^2) / sqrt(sum_l ||M_l||_F^2)`` over all LoRA
        layers ``l`` when the factors are averaged separately (modes ``fedit`` and
        ``ffa``; 0 for ``ffa`` up to rounding); None for ``svd``. 0/0 gives 0.
    svd_truncation_error : float | None
        The same ratio for the rank-r truncation in mode ``svd``; None otherwise.
    layers : dict[str, LayerReport]
        Per-layer norms, keyed by the layer prefix.
    """

    adapter: dict[str, torch.Tensor]
    fedit_error: float | None
    svd_truncation_error: float | None
    layers: dict[str, LayerReport] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraPair:
    """Names of the two factors of one LoRA layer."""

    a_key: str
    b_key: str


def lora_pairs(adapter: Mapping[str, torch.Tensor]) -> dict[str, LoraPair]:
    """Pair ``<prefix>.lora_A.weight`` with ``<prefix>.lora_B.weight``.

    Parameters
    ----------
    adapter : Mapping[str, torch.Tensor]
        Adapter tensors; A must be 2-D (r, in) and B 2-D (out, r) with the same r.

    Returns
    -------
    dict[str, LoraPair]
        Layer prefix to its key pair, in the order the A keys appear.

    Raises
    ------
    ValueError
        If a factor has no partner or the two shapes do not fit together.
    """
    pairs: dict[str, LoraPair] = {}
    for key in adapter:
        if key.endswith(LORA_A_SUFFIX):
            prefix = key[: -len(LORA_A_SUFFIX)]
            b_key = prefix + LORA_B_SUFFIX
            if b_key not in adapter:
                raise ValueError(f"adapter has {key!r} but no matching {b_key!r}.")
            a_shape, b_shape = tuple(adapter[key].shape), tuple(adapter[b_key].shape)
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise ValueError(
                    f"layer {prefix!r} has A {a_shape} and B {b_shape}; expected "
                    f"A (r, in) and B (out, r) with the same r."
                )
            pairs[prefix] = LoraPair(a_key=key, b_key=b_key)
        elif key.endswith(LORA_B_SUFFIX):
            a_key = key[: -len(LORA_B_SUFFIX)] + LORA_A_SUFFIX
            if a_key not in adapter:
                raise ValueError(f"adapter has {key!r} but no matching {a_key!r}.")
    return pairs


def aggregate(
    global_adapter: Mapping[str, torch.Tensor],
    client_adapters: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    mode: AggregationMode = "fedit",
    local_steps: Sequence[int] | None = None,
    fednova: bool = False,
    rank: int | None = None,
    scaling: float = 1.0,
    compute_dtype: torch.dtype = torch.float64,
    weight_sum_tol: float = WEIGHT_SUM_TOL,
    frozen_a_rtol: float = FROZEN_A_RTOL,
    frozen_a_atol: float = FROZEN_A_ATOL,
) -> AggregationResult:
    """Merge K client adapters into a new global adapter (see the module docstring).

    Parameters
    ----------
    global_adapter : Mapping[str, torch.Tensor]
        Current global adapter ``g``; defines the keys, shapes and dtypes of the result.
    client_adapters : Sequence[Mapping[str, torch.Tensor]]
        One adapter per client, any floating dtype (e.g. the wire's fp16/bf16). In
        ``fedit``/``svd`` its keys equal the global's; in ``ffa`` they are the global's
        minus the ``lora_A`` keys, and an A that is sent anyway must equal the global A
        (within ``frozen_a_rtol``/``frozen_a_atol``).
    weights : Sequence[float]
        ``w_k`` per client, >= 0 and summing to 1 (see :func:`client_weights`).
    mode : {"fedit", "ffa", "svd"}
        Merge rule.
    local_steps : Sequence[int] | None
        ``tau_k`` per client (> 0); required with ``fednova``, ignored otherwise.
    fednova : bool
        Normalise each update by its local steps (FedNova).
    rank : int | None
        ``svd`` only: keep this many singular values (1 <= rank <= r of every layer);
        columns beyond it are zero. Default: each layer's own r.
    scaling : float
        LoRA ``alpha / r``; only scales the norms in ``layers``.
    compute_dtype : torch.dtype
        Floating dtype of the products, norms and SVD; the result is cast back to the
        global's dtype. Element-wise averages accumulate in float32, or in the global
        tensor's dtype if that is wider (:func:`_merge_dtype`).
    weight_sum_tol : float
        Allowed ``|sum(weights) - 1|``.
    frozen_a_rtol, frozen_a_atol : float
        ``ffa`` only: tolerance of ``torch.allclose(client_A, global_A)``.

    Returns
    -------
    AggregationResult
        New adapter, relative errors and per-layer norms.

    Raises
    ------
    ValueError
        On inconsistent inputs: no clients, weights or steps of the wrong length or
        value, key or shape mismatches, an unknown mode, a bad rank, or (``ffa``) a
        client A that differs from the global A.
    """
    if mode not in ("fedit", "ffa", "svd"):
        raise ValueError(f"`mode` must be 'fedit', 'ffa' or 'svd', got {mode!r}.")
    if fednova and local_steps is None:
        raise ValueError("`fednova=True` needs `local_steps` (one per client).")
    coefficients = _merge_coefficients(
        len(client_adapters), weights, local_steps if fednova else None, weight_sum_tol
    )
    pairs = lora_pairs(global_adapter)
    a_keys = {pair.a_key for pair in pairs.values()}
    b_keys = {pair.b_key for pair in pairs.values()}
    if mode == "ffa":
        _check_client_keys(global_adapter, client_adapters, optional=a_keys)
        _check_frozen_a(
            global_adapter,
            client_adapters,
            a_keys,
            rtol=frozen_a_rtol,
            atol=frozen_a_atol,
        )
    else:
        _check_client_keys(global_adapter, client_adapters, optional=set())
    if rank is not None and mode != "svd":
        logger.debug("`rank`=%s is ignored in mode %r", rank, mode)

    # Tensors merged element-wise: everything in fedit, all but the frozen A in ffa,
    # everything outside the LoRA pairs in svd.
    not_linear = {"fedit": set(), "ffa": a_keys, "svd": a_keys | b_keys}[mode]
    new: dict[str, torch.Tensor] = {}
    for key, g in global_adapter.items():
        if key not in not_linear:
            parts = [g] + [client[key] for client in client_adapters]
            new[key] = _linear_combination(parts, coefficients, _merge_dtype(g.dtype))

    layers: dict[str, LayerReport] = {}
    error_total_sq = reference_total_sq = 0.0
    for prefix, pair in pairs.items():
        b_new, a_new, error_sq, reference_sq = _merge_layer(
            prefix,
            pair,
            global_adapter,
            client_adapters,
            coefficients,
            averaged=new,
            mode=mode,
            rank=rank,
            compute_dtype=compute_dtype,
        )
        new[pair.b_key], new[pair.a_key] = b_new, a_new
        layers[prefix] = LayerReport(
            reference_norm=abs(scaling) * math.sqrt(reference_sq),
            error_norm=abs(scaling) * math.sqrt(error_sq),
        )
        error_total_sq += error_sq
        reference_total_sq += reference_sq

    # Joint over layers (sqrt of summed squares); 0/0 -> 0.
    relative = 0.0
    if reference_total_sq > 0:
        relative = math.sqrt(error_total_sq / reference_total_sq)
    adapter = {
        key: new[key].to(dtype=g.dtype, device=g.device)
        for key, g in global_adapter.items()
    }
    logger.debug(
        "aggregated %d clients, mode %s, fednova %s: relative product error %.3g",
        len(client_adapters), mode, fednova, relative,
    )
    return AggregationResult(
        adapter=adapter,
        fedit_error=None if mode == "svd" else relative,
        svd_truncation_error=relative if mode == "svd" else None,
        layers=layers,
    )


def update_norm(
    global_adapter: Mapping[str, torch.Tensor],
    client_adapter: Mapping[str, torch.Tensor],
    *,
    keys: Collection[str] | None = None,
) -> float:
    """L2 norm of ``client - global`` over their shared tensors, as one flat vector.

    In ``ffa`` mode clients send only lora_B, so the shared keys are the B keys; pass
    ``keys`` to restrict the norm explicitly (e.g. to B even if A was sent too).

    Parameters
    ----------
    global_adapter, client_adapter : Mapping[str, torch.Tensor]
        Adapters; any floating dtypes (computed in float64).
    keys : Collection[str] | None
        Names to include; each must be in both adapters. Default: all shared names.

    Returns
    -------
    float
        ``sqrt(sum_key ||client[key] - global[key]||_F^2)``.

    Raises
    ------
    ValueError
        If there is no shared key, a requested key is missing, or shapes differ.
    """
    if keys is None:
        names = [key for key in client_adapter if key in global_adapter]
    else:
        shared = set(client_adapter) & set(global_adapter)
        missing = [k for k in keys if k not in shared]
        if missing:
            raise ValueError(f"`keys` not in both adapters: {missing[:3]}.")
        names = list(keys)
    if not names:
        raise ValueError("the client and global adapters share no tensor name.")
    total = 0.0
    for key in names:
        g, c = global_adapter[key], client_adapter[key]
        if g.shape != c.shape:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(c.shape)}, expected {tuple(g.shape)}."
            )
        diff = c.detach().to(g.device, torch.float64) - g.detach().to(torch.float64)
        total += float(diff.square().sum())
    return math.sqrt(total)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _merge_coefficients(
    num_clients: int,
    weights: Sequence[float],
    local_steps: Sequence[int] | None,
    weight_sum_tol: float,
) -> list[float]:
    """Coefficients ``[c_g, c_1, ..., c_K]`` of ``new = c_g g + sum_k c_k x_k``."""
    if num_clients == 0:
        raise ValueError("`client_adapters` is empty; nothing to aggregate.")
    if len(weights) != num_clients:
        raise ValueError(f"got {len(weights)} weights for {num_clients} clients.")
    for k, w in enumerate(weights):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"`weights[{k}]` must be finite and >= 0, got {w!r}.")
    if abs(sum(weights) - 1.0) > weight_sum_tol:
        raise ValueError(
            f"`weights` must sum to 1, got {sum(weights)!r}; normalise them "
            f"(see client_weights)."
        )
    if local_steps is None:
        client = [float(w) for w in weights]
    else:
        if len(local_steps) != num_clients:
            raise ValueError(
                f"got {len(local_steps)} local_steps for {num_clients} clients."
            )
        for k, tau in enumerate(local_steps):
            if not (math.isfinite(tau) and tau > 0):
                raise ValueError(f"`local_steps[{k}]` must be > 0, got {tau!r}.")
        pairs = list(zip(weights, local_steps, strict=True))
        tau_eff = sum(w * tau for w, tau in pairs)
        client = [tau_eff * w / tau for w, tau in pairs]
    return [1.0 - sum(client), *client]


def _check_client_keys(
    global_adapter: Mapping[str, torch.Tensor],
    client_adapters: Sequence[Mapping[str, torch.Tensor]],
    *,
    optional: set[str],
) -> None:
    """Require every client to have the global's keys (``optional`` may be absent)."""
    required = set(global_adapter) - optional
    for k, client in enumerate(client_adapters):
        missing = sorted(required - set(client))
        unexpected = sorted(set(client) - set(global_adapter))
        if missing or unexpected:
            raise ValueError(
                f"client {k} adapter keys differ from the global's: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}."
            )
        for key, tensor in client.items():
            if tensor.shape != global_adapter[key].shape:
                raise ValueError(
                    f"client {k} tensor {key!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(global_adapter[key].shape)}."
                )


def _check_frozen_a(
    global_adapter: Mapping[str, torch.Tensor],
    client_adapters: Sequence[Mapping[str, torch.Tensor]],
    a_keys: set[str],
    *,
    rtol: float,
    atol: float,
) -> None:
    """In ``ffa``, an A a client sends anyway must equal the global's frozen A."""
    for k, client in enumerate(client_adapters):
        for key in a_keys & set(client):
            g = global_adapter[key].detach().to(torch.float64)
            c = client[key].detach().to(device=g.device, dtype=torch.float64)
            if not torch.allclose(c, g, rtol=rtol, atol=atol):
                gap = float((c - g).abs().max())
                raise ValueError(
                    f"client {k} sent {key!r} differing from the frozen global A by up "
                    f"to {gap:.3g}; in mode 'ffa' A must stay the server's."
                )


def _merge_layer(
    prefix: str,
    pair: LoraPair,
    global_adapter: Mapping[str, torch.Tensor],
    client_adapters: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[float],
    *,
    averaged: Mapping[str, torch.Tensor],
    mode: AggregationMode,
    rank: int | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """New ``(B, A)`` of one layer with ``||M - B A||_F^2`` and ``||M||_F^2``.

    ``averaged`` holds the element-wise merged tensors (B, and A unless frozen) for
    ``fedit``/``ffa``; ``svd`` re-factorises ``M`` instead.
    """
    g_a = global_adapter[pair.a_key]
    if mode == "ffa":  # M = (sum_j c_j B_j) A = B_new A exactly: no error to measure
        b_new, a_new = averaged[pair.b_key], g_a.detach().clone()  # A stays the global's
        return b_new, a_new, 0.0, _product_sq(b_new.to(compute_dtype), a_new.to(compute_dtype))
    factors = [(global_adapter[pair.b_key], g_a)] + [
        (client[pair.b_key], client[pair.a_key]) for client in client_adapters
    ]
    p, q = _stack_factors(factors, coefficients, compute_dtype)  # M = P Q
    width = g_a.shape[0]
    if mode == "svd":
        keep = _layer_rank(prefix, width, rank)
        b_new, a_new, kept_sq, total_sq = _truncated_factorisation(
            p, q, keep=keep, width=width, a_scale=a_row_scale(g_a)
        )
        return b_new, a_new, max(total_sq - kept_sq, 0.0), total_sq
    b_new, a_new = averaged[pair.b_key], averaged[pair.a_key]
    error_sq, reference_sq = _residual_and_reference_sq(p, q, b_new, a_new)
    return b_new, a_new, error_sq, reference_sq


def _merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator of an element-wise merge into a tensor of ``dtype``: float32, or ``dtype`` if wider.

    The result is stored in ``dtype``, so a float64 sum of 16- or 32-bit tensors would be
    rounded back anyway; float32 keeps the merge at memory speed (a float64 accumulator of
    float32 inputs ran about 6x slower) and its rounding, about K x 6e-8 relative for K
    hospitals, is below the float32 result's own.
    """
    return torch.promote_types(dtype, torch.float32)


def _linear_combination(
    parts: Sequence[torch.Tensor], coefficients: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """``sum_j c_j parts[j]`` in ``dtype`` on the device of ``parts[0]``."""
    device = parts[0].device
    total = torch.zeros(parts[0].shape, dtype=dtype, device=device)
    for c, part in zip(coefficients, parts, strict=True):
        if c != 0.0:
            total.add_(part.detach().to(device=device), alpha=c)  # promoted to ``dtype`` in place, no copy
    return total


def _stack_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    coefficients: Sequence[float],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P = [c_j B_j]_j`` (out, R) and ``Q = [A_j]_j`` (R, in), so ``M = P Q``.

    ``factors`` holds ``(B_j, A_j)``; terms with ``c_j == 0`` are left out.
    """
    device = factors[0][0].device
    used = [(c, b, a) for c, (b, a) in zip(coefficients, factors, strict=True) if c]
    p = torch.cat([c * b.detach().to(device, dtype) for c, b, _ in used], dim=1)
    q = torch.cat([a.detach().to(device, dtype) for _, _, a in used], dim=0)
    return p, q  # (out, R), (R, in)


def _product_core(
    p: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write ``P Q = Q_P C Q_Q^T``: ``Q_P``, ``Q_Q`` orthonormal, ``C`` a small core."""
    q_p, r_p = torch.linalg.qr(p)  # (out, k1), (k1, R)
    q_q, r_q = torch.linalg.qr(q.T)  # (in, k2), (k2, R)
    return q_p, r_p @ r_q.T, q_q  # core (k1, k2)


def _product_sq(b: torch.Tensor, a: torch.Tensor) -> float:
    """``||B A||_F^2 = <B^T B, A A^T>`` from two small Gram matrices (no (out, in) product)."""
    return float(((b.T @ b) * (a @ a.T)).sum())


def _residual_and_reference_sq(
    p: torch.Tensor, q: torch.Tensor, b: torch.Tensor, a: torch.Tensor
) -> tuple[float, float]:
    """``||P Q - B A||_F^2`` and ``||P Q||_F^2`` without forming (out, in) products.

    With ``<X, Y>`` the Frobenius product and ``<P Q, B A> = <P^T B, Q A^T>``:
    ``||P Q - B A||^2 = ||P Q||^2 - 2 <P^T B, Q A^T> + ||B A||^2``, each term from
    products of the thin factors (R x R, R x r and r x r; R = r (hospitals + 1)), which
    cost O((out + in) R^2) in matrix products. In float64 the cancellation loses about
    1e-16 of ``||P Q||^2``; a negative result (round-off around an exact merge) is 0.
    """
    b = b.to(p.device, p.dtype)
    a = a.to(q.device, q.dtype)
    reference = float(((p.T @ p) * (q @ q.T)).sum())
    cross = float(((p.T @ b) * (q @ a.T)).sum())
    residual = reference - 2.0 * cross + _product_sq(b, a)
    return max(residual, 0.0), reference


def a_row_scale(a: torch.Tensor) -> float:
    """Root-mean-square L2 norm of the non-zero rows of A (r, in); 1 if all are zero.

    Rows past an SVD truncation are zero and must not shrink the scale round by round.
    """
    norms = a.detach().to(torch.float64).norm(dim=1)  # (r,)
    nonzero = norms[norms > 0]
    if nonzero.numel() == 0:
        return 1.0
    return float(nonzero.square().mean().sqrt())


def _truncated_factorisation(
    p: torch.Tensor, q: torch.Tensor, *, keep: int, width: int, a_scale: float
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-``keep`` SVD factors of ``M = P Q`` and the kept/total squared spectrum.

    Returns ``B = U_keep S_keep / a_scale`` (out, width) and ``A = a_scale V_keep^T``
    (width, in), so every kept row of A has norm ``a_scale`` and ``B A`` is the rank-
    ``keep`` truncation of ``M``; columns of B and rows of A past ``keep`` (or past
    the number of singular values of M) are zero. Signs are fixed so that the
    largest-magnitude entry of each column of U is positive (ties: the first such
    entry).
    """
    q_p, core, q_q = _product_core(p, q)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    kept = min(keep, s.shape[0])
    u = q_p @ u_c[:, :kept]  # (out, kept)
    vh = vh_c[:kept] @ q_q.T  # (kept, in)
    pivot = u.abs().argmax(dim=0)  # (kept,)
    signs = torch.sign(u[pivot, torch.arange(kept, device=u.device)])
    signs[signs == 0] = 1.0
    b = torch.zeros(p.shape[0], width, dtype=p.dtype, device=p.device)
    a = torch.zeros(width, q.shape[1], dtype=q.dtype, device=q.device)
    b[:, :kept] = u * (signs * s[:kept] / a_scale)  # (out, kept)
    a[:kept] = (signs * a_scale)[:, None] * vh  # (kept, in)
    return b, a, float(s[:kept].square().sum()), float(s.square().sum())


def _layer_rank(prefix: str, layer_rank: int, rank: int | None) -> int:
    """Target rank of one layer in ``svd`` mode."""
    if rank is None:
        return layer_rank
    if not 1 <= rank <= layer_rank:
        raise ValueError(
            f"`rank`={rank} must be in [1, {layer_rank}] (the r of layer {prefix!r})."
        )
    return rank
