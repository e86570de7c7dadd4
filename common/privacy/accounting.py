"""Privacy accounting: epsilon of a composed history of subsampled Gaussian mechanisms.

Every mechanism a hospital runs on its records is described by one triple
``(noise_multiplier, sample_rate, steps)``: ``steps`` runs of a Gaussian mechanism with
noise standard deviation ``noise_multiplier * L2 sensitivity`` on a Poisson sample that
contains each privacy unit with probability ``sample_rate``. A DP-SGD round is
``(sigma, q, steps)``; a one-shot release of statistics over all records is
``(sigma, 1.0, 1)``.

The functions here are pure wrappers over Opacus's accountants
(``opacus.accountants.RDPAccountant`` and ``PRVAccountant``): the epsilon of a history
is exactly what a fresh Opacus accountant reports for that history, at Opacus's own
defaults (RDP orders ``RDPAccountant.DEFAULT_ALPHAS``; PRV ``eps_error = 0.01`` and
``delta_error = delta / 1000``). See docs/privacy.md, "Accountants".
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.analysis.prv import Domain, PoissonSubsampledGaussianPRV

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "BudgetExhaustedError",
    "Mechanism",
    "PrivacyAccountingError",
    "calibrate_noise_multiplier",
    "compress_history",
    "effective_noise_multiplier",
    "epsilon_for",
]

Accountant = Literal["rdp", "prv"]
#: One accounted mechanism: (noise_multiplier, sample_rate, steps).
Mechanism = tuple[float, float, int]

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: Calibration stops once the epsilon of the returned sigma is within this of the target
#: (same meaning and value as ``epsilon_tolerance`` in Opacus's ``get_noise_multiplier``).
EPSILON_TOLERANCE = 0.01
#: Largest noise multiplier the calibration tries (Opacus's ``MAX_SIGMA``).
MAX_NOISE_MULTIPLIER = 1e6
#: The calibration also stops when sigma is pinned to this relative width.
SIGMA_RELATIVE_WIDTH = 1e-9
#: The downward bracket search stops here (no useful mechanism has a smaller sigma).
SIGMA_FLOOR = 1e-6
#: Cap on the PRV accountant's discretisation grid (points). The grid grows without
#: bound as sigma shrinks (sigma = 0.001, q = 0.01 asks for 1.1e10 points, 84 GiB);
#: 2**24 points is about 130 MiB per array and covers 1e5 steps at sigma = 1, q = 0.01.
PRV_MAX_DOMAIN_POINTS = 2**24


class PrivacyAccountingError(ValueError):
    """An epsilon cannot be computed, or no noise multiplier meets the target."""


class BudgetExhaustedError(PrivacyAccountingError):
    """The privacy already spent leaves no room for the planned mechanism."""


class _PRVDomainTooLarge(PrivacyAccountingError):
    """The PRV grid for this history would exceed ``PRV_MAX_DOMAIN_POINTS``."""


class _GuardedPRVAccountant(PRVAccountant):
    """Opacus's PRV accountant that refuses a grid too large for this machine.

    ``PRVAccountant._get_domain`` only computes the grid's bounds and size; the arrays
    are allocated afterwards, so checking the size here prevents the allocation.
    (``opacus==1.6.0`` is pinned; a test exercises this hook.)
    """

    def __init__(self, *, max_domain_points: int) -> None:
        super().__init__()
        self.max_domain_points = max_domain_points

    def _get_domain(
        self,
        prvs: list[PoissonSubsampledGaussianPRV],
        num_self_compositions: list[int],
        eps_error: float,
        delta_error: float,
    ) -> Domain:
        domain = super()._get_domain(
            prvs=prvs,
            num_self_compositions=num_self_compositions,
            eps_error=eps_error,
            delta_error=delta_error,
        )
        if domain.size > self.max_domain_points:
            raise _PRVDomainTooLarge(
                f"the PRV accountant would need {domain.size:.3g} grid points "
                f"(limit {self.max_domain_points}) for a noise multiplier this small; "
                "use accountant 'rdp' or a larger noise multiplier"
            )
        return domain


# ---------------------------------------------------------------------------
# Validation and history handling
# ---------------------------------------------------------------------------


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"privacy.accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}; "
            "set it to 'rdp' or 'prv'"
        )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"privacy.delta must be in (0, 1), got {delta!r}; use e.g. 1e-5")


def _check_sample_rate(sample_rate: float, *, where: str) -> None:
    if not (isinstance(sample_rate, numbers.Real) and 0 < sample_rate <= 1):
        raise ValueError(
            f"{where}: sample rate must be in (0, 1], got {sample_rate!r}; "
            "use 1.0 for a mechanism that reads every record"
        )


def _check_steps(steps: int, *, where: str, minimum: int) -> None:
    is_int = isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
    if not is_int or steps < minimum:
        raise ValueError(f"{where}: steps must be an integer >= {minimum}, got {steps!r}")


def _check_mechanism(mechanism: Sequence[float], *, where: str) -> Mechanism:
    if len(mechanism) != 3:
        raise ValueError(
            f"{where} must be (noise_multiplier, sample_rate, steps), got {mechanism!r}"
        )
    sigma, q, steps = mechanism
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"{where}: noise multiplier must be a finite number > 0, got {sigma!r}; "
            "a mechanism without noise has no finite epsilon"
        )
    _check_sample_rate(q, where=where)
    _check_steps(steps, where=where, minimum=0)
    return float(sigma), float(q), int(steps)


def compress_history(history: Iterable[Sequence[float]]) -> list[Mechanism]:
    """Merge mechanisms with the same (noise multiplier, sample rate).

    Composition is commutative for both accountants (RDP curves add; PRVs convolve),
    so ``(s, q, a)`` and ``(s, q, b)`` anywhere in a history compose to ``(s, q, a + b)``.
    Entries with zero steps are dropped.

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, steps)
        Mechanisms in the order they ran.

    Returns
    -------
    list of (float, float, int)
        One triple per distinct ``(noise_multiplier, sample_rate)``, in order of first
        appearance.

    Raises
    ------
    ValueError
        If a triple is malformed (sigma <= 0, sample rate outside (0, 1], steps < 0).
    """
    merged: dict[tuple[float, float], int] = {}
    for i, mechanism in enumerate(history):
        sigma, q, steps = _check_mechanism(mechanism, where=f"mechanism #{i}")
        if steps:
            merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


# ---------------------------------------------------------------------------
# Epsilon
# ---------------------------------------------------------------------------


def epsilon_for(
    history: Iterable[Sequence[float]],
    *,
    delta: float,
    accountant: Accountant = "rdp",
    prv_max_domain_points: int = PRV_MAX_DOMAIN_POINTS,
) -> float:
    """Epsilon of the composition of a history of Poisson-subsampled Gaussian mechanisms.

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, steps)
        The mechanisms, in any order (composition is commutative). ``sample_rate = 1``
        is a plain Gaussian mechanism over all records.
    delta : float
        Target delta, in (0, 1).
    accountant : {"rdp", "prv"}
        ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov et al. 2019,
        arXiv:1908.10530) converted with Theorem 21 of Balle et al. 2020
        (arXiv:1905.09982), over Opacus's default orders. The orders stop at 63, so at
        delta = 1e-5 this bound never goes below about 0.103, however large sigma is.
        ``"prv"``: numerical composition of privacy loss random variables (Gopi et al.
        2021, arXiv:2106.02848); returns Opacus's upper bound (estimate + 0.01).
    prv_max_domain_points : int
        PRV only: refuse histories whose discretisation grid exceeds this many points.

    Returns
    -------
    float
        Epsilon (>= 0; ``inf`` when the history gives no useful guarantee). An empty
        history, or one with zero steps, gives 0.0.

    Raises
    ------
    ValueError
        If an argument or a mechanism is invalid.
    PrivacyAccountingError
        If the PRV accountant cannot compute this history (grid too large, delta too
        small for floating point, or a noise multiplier too small to discretise).
    """
    _check_accountant(accountant)
    _check_delta(delta)
    merged = compress_history(history)
    if not merged:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(merged, delta)
    acc = _GuardedPRVAccountant(max_domain_points=prv_max_domain_points)
    acc.history = list(merged)
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
        # RDP: an optimum at the edge of the order grid still gives a valid (looser)
        # bound. PRV at q = 1: log(1 - q) = -inf is the intended support boundary;
        # exp overflows to inf far in the tail, where the cdf is then exactly 1.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        try:
            eps = acc.get_epsilon(delta=delta)
        except _PRVDomainTooLarge:
            raise
        except (ValueError, RuntimeError, MemoryError, FloatingPointError) as err:
            raise PrivacyAccountingError(
                f"the {accountant} accountant cannot compute epsilon for history "
                f"{merged} at delta={delta}: {err}; use accountant 'rdp', a larger "
                "delta or a larger noise multiplier"
            ) from err
    return float(max(eps, 0.0))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at Opacus's default orders.

    A pure function of its two arguments, cached: the fractional orders cost about
    0.1 s per curve, and a hospital's round composes the same spent mechanisms again
    at every step of the noise calibration. Read-only, so no caller can change a cached curve.
    """
    curve = privacy_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                         orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(merged: Sequence[Mechanism], delta: float) -> float:
    """RDP epsilon of a compressed history: Opacus's ``RDPAccountant`` arithmetic, cached curves.

    ``compute_rdp(q, sigma, steps)`` is ``curve(q, sigma) * steps``, summed over the
    history as Opacus sums it, so the result equals ``RDPAccountant.get_epsilon`` bit for bit.
    """
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
        # An optimum at the edge of the order grid still gives a valid (looser) bound.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        try:
            rdp = sum([_rdp_per_step(float(sigma), float(q)) * steps for sigma, q, steps in merged])
            eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        except (ValueError, RuntimeError, MemoryError, FloatingPointError) as err:
            raise PrivacyAccountingError(
                f"the rdp accountant cannot compute epsilon for history {list(merged)} at delta={delta}: {err}; "
                "use a larger delta or a larger noise multiplier"
            ) from err
    return float(max(float(eps), 0.0))


