"""Tests of common.privacy.accounting against fresh Opacus accountants and closed forms.

Reference numbers: q = 0.01, sigma = 1.0, 1000 steps, delta = 1e-5 gives RDP epsilon
2.1014 and PRV epsilon 1.8384 (docs of the ML stack, section 6). A plain Gaussian
mechanism (q = 1) has the exact privacy profile of Balle and Wang (2018, analytic Gaussian):
delta(eps) = Phi(1 / (2 s) - eps s) - e^eps Phi(-1 / (2 s) - eps s) for noise multiplier s.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from opacus.accountants.utils import get_noise_multiplier
from scipy.optimize import brentq
from scipy.stats import norm

from common.privacy.accounting import (
    BudgetExhaustedError,
    PrivacyAccountingError,
    calibrate_noise_multiplier,
    compress_history,
    effective_noise_multiplier,
    epsilon_for,
)

DELTA = 1e-5


def fresh_epsilon(history, accountant: str, delta: float = DELTA) -> float:
    """Epsilon from a brand-new Opacus accountant fed the raw history."""
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def exact_gaussian_epsilon(sigma: float, delta: float = DELTA) -> float:
    """Exact epsilon of one Gaussian mechanism with noise multiplier sigma (Balle-Wang)."""

    def excess(eps: float) -> float:
        return (
            norm.cdf(1 / (2 * sigma) - eps * sigma)
            - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
            - delta
        )

    return brentq(excess, 0.0, 100.0)


# ---------------------------------------------------------------------------
# epsilon_for
# ---------------------------------------------------------------------------


def test_reference_numbers():
    """The documented reference values come back for both accountants."""
    history = [(1.0, 0.01, 1000)]
    assert epsilon_for(history, delta=DELTA, accountant="rdp") == pytest.approx(2.1014, abs=1e-4)
    assert epsilon_for(history, delta=DELTA, accountant="prv") == pytest.approx(1.8384, abs=1e-4)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_heterogeneous_history_matches_fresh_accountant(accountant):
    """A mixed history (training rounds and q = 1 releases) equals a fresh accountant."""
    history = [(1.1, 0.02, 40), (3.0, 1.0, 1), (1.1, 0.02, 40), (2.0, 1.0, 1), (0.9, 0.05, 10)]
    expected = fresh_epsilon(history, accountant)
    assert epsilon_for(history, delta=DELTA, accountant=accountant) == pytest.approx(
        expected, rel=1e-6
    )
    # Order does not matter (composition commutes).
    assert epsilon_for(history[::-1], delta=DELTA, accountant=accountant) == pytest.approx(
        expected, rel=1e-6
    )


def test_rdp_epsilon_equals_opacus_bit_for_bit_with_cached_curves():
    """The cached per-step curves give Opacus's number exactly, also when asked again."""
    history = [(1.1, 0.02, 40), (3.0, 1.0, 1), (0.9, 0.05, 10), (7.5, 0.3, 3)]
    merged = compress_history(history)
    expected = fresh_epsilon(merged, "rdp")
    assert epsilon_for(history, delta=DELTA) == expected  # first call fills the cache
    assert epsilon_for(history, delta=DELTA) == expected  # second call reads it
    assert epsilon_for(history[:2], delta=DELTA) == fresh_epsilon(compress_history(history[:2]), "rdp")


