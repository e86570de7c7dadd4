"""Tests of common.policy_loss against hand-computed values.

Clip range [1 - 0.2, 1 + 0.3] = [0.8, 1.3], dual clip 3. Per token, with ratio r and
advantage A: pg = max(-A r, -A clip(r)); for A < 0 also pg = min(pg, 3 |A|).
k3 KL with d = ref - logp: e^d - d - 1; d = ln 2 -> 1 - ln 2 = 0.3068528,
d = -ln 2 -> ln 2 - 0.5 = 0.1931472 (the two sum to 0.5).
"""

from __future__ import annotations

import math

import pytest
import torch

from common.policy_loss import low_var_kl, ppo_token_losses, reduce_per_unit, reduce_token_mean

CLIP = {"clip_low": 0.2, "clip_high": 0.3, "dual_clip": 3.0}
LN2 = math.log(2.0)

# (advantage, ratio, expected pg, clipped?) one token per row.
CASES = [
    (1.0, 1.1, -1.1, False),  # inside the range
    (1.0, 1.5, -1.3, True),  # A > 0 above the range: capped at 1.3
    (1.0, 0.5, -0.5, False),  # A > 0 below the range: the unclipped (worse) value wins
    (-1.0, 0.5, 0.8, True),  # A < 0 below the range: floored at 0.8
    (-1.0, 1.1, 1.1, False),  # inside the range
    (-1.0, 5.0, 3.0, False),  # A < 0, huge ratio: the dual clip caps 5 at 3
    (0.0, 1.5, 0.0, False),  # no advantage, no loss
    (-2.0, 2.0, 4.0, False),  # A < 0 above the range, under the dual cap 6
    (2.0, 5.0, -2.6, True),  # A > 0: no dual clip, capped at 2 * 1.3
]


def _case_tensors(dtype=torch.float64):
    adv = torch.tensor([c[0] for c in CASES], dtype=dtype)
    old = torch.full((len(CASES), 1), -2.0, dtype=dtype)
    logp = old + torch.log(torch.tensor([[c[1]] for c in CASES], dtype=dtype))
    return logp, old, adv


def test_pg_inside_and_outside_the_clip_range():
    logp, old, adv = _case_tensors()
    loss, stats = ppo_token_losses(logp, old, None, adv, torch.ones_like(logp), kl_coef=0.0, **CLIP)
    assert loss.shape == (len(CASES), 1)
    assert loss[:, 0].tolist() == pytest.approx([c[2] for c in CASES], abs=1e-12)
    # Means over the 9 tokens: pg (-1.1-1.3-0.5+0.8+1.1+3+0+4-2.6)/9 = 3.4/9;
    # ratios 18.2/9; clipped rows 1, 3 and 8 -> 3/9.
    assert stats.pg_loss == pytest.approx(3.4 / 9, abs=1e-12)
    assert stats.ratio_mean == pytest.approx(18.2 / 9, abs=1e-12)
    assert stats.clip_fraction == pytest.approx(sum(c[3] for c in CASES) / 9, abs=1e-12)
    assert stats.clip_fraction == pytest.approx(3 / 9)
    assert stats.kl == 0.0


def test_dual_clip_off_keeps_the_large_negative_advantage_loss():
    logp, old, adv = _case_tensors()
    loss, _ = ppo_token_losses(
        logp, old, None, adv, torch.ones_like(logp), clip_low=0.2, clip_high=0.3, dual_clip=0.0, kl_coef=0.0
    )
    expected = [c[2] for c in CASES]
    expected[5] = 5.0  # -A * r = 5, no longer capped at 3
    assert loss[:, 0].tolist() == pytest.approx(expected, abs=1e-12)


def test_gradient_flows_only_through_unclipped_tokens():
    """d pg / d logp = -A r where the unclipped term is chosen, 0 where a clip is active."""
    logp, old, adv = _case_tensors()
    logp = logp.clone().requires_grad_(True)
    loss, _ = ppo_token_losses(logp, old, None, adv, torch.ones_like(logp), kl_coef=0.0, **CLIP)
    loss.sum().backward()
    expected = [-1.1, 0.0, -0.5, 0.0, 1.1, 0.0, 0.0, 4.0, 0.0]
    assert logp.grad[:, 0].tolist() == pytest.approx(expected, abs=1e-12)


def test_low_var_kl_by_hand():
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    ref = logp + torch.tensor([LN2, -LN2, 0.0, 5.0, -20.0], dtype=torch.float64)
    kl = low_var_kl(logp, ref)
    # e^5 - 6 = 142.4 and e^-20 + 19 = 19 are both clamped to 10.
    assert kl.tolist() == pytest.approx([1 - LN2, LN2 - 0.5, 0.0, 10.0, 10.0], abs=1e-12)
    assert low_var_kl(logp, ref, clamp=200.0)[3].item() == pytest.approx(math.exp(5.0) - 6.0, rel=1e-12)


def test_low_var_kl_gradient_stays_finite_for_extreme_log_ratios():
    """A token the policy finds e^-100 times less likely than the reference: KL clamps to 10
    and its gradient is 0, not NaN from exp() overflowing in float32."""
    logp = torch.tensor([-100.5, -1.0, -0.1], requires_grad=True)
    ref = torch.tensor([-0.5, -1.0 + LN2, -100.1])
    kl = low_var_kl(logp, ref)
    assert kl.tolist() == pytest.approx([10.0, 1 - LN2, 10.0], abs=1e-6)
    (kl * torch.tensor([0.0, 1.0, 1.0])).sum().backward()
    assert torch.isfinite(logp.grad).all()
    # d/dlogp (e^d - d - 1) with d = ref - logp is 1 - e^d = 1 - 2 = -1 at d = ln 2.
    assert logp.grad.tolist() == pytest.approx([0.0, -1.0, 0.0], abs=1e-6)


