"""Tests of common.privacy.release: sensitivity by hand, noise scale by sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

import dataclasses
import re
from pathlib import Path

from common.config import PrivacyConfig
from common.privacy import release
from common.privacy.release import (
    clamp_counts_and_means,
    counts_and_sums_sensitivity,
    eval_sums_sensitivity,
    gaussian_release,
    release_counts_and_sums,
    release_eval_sums,
)


def test_sensitivity_by_hand():
    """sqrt(1 + B^2) per record, m times that per unit of m records."""
    assert counts_and_sums_sensitivity(sum_bound=1.0) == pytest.approx(math.sqrt(2))
    assert counts_and_sums_sensitivity(sum_bound=3.0) == pytest.approx(math.sqrt(10))
    assert counts_and_sums_sensitivity(sum_bound=0.0) == 1.0
    assert counts_and_sums_sensitivity(sum_bound=1.0, max_records_per_unit=2) == pytest.approx(
        2 * math.sqrt(2)
    )
    with pytest.raises(ValueError, match="-1"):
        counts_and_sums_sensitivity(sum_bound=-1.0)


def test_removing_one_record_moves_the_vector_by_at_most_the_sensitivity():
    """Brute force over a small dataset: every add/remove-one neighbour is within bound."""
    bound = 2.0
    domains = np.array([0, 1, 1, 2, 0])
    rewards = np.array([2.0, 0.5, 1.7, 0.0, 1.2])

    def stats(keep):
        counts = np.bincount(domains[keep], minlength=3).astype(float)
        sums = np.bincount(domains[keep], weights=rewards[keep], minlength=3)
        return np.concatenate([counts, sums])

    everyone = np.ones(5, dtype=bool)
    worst = 0.0
    for r in range(5):
        keep = everyone.copy()
        keep[r] = False
        worst = max(worst, float(np.linalg.norm(stats(everyone) - stats(keep))))
    assert worst == pytest.approx(math.sqrt(1 + 2.0**2))  # record 0 has the largest reward
    assert worst <= counts_and_sums_sensitivity(sum_bound=bound)


def test_gaussian_release_noise_std():
    """Std of the added noise is sigma * sensitivity (within 1% over 200k draws)."""
    rng = np.random.default_rng(0)
    values = np.full(200_000, 3.0)
    noisy = gaussian_release(values, l2_sensitivity=2.0, noise_multiplier=1.5, rng=rng)
    noise = noisy - values
    assert noise.std() == pytest.approx(3.0, rel=0.01)
    assert abs(noise.mean()) < 5 * 3.0 / math.sqrt(values.size)
    assert noisy.shape == values.shape and noisy.dtype == np.float64


def test_counts_and_sums_noise_std_on_both_halves():
    """Every coordinate of counts and sums gets std sigma * sqrt(1 + B^2)."""
    rng = np.random.default_rng(1)
    domains = 100_000
    counts = np.full(domains, 10.0)
    sums = np.full(domains, 5.0)  # mean reward 0.5 <= B
    noisy_counts, noisy_sums = release_counts_and_sums(
        counts, sums, noise_multiplier=2.0, sum_bound=3.0, rng=rng
    )
    expected = 2.0 * math.sqrt(10.0)
    assert (noisy_counts - counts).std() == pytest.approx(expected, rel=0.015)
    assert (noisy_sums - sums).std() == pytest.approx(expected, rel=0.015)
    # Independent noise on the two halves.
    assert abs(np.corrcoef(noisy_counts - counts, noisy_sums - sums)[0, 1]) < 0.02


def test_release_is_reproducible_from_the_generator():
    """Same seed, same release."""
    args = (np.array([4.0, 0.0]), np.array([2.5, 0.0]))
    a = release_counts_and_sums(*args, noise_multiplier=1.0, sum_bound=1.0, rng=np.random.default_rng(7))
    b = release_counts_and_sums(*args, noise_multiplier=1.0, sum_bound=1.0, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_unclipped_sums_and_bad_shapes_are_refused():
    """A sum above count * B means rewards were not clipped: the stated sensitivity is void."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"reward sum 5 of domain #1 .* clip each record"):
        release_counts_and_sums(
            np.array([3.0, 2.0]), np.array([1.0, 5.0]), noise_multiplier=1.0, sum_bound=2.0, rng=rng
        )
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\)"):
        release_counts_and_sums(
            np.zeros(2), np.zeros(3), noise_multiplier=1.0, sum_bound=1.0, rng=rng
        )
    with pytest.raises(ValueError, match="stats_noise_multiplier"):
        gaussian_release(np.zeros(2), l2_sensitivity=1.0, noise_multiplier=0.0, rng=rng)