def test_cached_rdp_curves_cannot_be_changed_by_a_caller():
    from common.privacy.accounting import _rdp_per_step

    curve = _rdp_per_step(1.3, 0.04)
    with pytest.raises(ValueError):
        curve[0] = 0.0
    assert np.array_equal(curve, compute_rdp(q=0.04, noise_multiplier=1.3, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def test_compress_history_merges_equal_mechanisms_and_drops_zero_steps():
    """Equal (sigma, q) pairs are merged wherever they occur; zero-step entries vanish."""
    history = [(1.0, 0.01, 5), (2.0, 1.0, 1), (1.0, 0.01, 7), (3.0, 0.5, 0), (2.0, 1.0, 1)]
    assert compress_history(history) == [(1.0, 0.01, 12), (2.0, 1.0, 2)]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_empty_history_is_zero(accountant):
    """Nothing run, nothing spent."""
    assert epsilon_for([], delta=DELTA, accountant=accountant) == 0.0
    assert epsilon_for([(1.0, 0.01, 0)], delta=DELTA, accountant=accountant) == 0.0


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0])
def test_prv_at_q_one_is_the_exact_gaussian_plus_its_error_bound(sigma):
    """PRV handles q = 1: it returns the exact epsilon at delta - delta/1000, plus 0.01.

    Opacus's PRV upper bound is eps(delta - delta_error) + eps_error with
    delta_error = delta / 1000 and eps_error = 0.01; the discretisation adds < 1e-4.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the q = 1 log(0) warning must not leak out
        got = epsilon_for([(sigma, 1.0, 1)], delta=DELTA, accountant="prv")
    assert got >= exact_gaussian_epsilon(sigma)
    assert got == pytest.approx(exact_gaussian_epsilon(sigma, DELTA * 0.999) + 0.01, abs=1e-4)


def test_rdp_at_q_one_is_the_closed_form_conversion():
    """RDP at q = 1 is alpha / (2 sigma^2), converted with Balle et al. 2020, Thm 21."""
    sigma = 2.0
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = alphas / (2 * sigma**2)
    eps = rdp - (math.log(DELTA) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    got = epsilon_for([(sigma, 1.0, 1)], delta=DELTA, accountant="rdp")
    assert got == pytest.approx(float(eps.min()), rel=1e-9)
    assert got >= exact_gaussian_epsilon(sigma)


@pytest.mark.parametrize(
    "history, fragment",
    [
        ([(0.0, 0.01, 10)], "0.0"),
        ([(1.0, 0.0, 10)], "0.0"),
        ([(1.0, 1.5, 10)], "1.5"),
        ([(1.0, 0.01, -1)], "-1"),
        ([(1.0, 0.01, 2.5)], "2.5"),
        ([(1.0, 0.01)], "(1.0, 0.01)"),
    ],
)
def test_bad_mechanisms_are_named(history, fragment):
    """A malformed mechanism raises ValueError naming the value."""
    with pytest.raises(ValueError, match=r"mechanism #0") as info:
        epsilon_for(history, delta=DELTA)
    assert fragment in str(info.value)


def test_bad_accountant_and_delta():
    """Unknown accountant and out-of-range delta are refused with their values."""
    with pytest.raises(ValueError, match="'gdp'"):
        epsilon_for([(1.0, 0.01, 1)], delta=DELTA, accountant="gdp")
    with pytest.raises(ValueError, match="privacy.delta .* got 0"):
        epsilon_for([(1.0, 0.01, 1)], delta=0)


def test_prv_refuses_a_huge_grid_before_allocating(monkeypatch):
    """sigma = 0.001 would make PRV allocate ~84 GiB; it is refused before any grid exists."""
    import opacus.accountants.prv as prv_module

    def no_allocation(*args, **kwargs):
        raise AssertionError("the PRV grid was discretised (allocated) despite its size")

    monkeypatch.setattr(prv_module, "discretize", no_allocation)
    with pytest.raises(PrivacyAccountingError, match="grid points"):
        epsilon_for([(1e-3, 0.01, 10)], delta=DELTA, accountant="prv")


def test_the_allocation_guard_sees_normal_prv_runs(monkeypatch):
    """Control for the test above: a normal PRV computation does reach the discretisation."""
    import opacus.accountants.prv as prv_module

    def no_allocation(*args, **kwargs):
        raise AssertionError("reached")

    monkeypatch.setattr(prv_module, "discretize", no_allocation)
    with pytest.raises(AssertionError, match="reached"):
        epsilon_for([(1.0, 0.01, 10)], delta=DELTA, accountant="prv")


def test_prv_failure_becomes_a_clear_error():
    """PRV's discretisation failure for a tiny sigma at q = 1 is reported as such."""
    with pytest.raises(PrivacyAccountingError, match="use accountant 'rdp'"):
        epsilon_for([(0.01, 1.0, 1)], delta=DELTA, accountant="prv")


# ---------------------------------------------------------------------------
# effective_noise_multiplier
# ---------------------------------------------------------------------------