def test_kl_term_is_added_with_its_coefficient():
    logp = torch.full((1, 4), -1.0, dtype=torch.float64)
    ref = logp + torch.tensor([[LN2, -LN2, 0.0, 5.0]], dtype=torch.float64)
    adv = torch.zeros(1, dtype=torch.float64)  # pg = 0, so the loss is the KL term alone
    loss, stats = ppo_token_losses(logp, logp, ref, adv, torch.ones_like(logp), kl_coef=0.1, **CLIP)
    assert loss[0].tolist() == pytest.approx([0.1 * (1 - LN2), 0.1 * (LN2 - 0.5), 0.0, 1.0], abs=1e-12)
    assert stats.kl == pytest.approx((0.5 + 10.0) / 4, abs=1e-12)
    assert stats.pg_loss == 0.0 and stats.ratio_mean == 1.0 and stats.clip_fraction == 0.0
    # kl_coef = 0 or no reference: no KL term and no KL statistic.
    for ref_logp, coef in ((ref, 0.0), (None, 0.1)):
        loss0, stats0 = ppo_token_losses(logp, logp, ref_logp, adv, torch.ones_like(logp), kl_coef=coef, **CLIP)
        assert loss0.abs().sum().item() == 0.0 and stats0.kl == 0.0


def test_kl_and_pg_add_up():
    """Row A = 1, r = 1.5 (pg -1.3) with ref - logp = ln 2 (KL 0.3068528), kl_coef 0.5."""
    old = torch.tensor([[-2.0]], dtype=torch.float64)
    logp = old + math.log(1.5)
    ref = logp + LN2
    loss, _ = ppo_token_losses(logp, old, ref, torch.ones(1, dtype=torch.float64), torch.ones_like(logp),
                               kl_coef=0.5, **CLIP)
    assert loss.item() == pytest.approx(-1.3 + 0.5 * (1 - LN2), abs=1e-12)


def test_masking_zeroes_losses_and_excludes_tokens_from_the_stats():
    dtype = torch.float64
    old = torch.full((2, 3), -1.0, dtype=dtype)
    ratios = torch.tensor([[1.1, 1.5, 50.0], [0.5, 40.0, 30.0]], dtype=dtype)
    logp = old + ratios.log()
    ref = logp.clone()
    ref[0, 2] = logp[0, 2] + 5.0  # a big KL, but on a masked token
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=dtype)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=dtype)  # per-token form
    loss, stats = ppo_token_losses(logp, old, ref, adv, mask, kl_coef=0.1, **CLIP)
    # Kept tokens: (A 1, r 1.1) -> -1.1; (A 1, r 1.5) -> -1.3; (A -1, r 0.5) -> 0.8.
    assert loss.flatten().tolist() == pytest.approx([-1.1, -1.3, 0.0, 0.8, 0.0, 0.0], abs=1e-12)
    assert stats.pg_loss == pytest.approx((-1.1 - 1.3 + 0.8) / 3, abs=1e-12)
    assert stats.ratio_mean == pytest.approx((1.1 + 1.5 + 0.5) / 3, abs=1e-12)
    assert stats.clip_fraction == pytest.approx(2 / 3, abs=1e-12)
    assert stats.kl == 0.0
    # A [R] advantage broadcasts over the row's tokens: same result.
    loss_r, stats_r = ppo_token_losses(logp, old, ref, adv[:, 0], mask, kl_coef=0.1, **CLIP)
    assert torch.equal(loss_r, loss) and stats_r == stats


def test_reduce_token_mean_divides_by_the_whole_batch_token_count():
    losses = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert reduce_token_mean(losses, mask, total_tokens=3.0).item() == pytest.approx(2.0)
    # A micro-batch of a 6-token batch: the two halves sum to the full-batch mean.
    assert reduce_token_mean(losses, mask, total_tokens=6.0).item() == pytest.approx(1.0)
    assert reduce_token_mean(torch.zeros(1, 2), torch.zeros(1, 2), total_tokens=0.0).item() == 0.0


def test_reduce_per_unit_by_hand():
    losses = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 4.0, 4.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    unit = torch.tensor([0, 0, 1, 0])
    per_row = reduce_per_unit(losses, mask, unit, num_units=3)  # unit 2 has no rows
    # Unit 0 has 2 + 1 + 1 = 4 tokens, unit 1 has 3: rows 3/4, 3/4, 12/3, 5/4.
    assert per_row.tolist() == pytest.approx([0.75, 0.75, 4.0, 1.25])
    # Each unit's rows sum to that unit's token mean: (1 + 2 + 3 + 5) / 4 and 12 / 3.
    assert float(per_row[unit == 0].sum()) == pytest.approx(11 / 4)
    assert float(per_row[unit == 1].sum()) == pytest.approx(4.0)
    # One unit's value does not depend on another unit's tokens.
    mask2 = mask.clone()
    mask2[2, 2] = 0.0
    losses2 = losses * mask2
    per_row2 = reduce_per_unit(losses2, mask2, unit, num_units=3)
    assert per_row2[[0, 1, 3]].tolist() == per_row[[0, 1, 3]].tolist()
    assert per_row2[2].item() == pytest.approx(8 / 2)


def test_reduce_per_unit_row_without_tokens():
    losses = torch.zeros(2, 2)
    mask = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    per_row = reduce_per_unit(losses + torch.tensor([[0.0, 0.0], [2.0, 4.0]]), mask, torch.tensor([0, 1]), 2)
    assert per_row.tolist() == [0.0, 3.0]
