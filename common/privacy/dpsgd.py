"""The pure core of one DP-SGD step over per-unit gradients.

A *privacy unit* is what the guarantee protects: one record (with its K rollouts), or
one patient (with all of their records). The trainer computes per-row gradients,
sums them into per-unit gradients (:func:`group_rows_to_units`), then
:func:`clip_and_noise` clips each unit's gradient to L2 norm C jointly over all
parameter tensors, sums, adds N(0, sigma^2 C^2) per coordinate and divides by the
expected batch size q N (Abadi et al. 2016, arXiv:1607.00133, Algorithm 1, with
Poisson sampling as in Opacus). One call is one step ``(sigma, q, 1)`` for the
accountant (see ``effective_noise_multiplier`` when a sample is reused). A unit whose
gradient is not finite contributes zero (its contribution is still bounded by C, so the
guarantee holds) and is counted in the step's statistics. All randomness comes from a
:class:`~common.privacy.noise.NoiseSource` (ChaCha20), never from torch's generators.

Shape legend: U units, R rows, ``*shape`` one parameter tensor's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from common.privacy.noise import NoiseSource

__all__ = [
    "CLIP_NORM_EPS",
    "DPStepStats",
    "clip_and_noise",
    "group_rows_to_units",
    "poisson_sample",
]

#: Added to a unit's norm before dividing (as Opacus does), so a zero gradient is safe.
CLIP_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DPStepStats:
    """What one DP-SGD step saw, before noise (for logs; these are not DP-released).

    Attributes
    ----------
    num_units : int
        Units in the (Poisson) batch.
    num_clipped : int
        Units whose pre-clip norm exceeded the clipping bound C.
    mean_norm : float
        Mean per-unit pre-clip L2 norm over the finite units (0.0 if none).
    max_norm : float
        Largest per-unit pre-clip L2 norm over the finite units (0.0 if none).
    num_nonfinite : int
        Units whose gradient had a NaN or inf (or whose norm overflowed): they
        contributed zero.
    """

    num_units: int
    num_clipped: int
    mean_norm: float
    max_norm: float
    num_nonfinite: int = 0


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def clip_and_noise(
    per_unit_grads: list[Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    noise: NoiseSource | None = None,
    norm_eps: float = CLIP_NORM_EPS,
) -> tuple[list[Tensor], DPStepStats]:
    """Clip each unit's gradient, sum, add Gaussian noise, divide by q N.

    For unit u with gradients g_u (all tensors together) and norm
    n_u = sqrt(sum over tensors of ||g_u,t||^2)::

        out_t = (sum_u s_u g_u,t + N(0, sigma^2 C^2 I)) / B

    with s_u = min(1, C / (n_u + norm_eps)) when n_u is finite and s_u g_u = 0 when it
    is not (a NaN or inf anywhere in the unit's gradient): either way the unit moves
    the sum by at most C, which is all the accounting assumes.

    where B is the *expected* batch size q N, not the realised one: the realised size
    itself changes when one unit is added or removed, so dividing by it would not keep
    the sensitivity of the noisy sum at C, which the accounting assumes.

    Parameters
    ----------
    per_unit_grads : list of Tensor
        One tensor per parameter, each (U, *shape), same U for all. U may be 0 (an
        empty Poisson batch): the result is then pure noise / B.
    max_grad_norm : float
        C, the per-unit L2 clipping bound, > 0.
    noise_multiplier : float
        sigma, >= 0 (0 gives no privacy; for tests).
    expected_batch_size : float
        B = q N, > 0.
    noise : NoiseSource or None
        Source of the noise (drawn on the CPU in float64, cast to each tensor's dtype
        and device); None draws from a fresh ``NoiseSource.secure()``.
    norm_eps : float
        Added to each norm before dividing.

    Returns
    -------
    (list of Tensor, DPStepStats)
        One (*shape) tensor per parameter, same dtype and device as the input; and
        statistics of the pre-clip norms (non-finite units counted, never raised).

    Raises
    ------
    ValueError
        If the list is empty, the tensors disagree on U, or a constant is out of range.
    """
    if not per_unit_grads:
        raise ValueError(
            "per_unit_grads is empty: pass one (U, *shape) tensor per parameter"
        )
    num_units = per_unit_grads[0].shape[0]
    if any(g.shape[0] != num_units for g in per_unit_grads):
        raise ValueError(
            "per-unit gradients disagree on the number of units: leading sizes "
            f"{[g.shape[0] for g in per_unit_grads]}"
        )
    _check_positive("privacy.max_grad_norm", max_grad_norm)
    _check_positive("expected_batch_size", expected_batch_size)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )

    # Per-tensor norms in the grads' dtype (no full-size copy), combined in float64.
    tensor_norms = [
        torch.linalg.vector_norm(g.reshape(num_units, math.prod(g.shape[1:])), dim=1)
        for g in per_unit_grads
    ]  # (U,) each
    norms = torch.stack(tensor_norms, dim=1).double().pow(2).sum(dim=1).sqrt()  # (U,)
    finite = torch.isfinite(norms)  # (U,)
    num_nonfinite = int((~finite).sum())
    scale = (max_grad_norm / (norms + norm_eps)).clamp(max=1.0)  # (U,)
    scale = torch.where(finite, scale, torch.zeros_like(scale))

    noise_std = noise_multiplier * max_grad_norm
    shapes = [g.shape[1:] for g in per_unit_grads]
    if noise_std > 0:  # one draw for all tensors, split below
        source = noise if noise is not None else NoiseSource.secure()
        flat = torch.from_numpy(source.standard_normal(sum(math.prod(s) for s in shapes)))
        draws = torch.split(flat, [math.prod(s) for s in shapes])
    out = []
    for t, g in enumerate(per_unit_grads):
        if num_nonfinite:  # 0 * NaN is NaN: zero the units themselves
            g = torch.where(finite.to(g.device).view(-1, *[1] * (g.dim() - 1)), g, torch.zeros_like(g))
        clipped_sum = torch.einsum("u,u...->...", scale.to(g.dtype).to(g.device), g)  # (*shape)
        if noise_std > 0:
            z = draws[t].reshape(shapes[t]).to(dtype=g.dtype, device=g.device)  # (*shape)
            clipped_sum = clipped_sum + noise_std * z
        out.append(clipped_sum / expected_batch_size)

    finite_norms = norms[finite]
    stats = DPStepStats(
        num_units=int(num_units),
        num_clipped=int((finite_norms > max_grad_norm).sum()),
        mean_norm=float(finite_norms.mean()) if finite_norms.numel() else 0.0,
        max_norm=float(finite_norms.max()) if finite_norms.numel() else 0.0,
        num_nonfinite=num_nonfinite,
    )
    return out, stats


def group_rows_to_units(
    per_row_grads: list[Tensor],
    unit_index: Tensor,
    num_units: int,
) -> list[Tensor]:
    """Sum per-row gradients into per-unit gradients.

    A row is whatever the per-sample gradient was computed for (one rollout, one
    record); ``unit_index[r]`` is the privacy unit that row r belongs to. A unit's
    gradient is the sum of its rows', so clipping it bounds the whole unit's influence.

    Parameters
    ----------
    per_row_grads : list of Tensor
        One tensor per parameter, each (R, *shape).
    unit_index : Tensor
        (R,) long, values in [0, num_units).
    num_units : int
        U, >= 0. Units with no rows get zero gradients.

    Returns
    -------
    list of Tensor
        One (U, *shape) tensor per parameter.
    """
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 0:
        raise ValueError(f"num_units must be an integer >= 0, got {num_units!r}")
    if unit_index.dtype != torch.long or unit_index.dim() != 1:
        raise ValueError(
            f"unit_index must be a 1-D long tensor, got dtype {unit_index.dtype} and "
            f"shape {tuple(unit_index.shape)}"
        )
    num_rows = unit_index.shape[0]
    if num_rows and (int(unit_index.min()) < 0 or int(unit_index.max()) >= num_units):
        raise ValueError(
            f"unit_index values must be in [0, {num_units}), got range "
            f"[{int(unit_index.min())}, {int(unit_index.max())}]"
        )
    out = []
    for g in per_row_grads:
        if g.shape[0] != num_rows:
            raise ValueError(
                f"a per-row gradient has {g.shape[0]} rows but unit_index has {num_rows}"
            )
        units = torch.zeros((num_units, *g.shape[1:]), dtype=g.dtype, device=g.device)
        out.append(units.index_add_(0, unit_index.to(g.device), g))  # (U, *shape)
    return out


def poisson_sample(
    num_units: int,
    sample_rate: float,
    noise: NoiseSource | None = None,
) -> Tensor:
    """Poisson sampling: each unit is selected independently with probability q.

    Parameters
    ----------
    num_units : int
        N, >= 0.
    sample_rate : float
        q, in (0, 1].
    noise : NoiseSource or None
        Source of randomness; None draws from a fresh ``NoiseSource.secure()``.

    Returns
    -------
    Tensor
        (k,) long, the selected unit indices in increasing order; k may be 0.
    """
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 0:
        raise ValueError(f"num_units must be an integer >= 0, got {num_units!r}")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"privacy.sample_rate must be in (0, 1], got {sample_rate!r}")
    source = noise if noise is not None else NoiseSource.secure()
    draws = source.rand(num_units)  # (N,) in (0, 1]
    return torch.nonzero(draws <= sample_rate).flatten().long()