def test_effective_noise_multiplier_by_hand():
    """sigma / sqrt(E): 2 / sqrt(4) = 1, 3 / sqrt(1) = 3."""
    assert effective_noise_multiplier(2.0, ppo_epochs=4) == 1.0
    assert effective_noise_multiplier(3.0, ppo_epochs=1) == 3.0
    with pytest.raises(ValueError, match="got 0"):
        effective_noise_multiplier(1.0, ppo_epochs=0)


def test_e_gaussians_equal_one_gaussian_with_sigma_over_sqrt_e():
    """Before subsampling, E Gaussians and one sigma/sqrt(E) Gaussian have equal RDP and PRV."""
    sigma, epochs = 3.0, 4
    orders = [1.5, 2.0, 8.0, 32.0]
    composed = compute_rdp(q=1.0, noise_multiplier=sigma, steps=epochs, orders=orders)
    single = compute_rdp(
        q=1.0, noise_multiplier=effective_noise_multiplier(sigma, ppo_epochs=epochs), steps=1,
        orders=orders,
    )
    np.testing.assert_allclose(composed, single, rtol=1e-12)
    # PRV composes numerically; both agree within its error bounds (0.01 each).
    assert fresh_epsilon([(sigma, 1.0, epochs)], "prv") == pytest.approx(
        fresh_epsilon([(sigma / 2, 1.0, 1)], "prv"), abs=0.02
    )


def test_reused_sample_costs_more_than_independent_samples():
    """(sigma/sqrt(E), q, 1) > (sigma, q, E): reusing a sample forgoes E-fold amplification."""
    reused = epsilon_for([(effective_noise_multiplier(1.0, ppo_epochs=4), 0.01, 1)], delta=DELTA)
    independent = epsilon_for([(1.0, 0.01, 4)], delta=DELTA)
    assert reused > independent


# ---------------------------------------------------------------------------
# calibrate_noise_multiplier
# ---------------------------------------------------------------------------


def opacus_sigma(**kwargs) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_noise_multiplier(target_delta=DELTA, **kwargs)


@pytest.mark.parametrize(
    "accountant, sample_rate, steps, target",
    [("rdp", 0.01, 1000, 3.0), ("prv", 1.0, 1, 1.0)],
)
def test_calibration_matches_opacus_on_an_empty_history(accountant, sample_rate, steps, target):
    """Same answer as Opacus's get_noise_multiplier, and within [target - 0.01, target]."""
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=sample_rate, steps=steps,
        accountant=accountant,
    )
    reference = opacus_sigma(
        target_epsilon=target, sample_rate=sample_rate, steps=steps, accountant=accountant
    )
    assert sigma == pytest.approx(reference, rel=0.01)
    eps = fresh_epsilon([(sigma, sample_rate, steps)], accountant)
    assert target - 0.01 <= eps <= target


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_composes_the_spent_history(accountant):
    """With spending already recorded, the new mechanism fills the rest of the budget, no more."""
    spent = [(2.0, 0.01, 300), (4.0, 1.0, 2)]
    target, q, steps = 3.0, 0.01, 100
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps,
        accountant=accountant, spent_history=spent,
    )
    assert target - 0.01 <= fresh_epsilon([*spent, (sigma, q, steps)], accountant) <= target
    # Smallest: 3% less noise would overshoot.
    assert fresh_epsilon([*spent, (0.97 * sigma, q, steps)], accountant) > target


def test_calibration_refuses_an_exhausted_budget():
    """Spent >= target: BudgetExhaustedError naming both numbers."""
    spent = [(0.5, 0.01, 1000)]  # epsilon about 15.5
    with pytest.raises(BudgetExhaustedError, match=r"spent epsilon 15\.\d+ of target 8"):
        calibrate_noise_multiplier(
            target_epsilon=8.0, delta=DELTA, sample_rate=0.01, steps=10, spent_history=spent
        )


def test_calibration_refuses_an_unreachable_target():
    """RDP over Opacus's orders cannot certify epsilon < ~0.103 at delta 1e-5, whatever sigma."""
    with pytest.raises(BudgetExhaustedError, match="target 0.05"):
        calibrate_noise_multiplier(target_epsilon=0.05, delta=DELTA, sample_rate=0.01, steps=1000)