def test_clamp_counts_and_means_by_hand():
    """Counts clamp at 0; means are sum/count clamped to [0, B]; NaN where count is 0."""
    counts, means = clamp_counts_and_means(
        np.array([4.0, -1.5, 2.0, 0.5, 3.0]),
        np.array([2.0, 1.0, 5.0, -0.2, 1.5]),
        sum_bound=2.0,
    )
    np.testing.assert_array_equal(counts, [4.0, 0.0, 2.0, 0.5, 3.0])
    np.testing.assert_allclose(means[[0, 2, 3, 4]], [0.5, 2.0, 0.0, 0.5])
    assert math.isnan(means[1])


def test_every_setting_the_module_names_exists():
    """Error messages and docs name only real privacy.* settings."""
    text = Path(release.__file__).read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w./])privacy\.([a-z_]+)", text))  # not common.privacy.<module>, privacy.md
    assert named, "the module names the settings that set its noise"
    assert named <= {f.name for f in dataclasses.fields(PrivacyConfig)}


def test_eval_sums_sensitivity_by_brute_force():
    """Removing any one unit (records weighted 1/m) moves (units, sums) by <= sqrt(1 + k)."""
    assert eval_sums_sensitivity(3) == 2.0
    assert eval_sums_sensitivity(0) == 1.0
    with pytest.raises(ValueError, match="-1"):
        eval_sums_sensitivity(-1)
    # (domain, value_1, value_2, value_3) per record; units group record indices.
    records = [(0, 1.0, 1.0, 1.0), (1, 1.0, 1.0, 1.0), (0, 0.0, 0.5, 1.0), (1, 1.0, 0.0, 0.0), (0, 1.0, 1.0, 1.0)]
    units = [[0], [1, 3], [2, 4]]

    def stats(kept):
        v = np.zeros((4, 2))
        for u in kept:
            for r in units[u]:
                d, *values = records[r]
                v[:, d] += np.array([1.0, *values]) / len(units[u])
        return v.ravel()

    everyone = range(len(units))
    moves = [np.linalg.norm(stats(everyone) - stats([u for u in everyone if u != k])) for k in everyone]
    assert max(moves) == pytest.approx(2.0)  # the one-record unit with every value 1
    assert max(moves) <= eval_sums_sensitivity(3) + 1e-12


def test_eval_sums_release_noise_and_refusals():
    rng = np.random.default_rng(3)
    units = np.full(50_000, 4.0)
    noisy_units, (a, b) = release_eval_sums(units, [units / 2, units], noise_multiplier=1.5, rng=rng)
    expected = 1.5 * math.sqrt(3)
    assert (noisy_units - units).std() == pytest.approx(expected, rel=0.02)
    assert (a - units / 2).std() == pytest.approx(expected, rel=0.02)
    assert (b - units).std() == pytest.approx(expected, rel=0.02)
    with pytest.raises(ValueError, match=r"sum #1 of domain #0 is 5, outside \[0, 4\]"):
        release_eval_sums(np.array([4.0]), [np.array([1.0]), np.array([5.0])], noise_multiplier=1.0, rng=rng)
    with pytest.raises(ValueError, match="same length"):
        release_eval_sums(np.zeros(2), [np.zeros(3)], noise_multiplier=1.0, rng=rng)
