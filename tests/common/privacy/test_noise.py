"""Tests of common.privacy.noise: ChaCha20 keystream -> uniforms -> Box-Muller Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from common.privacy.dpsgd import clip_and_noise, poisson_sample
from common.privacy.noise import NoiseSource, box_muller, uniform_from_words
from common.privacy.release import gaussian_release

N = 100_000


def test_first_words_are_the_rfc_8439_keystream():
    """All-zero key, nonce and counter: RFC 8439 A.1 test vector #1 (76 b8 e0 ad a0 f1 3d 90 ...)."""
    # Bytes 0-7 and 8-15 of the published keystream, read as little-endian uint64.
    w0 = int.from_bytes(bytes.fromhex("76b8e0ada0f13d90"), "little")
    w1 = int.from_bytes(bytes.fromhex("405d6ae55386bd28"), "little")
    u = NoiseSource(bytes(32)).uniform(2)
    assert u.tolist() == [((w0 >> 11) + 1) / 2**53, ((w1 >> 11) + 1) / 2**53]


def test_uniform_from_words_by_hand():
    """The extreme words map to 2**-53 and exactly 1.0: (0, 1], never 0."""
    words = np.array([0, 2**11 - 1, 2**11, 2**64 - 1], dtype=np.uint64)
    assert uniform_from_words(words).tolist() == [2.0**-53, 2.0**-53, 2.0**-52, 1.0]


def test_box_muller_by_hand():
    """u1 = e^-1/2 gives radius 1; u2 = 1/8 puts the pair at 45 degrees; u1 = 1 gives 0."""
    z = box_muller(np.array([math.exp(-0.5), 1.0]), np.array([0.125, 0.3]))
    np.testing.assert_allclose(z, [math.sqrt(0.5), 0.0, math.sqrt(0.5), 0.0], atol=1e-15)


def test_deterministic_for_a_key_and_different_across_keys_and_draws():
    a, b = NoiseSource(b"k" * 32), NoiseSource(b"k" * 32)
    first = a.standard_normal(1000)
    np.testing.assert_array_equal(first, b.standard_normal(1000))
    second = a.standard_normal(1000)  # the next draw uses fresh keystream
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.15
    other = NoiseSource(b"j" * 32).standard_normal(1000)
    assert abs(np.corrcoef(first, other)[0, 1]) < 0.15
    np.testing.assert_array_equal(NoiseSource.from_seed(7).standard_normal(50),
                                  NoiseSource.from_seed(7).standard_normal(50))
    assert not np.array_equal(NoiseSource.from_seed(7).standard_normal(50),
                              NoiseSource.from_seed(8).standard_normal(50))
    assert not np.array_equal(NoiseSource.secure().standard_normal(50),
                              NoiseSource.secure().standard_normal(50))


def test_gaussians_have_the_right_moments_and_shape():
    """1e5 draws: mean, variance, tails and a Kolmogorov-Smirnov test, generous bounds."""
    z = NoiseSource.from_seed(1).standard_normal(N)
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert z.var() == pytest.approx(1.0, rel=0.02)
    assert abs(stats.skew(z)) < 0.05 and abs(stats.kurtosis(z)) < 0.1
    assert np.mean(np.abs(z) > 3) == pytest.approx(2 * stats.norm.sf(3), abs=0.001)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert stats.kstest(NoiseSource.from_seed(2).uniform(N), "uniform").pvalue > 1e-4
    assert NoiseSource.from_seed(3).standard_normal((3, 5)).shape == (3, 5)
    assert NoiseSource.from_seed(3).standard_normal(7).shape == (7,)  # odd count


def test_torch_and_numpy_adapters():
    src = NoiseSource.from_seed(4)
    t = src.randn((200, 300), dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.shape == (200, 300)
    assert float(t.float().std()) == pytest.approx(1.0, rel=0.03)
    noisy = gaussian_release(np.zeros(N), l2_sensitivity=2.0, noise_multiplier=1.5, rng=NoiseSource.from_seed(5))
    assert noisy.std() == pytest.approx(3.0, rel=0.02)
    assert "key" not in repr(src) and repr(src).startswith("NoiseSource(")


def test_bad_key_is_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        NoiseSource(b"short")


def test_dp_step_and_sampling_never_touch_torch_generators(monkeypatch):
    """The DP noise and the Poisson sample come from ChaCha20, not torch's Mersenne Twister."""

    def boom(*args, **kwargs):
        raise AssertionError("torch RNG used for DP randomness")

    for name in ("randn", "rand", "normal", "randn_like", "rand_like"):
        monkeypatch.setattr(torch, name, boom)
    out, _ = clip_and_noise([torch.zeros(2, 10)], max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    assert bool((out[0] != 0).all())
    assert poisson_sample(100, 0.5).numel() > 0
    out2, _ = clip_and_noise([torch.zeros(2, 10)], max_grad_norm=1.0, noise_multiplier=1.0,
                             expected_batch_size=1.0, noise=NoiseSource.from_seed(0))
    assert not torch.equal(out[0], out2[0])


def test_identical_torch_seeds_give_different_secure_noise():
    """Seeding torch's global generator the same way does not reproduce the noise."""
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        out, _ = clip_and_noise([torch.zeros(1, 100)], max_grad_norm=1.0, noise_multiplier=1.0,
                                expected_batch_size=1.0)
        draws.append(out[0])
    assert not torch.equal(draws[0], draws[1])


def test_hospital_rounds_use_the_chacha_source():
    """The round's generator is a NoiseSource, keyed secretly or from the seed."""
    from client.privacy_round import noise_source
    from common.config import load_config

    def make(cfg, seed):
        return noise_source(cfg, seed, "dp-noise")

    secure = make(load_config(overrides=["privacy.secure_rng=true"]), 5)
    seeded = make(load_config(overrides=["privacy.secure_rng=false"]), 5)
    assert isinstance(secure, NoiseSource) and isinstance(seeded, NoiseSource)
    np.testing.assert_array_equal(seeded.standard_normal(10),
                                  make(load_config(overrides=["privacy.secure_rng=false"]), 5).standard_normal(10))