def effective_noise_multiplier(noise_multiplier: float, *, ppo_epochs: int) -> float:
    """Noise multiplier of E noisy steps on the same Poisson sample, as one mechanism.

    When one Poisson-sampled batch is reused for ``E = ppo_epochs`` noisy gradient
    steps (PPO epochs), each step clipping every unit to norm C and adding fresh
    N(0, sigma^2 C^2) noise, one sampled step is accounted as
    ``(sigma / sqrt(E), q, 1)``, **not** as ``(sigma, q, E)``.

    Argument: for a fixed sample, the E steps are an adaptive composition of Gaussian
    mechanisms with the same L2 sensitivity C and noise sigma C (each later step may
    depend on earlier outputs through the parameters). Each is mu-GDP with
    mu = 1 / sigma, and E-fold adaptive composition of mu-GDP mechanisms is exactly
    sqrt(E) mu-GDP (Dong, Roth and Su 2022, composition of GDP): the same trade-off function
    as one Gaussian with multiplier sigma / sqrt(E). In RDP terms, E Gaussians give
    E alpha / (2 sigma^2) = alpha / (2 (sigma / sqrt(E))^2) at every order alpha.
    Subsampling is then applied once, because the E steps see the same subset: the
    subsampled mechanism's privacy depends on the base mechanism only through its
    dominating pair (Zhu, Dong and Wang 2022), which is that of the single Gaussian.
    Accounting ``(sigma, q, E)`` would instead assume E independent samples and
    understate epsilon.

    Requires: each unit contributes at most once (clipped to C) to each of the E steps,
    and the sample is drawn once, independently of the data.

    Parameters
    ----------
    noise_multiplier : float
        sigma of each of the E steps (noise std / clipping norm), > 0.
    ppo_epochs : int
        E, the number of noisy steps taken on the same sample, >= 1.

    Returns
    -------
    float
        ``noise_multiplier / sqrt(ppo_epochs)``.
    """
    if not (isinstance(noise_multiplier, numbers.Real) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier!r}")
    _check_steps(ppo_epochs, where="ppo_epochs", minimum=1)
    return float(noise_multiplier) / math.sqrt(ppo_epochs)


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    spent_history: Iterable[Sequence[float]] = (),
    epsilon_tolerance: float = EPSILON_TOLERANCE,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """Smallest noise multiplier that keeps the whole history within the target epsilon.

    Finds sigma such that ``epsilon_for(spent_history + [(sigma, sample_rate, steps)])``
    is at most ``target_epsilon`` and at least ``target_epsilon - epsilon_tolerance``
    (or sigma is pinned to relative width ``SIGMA_RELATIVE_WIDTH``). It never returns
    a sigma whose epsilon was not computed and found within the target.

    Method: a bracket [sigma_low, sigma_high] is found by doubling/halving from 1, then
    bisected, as in Opacus's ``get_noise_multiplier`` (which it matches on an empty
    history, within the tolerance); unlike it, this search also composes the spent
    history, and treats a sigma whose epsilon cannot be computed (PRV grid too large,
    PRV discretisation failure, both only for very small sigmas) as too small instead
    of failing. Cost: one :func:`epsilon_for` per step, about 15 to 25 steps.

    Parameters
    ----------
    target_epsilon : float
        Total budget, > 0.
    delta : float
        Target delta, in (0, 1).
    sample_rate : float
        Poisson sampling rate q of the planned mechanism, in (0, 1].
    steps : int
        Number of steps of the planned mechanism, >= 1.
    accountant : {"rdp", "prv"}
        As in :func:`epsilon_for`.
    spent_history : iterable of (noise_multiplier, sample_rate, steps)
        Mechanisms already run (e.g. a ledger's history).
    epsilon_tolerance : float
        Accepted shortfall below the target, > 0.
    max_noise_multiplier : float
        Give up above this sigma.

    Returns
    -------
    float
        The noise multiplier.

    Raises
    ------
    BudgetExhaustedError
        If ``spent_history`` alone already reaches ``target_epsilon``, or no sigma up to
        ``max_noise_multiplier`` fits the planned mechanism into what is left.
    """
    if not (isinstance(target_epsilon, numbers.Real) and target_epsilon > 0):
        raise ValueError(f"privacy.target_epsilon must be > 0, got {target_epsilon!r}")
    _check_delta(delta)
    _check_accountant(accountant)
    _check_sample_rate(sample_rate, where="planned mechanism")
    _check_steps(steps, where="planned mechanism", minimum=1)
    if not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")
    spent = compress_history(spent_history)

    spent_eps = epsilon_for(spent, delta=delta, accountant=accountant)
    if spent_eps >= target_epsilon:
        raise BudgetExhaustedError(
            f"privacy budget exhausted: already spent epsilon {spent_eps:.4g} of target "
            f"{target_epsilon:g} at delta={delta:g}; no further training or release is "
            "possible without raising privacy.target_epsilon"
        )

    evaluated: dict[float, float] = {}

    def eps_at(sigma: float) -> float:
        if sigma not in evaluated:
            try:
                planned = [*spent, (sigma, sample_rate, steps)]
                evaluated[sigma] = epsilon_for(planned, delta=delta, accountant=accountant)
            except PrivacyAccountingError:
                evaluated[sigma] = math.inf  # not computable: only for too small a sigma
        return evaluated[sigma]

    sigma_high = 1.0
    while eps_at(sigma_high) > target_epsilon:
        sigma_high *= 2
        if sigma_high > max_noise_multiplier:
            raise BudgetExhaustedError(
                f"privacy budget too small: even noise multiplier {max_noise_multiplier:g} "
                f"keeps epsilon above target {target_epsilon:g} (already spent "
                f"{spent_eps:.4g}) for {steps} steps at sample rate {sample_rate:g}; "
                "raise privacy.target_epsilon or plan fewer steps"
            )
    sigma_low = sigma_high / 2
    while eps_at(sigma_low) <= target_epsilon and sigma_low > SIGMA_FLOOR:
        sigma_high, sigma_low = sigma_low, sigma_low / 2  # bracket from below

    while (
        target_epsilon - eps_at(sigma_high) > epsilon_tolerance
        and sigma_high - sigma_low > SIGMA_RELATIVE_WIDTH * sigma_high
    ):
        sigma = (sigma_low + sigma_high) / 2
        if eps_at(sigma) <= target_epsilon:
            sigma_high = sigma
        else:
            sigma_low = sigma
    return sigma_high
