"""Tests of common.privacy.dpsgd: clipping by hand, noise scale by sampling, grouping."""

from __future__ import annotations

import math

import pytest
import torch

from common.privacy.dpsgd import (
    DPStepStats,
    clip_and_noise,
    group_rows_to_units,
    poisson_sample,
)
from common.privacy.noise import NoiseSource


def test_clipping_by_hand():
    """Units (3, 4) and (0.3, 0.4) with C = 1: the first scaled to norm 1, the second kept."""
    grads = [torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)]
    out, stats = clip_and_noise(
        grads, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=2.0
    )
    # (3, 4) * 1 / (5 + 1e-6) + (0.3, 0.4) * 1 = (0.9, 1.2) up to 1e-7; divided by 2.
    torch.testing.assert_close(out[0], torch.tensor([0.45, 0.6], dtype=torch.float64), atol=1e-6, rtol=0)
    assert stats == DPStepStats(num_units=2, num_clipped=1, mean_norm=2.75, max_norm=5.0)


def test_norm_is_joint_over_all_parameter_tensors():
    """A unit with 3 in one tensor and 4 in another has norm 5, not 3 and 4."""
    grads = [torch.tensor([[3.0]], dtype=torch.float64), torch.tensor([[[4.0]]], dtype=torch.float64)]
    out, stats = clip_and_noise(grads, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0)
    assert out[0].shape == (1,) and out[1].shape == (1, 1)
    assert float(out[0]) == pytest.approx(0.6, abs=1e-6)
    assert float(out[1]) == pytest.approx(0.8, abs=1e-6)
    assert stats.max_norm == pytest.approx(5.0)


def test_sigma_zero_sum_equals_the_sum_of_independently_clipped_units():
    """Random units, some above and some below C: the output is sum of clipped / B."""
    gen = torch.Generator().manual_seed(0)
    units, clip, batch = 12, 1.5, 4.0
    scales = torch.tensor([0.1, 0.5, 2.0, 10.0] * 3, dtype=torch.float64)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    grads = [
        torch.randn((units, *s), generator=gen, dtype=torch.float64) * scales.view(-1, *[1] * len(s))
        for s in shapes
    ]
    out, stats = clip_and_noise(
        grads, max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=batch
    )
    # Reference: flatten each unit across all tensors, clip the flat vector, sum.
    flat = torch.cat([g.reshape(units, -1) for g in grads], dim=1)  # (U, P)
    norms = flat.norm(dim=1)
    clipped = flat * torch.clamp(clip / (norms + 1e-6), max=1.0).unsqueeze(1)
    assert 0 < stats.num_clipped < units
    assert stats.num_clipped == int((norms > clip).sum())
    expected = clipped.sum(dim=0) / batch
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), expected)


def test_each_unit_alone_contributes_at_most_c():
    """One unit at a time through the real function: norm(out) * B <= C, equal to C when clipped."""
    gen = torch.Generator().manual_seed(1)
    clip, batch = 0.7, 3.0
    for scale in (0.01, 0.3, 5.0, 1e4):
        grads = [torch.randn((1, 6, 5), generator=gen, dtype=torch.float64) * scale,
                 torch.randn((1, 9), generator=gen, dtype=torch.float64) * scale]
        raw = float(torch.cat([g.reshape(-1) for g in grads]).norm())
        out, _ = clip_and_noise(grads, max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=batch)
        contribution = float(torch.cat([o.reshape(-1) for o in out]).norm()) * batch
        assert contribution <= clip * (1 + 1e-9)
        assert contribution == pytest.approx(min(raw, clip), rel=1e-5)


def test_noise_std_is_sigma_c_over_b():
    """Zero gradients: each output coordinate has std sigma * C / B (1% over 200k coords)."""
    grads = [torch.zeros(3, 200_000), torch.zeros(3, 10, 10)]
    sigma, clip, batch = 1.5, 0.5, 4.0
    out, _ = clip_and_noise(
        grads, max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=batch,
        noise=NoiseSource.from_seed(1),
    )
    assert float(out[0].std()) == pytest.approx(sigma * clip / batch, rel=0.01)
    assert abs(float(out[0].mean())) < 5 * sigma * clip / batch / math.sqrt(200_000)
    assert out[0].dtype == torch.float32


def test_noise_is_independent_across_calls_and_reproducible_by_seed():
    """Two calls differ; the same seed gives the same noise."""
    grads = [torch.zeros(2, 1000)]
    kwargs = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 1.0}
    source = NoiseSource.from_seed(5)
    first, _ = clip_and_noise(grads, noise=source, **kwargs)
    second, _ = clip_and_noise(grads, noise=source, **kwargs)
    assert abs(float(torch.corrcoef(torch.stack([first[0], second[0]]))[0, 1])) < 0.15
    again, _ = clip_and_noise(grads, noise=NoiseSource.from_seed(5), **kwargs)
    torch.testing.assert_close(again[0], first[0])


