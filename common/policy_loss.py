"""Token-level PPO-clip objective with a KL penalty to the reference policy (pure functions).

Per response token t of row i with advantage A_i:

    ratio      = exp(logp - old_logp)
    pg         = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    pg         = min(pg, -A * dual_clip)            for A < 0 (dual clip; 0 = off)
    kl         = exp(ref - logp) - (ref - logp) - 1  (the low-variance "k3" estimator)
    loss_t     = pg + kl_coef * kl

QoQ-Med (EasyR1/verl defaults): clip_low 0.2, clip_high 0.3, dual clip 3.0, kl_coef 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LossStats", "low_var_kl", "ppo_token_losses", "reduce_token_mean", "reduce_per_unit"]

KL_CLAMP = 10.0
# |ref - logp| is clamped to this before exp(): the k3 value there is already far above
# KL_CLAMP, and without it exp() overflows to inf and the backward pass yields NaN (0 * inf).
KL_LOG_RATIO_CLAMP = 20.0


def low_var_kl(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    *,
    clamp: float = KL_CLAMP,
    log_ratio_clamp: float = KL_LOG_RATIO_CLAMP,
) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token, clamped to [-clamp, clamp]."""
    log_ratio = (ref_logp - logp).clamp(-log_ratio_clamp, log_ratio_clamp)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-clamp, clamp)


@dataclass
class LossStats:
    """Diagnostics of one loss evaluation (token means over the masked tokens)."""

    pg_loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float


def ppo_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
    kl_coef: float,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """Per-token losses [R, T] (zero where ``mask`` is 0) and their diagnostics.

    ``advantages`` is [R] (one per response, broadcast over its tokens) or [R, T].
    ``entropy`` ([R, T], the policy's entropy at each position) with ``entropy_coef``
    adds the bonus ``- entropy_coef * entropy`` per token.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip > 0:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    loss = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        kl = low_var_kl(logp, ref_logp)
        loss = loss + kl_coef * kl
    if entropy is not None and entropy_coef > 0:
        loss = loss - entropy_coef * entropy
    loss = loss * mask
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        stats = LossStats(
            pg_loss=float((pg * mask).sum() / n),
            kl=float((kl * mask).sum() / n),
            clip_fraction=float(((clipped > unclipped).float() * mask).sum() / n),
            ratio_mean=float((ratio * mask).sum() / n),
        )
    return loss, stats


def reduce_token_mean(losses: torch.Tensor, mask: torch.Tensor, *, total_tokens: float) -> torch.Tensor:
    """Token-mean over the whole batch (verl's "token-mean"): sum / total tokens.

    ``total_tokens`` is the token count of the *whole* batch, so micro-batches that are
    summed give the same gradient as one big batch.
    """
    return losses.sum() / max(total_tokens, 1.0)


def reduce_per_unit(losses: torch.Tensor, mask: torch.Tensor, unit_index: torch.Tensor, num_units: int) -> torch.Tensor:
    """Per-row loss such that each privacy unit's rows sum to that unit's token-mean.

    Under DP-SGD the loss of one unit (a record with its K rollouts, or a patient) must
    not depend on any other unit, so the token mean is taken within the unit. Returns a
    [R] tensor; summing it over rows gives sum over units of their token-mean losses.
    """
    tokens_per_row = mask.sum(1)
    tokens_per_unit = torch.zeros(num_units, dtype=tokens_per_row.dtype, device=mask.device)
    tokens_per_unit.index_add_(0, unit_index, tokens_per_row)
    denom = tokens_per_unit[unit_index].clamp(min=1.0)
    return losses.sum(1) / denom