def test_empty_batch_gives_pure_noise_over_b():
    """U = 0 (empty Poisson batch): zeros without noise, noise / B with it."""
    grads = [torch.zeros(0, 50_000), torch.zeros(0, 2, 3)]
    out, stats = clip_and_noise(grads, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=8.0)
    assert [o.shape for o in out] == [(50_000,), (2, 3)]
    assert all(bool((o == 0).all()) for o in out)
    assert stats == DPStepStats(num_units=0, num_clipped=0, mean_norm=0.0, max_norm=0.0)
    out, _ = clip_and_noise(
        grads, max_grad_norm=1.0, noise_multiplier=2.0, expected_batch_size=8.0,
        noise=NoiseSource.from_seed(2),
    )
    assert float(out[0].std()) == pytest.approx(2.0 / 8.0, rel=0.02)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_unit_contributes_zero_and_is_counted(bad):
    """Units (3, 4), (x, 1) | (0.3) and (0.3, 0.4) | (0): the middle one is dropped, not fatal."""
    grads = [torch.tensor([[3.0, 4.0], [bad, 1.0], [0.3, 0.4]], dtype=torch.float64),
             torch.tensor([[0.0], [0.3], [0.0]], dtype=torch.float64)]
    out, stats = clip_and_noise(grads, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=2.0)
    # (3, 4) / (5 + 1e-6) + (0.3, 0.4) = (0.9, 1.2); the second tensor gets nothing. Divided by 2.
    torch.testing.assert_close(out[0], torch.tensor([0.45, 0.6], dtype=torch.float64), atol=1e-6, rtol=0)
    assert float(out[1]) == 0.0
    assert stats == DPStepStats(num_units=3, num_clipped=1, mean_norm=2.75, max_norm=5.0, num_nonfinite=1)
    # With noise the result stays finite.
    noisy, _ = clip_and_noise(grads, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0,
                              noise=NoiseSource.from_seed(0))
    assert all(bool(torch.isfinite(o).all()) for o in noisy)


def test_bad_inputs_are_named():
    """Mismatched U and bad constants raise with the value."""
    ok = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 1.0}
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        clip_and_noise([torch.zeros(2, 1), torch.zeros(3, 1)], **ok)
    with pytest.raises(ValueError, match="max_grad_norm .* got 0.0"):
        clip_and_noise([torch.zeros(1, 1)], **{**ok, "max_grad_norm": 0.0})
    with pytest.raises(ValueError, match="expected_batch_size .* got -2"):
        clip_and_noise([torch.zeros(1, 1)], **{**ok, "expected_batch_size": -2})


def test_group_rows_to_units_by_hand():
    """Rows 0 and 2 belong to unit 1, row 1 to unit 0; unit 2 has no rows."""
    rows = [torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([1.0, 10.0, 100.0])]
    units = group_rows_to_units(rows, torch.tensor([1, 0, 1]), num_units=3)
    torch.testing.assert_close(units[0], torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 0.0]]))
    torch.testing.assert_close(units[1], torch.tensor([10.0, 101.0, 0.0]))


def test_group_rows_refuses_bad_indices():
    """Out-of-range, wrong-dtype or wrong-length indices are refused with the values."""
    rows = [torch.zeros(3, 2)]
    with pytest.raises(ValueError, match=r"\[0, 2\), got range \[0, 2\]"):
        group_rows_to_units(rows, torch.tensor([0, 1, 2]), num_units=2)
    with pytest.raises(ValueError, match="long"):
        group_rows_to_units(rows, torch.tensor([0.0, 1.0, 1.0]), num_units=2)
    with pytest.raises(ValueError, match="3 rows but unit_index has 2"):
        group_rows_to_units(rows, torch.tensor([0, 1]), num_units=2)


def test_poisson_sample_rate_and_edges():
    """About q N units, sorted and distinct; q = 1 takes everyone; N = 0 gives nothing."""
    gen = NoiseSource.from_seed(3)
    n, q = 100_000, 0.1
    picked = poisson_sample(n, sample_rate=q, noise=gen)
    assert picked.dtype == torch.long
    assert abs(picked.numel() - q * n) < 5 * math.sqrt(n * q * (1 - q))
    assert bool((picked[1:] > picked[:-1]).all())
    assert poisson_sample(7, sample_rate=1.0, noise=gen).tolist() == list(range(7))
    assert poisson_sample(0, sample_rate=0.5, noise=gen).numel() == 0
    with pytest.raises(ValueError, match="got 0"):
        poisson_sample(5, sample_rate=0, noise=gen)
    # Reproducible from the key.
    torch.testing.assert_close(poisson_sample(1000, 0.3, NoiseSource.from_seed(9)),
                               poisson_sample(1000, 0.3, NoiseSource.from_seed(9)))


def test_positional_call_forms():
    """The trainer calls poisson_sample and group_rows_to_units positionally."""
    assert poisson_sample(5, 1.0, NoiseSource.from_seed(4)).tolist() == [0, 1, 2, 3, 4]
    units = group_rows_to_units([torch.ones(2, 1)], torch.tensor([0, 0]), 1)
    assert units[0].tolist() == [[2.0]]
