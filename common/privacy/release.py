"""Gaussian mechanism for the aggregate statistics a hospital may send.

A release adds N(0, (noise_multiplier * l2_sensitivity)^2) to every coordinate of a
vector computed from all of the hospital's records, once. It is accounted in the
privacy ledger as ``(noise_multiplier, 1.0, 1)`` (see docs/privacy.md, "Releasing
statistics"). Neighbouring datasets differ by adding or removing one privacy unit, as
in the DP-SGD accounting.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

__all__ = [
    "clamp_counts_and_means",
    "counts_and_sums_sensitivity",
    "eval_sums_sensitivity",
    "gaussian_release",
    "release_counts_and_sums",
    "release_eval_sums",
]


class NormalSource(Protocol):
    """Anything with NumPy's ``normal(loc, scale, size)``: a ``common.privacy.noise.NoiseSource``
    (ChaCha20; what hospitals use) or, in tests, a ``numpy.random.Generator``."""

    def normal(self, loc: float = ..., scale: float = ..., size: tuple[int, ...] = ...) -> np.ndarray: ...


def gaussian_release(
    values: np.ndarray,
    *,
    l2_sensitivity: float,
    noise_multiplier: float,
    rng: NormalSource,
) -> np.ndarray:
    """Gaussian mechanism: ``values + N(0, (noise_multiplier * l2_sensitivity)^2 I)``.

    Parameters
    ----------
    values : np.ndarray
        The exact statistics, any shape.
    l2_sensitivity : float
        Largest L2 change of ``values`` (as one flat vector) when one privacy unit is
        added or removed, > 0. The caller must guarantee it (clip before summing).
    noise_multiplier : float
        sigma, > 0: noise std in units of the sensitivity.
    rng : NormalSource
        Source of the noise: a ``NoiseSource`` (cryptographic) for real releases.

    Returns
    -------
    np.ndarray
        float64 array of the same shape.
    """
    if not (math.isfinite(l2_sensitivity) and l2_sensitivity > 0):
        raise ValueError(
            f"l2_sensitivity must be a finite number > 0, got {l2_sensitivity!r}"
        )
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(
            f"noise multiplier of a release must be a finite number > 0, got "
            f"{noise_multiplier!r} (privacy.stats_noise_multiplier sets it for the unit "
            "counts, privacy.eval_noise_multiplier for evaluation sums)"
        )
    exact = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(exact)):
        raise ValueError(f"values to release must be finite, got {exact.tolist()!r}")
    std = noise_multiplier * l2_sensitivity
    return exact + rng.normal(0.0, std, size=exact.shape)


def counts_and_sums_sensitivity(
    *, sum_bound: float, max_records_per_unit: int = 1
) -> float:
    """L2 sensitivity of the joint vector (per-domain counts, per-domain reward sums).

    One record adds 1 to the count of exactly one domain d and a reward r in
    [0, sum_bound] to the sum of the same domain, so adding or removing it changes
    the joint vector ``(counts, sums)`` in two coordinates, by (1, r): L2 norm
    sqrt(1 + r^2) <= sqrt(1 + sum_bound^2). A privacy unit of up to m records changes
    each domain's pair by (k_d, s_d) with sum_d k_d <= m and s_d <= k_d sum_bound, so
    the L2 norm is at most sqrt(sum_d k_d^2 (1 + sum_bound^2)) <= m sqrt(1 + sum_bound^2)
    (worst case: all m records in one domain).

    Parameters
    ----------
    sum_bound : float
        Largest reward one record can contribute, >= 0.
    max_records_per_unit : int
        m, the most records one privacy unit (record or patient) holds, >= 1.

    Returns
    -------
    float
        ``max_records_per_unit * sqrt(1 + sum_bound**2)``.
    """
    if not (math.isfinite(sum_bound) and sum_bound >= 0):
        raise ValueError(f"sum_bound must be a finite number >= 0, got {sum_bound!r}")
    m = max_records_per_unit
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"max_records_per_unit must be an integer >= 1, got {m!r}")
    return max_records_per_unit * math.sqrt(1.0 + sum_bound**2)


def release_counts_and_sums(
    counts: np.ndarray,
    sums: np.ndarray,
    *,
    noise_multiplier: float,
    sum_bound: float,
    rng: np.random.Generator,
    max_records_per_unit: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """DP release of per-domain record counts and reward sums (one Gaussian mechanism).

    Each record contributes to exactly one domain: count 1 and a reward clipped to
    [0, sum_bound]. Noise of std ``noise_multiplier * sensitivity`` is added to every
    coordinate of both vectors, with the joint sensitivity of
    :func:`counts_and_sums_sensitivity`. Noisy counts may be negative or fractional;
    post-process with :func:`clamp_counts_and_means`. Account as
    ``(noise_multiplier, 1.0, 1)``.

    Parameters
    ----------
    counts : np.ndarray
        (D,) exact record counts per domain, >= 0.
    sums : np.ndarray
        (D,) exact reward sums per domain; each record's reward must already be
        clipped to [0, sum_bound].
    noise_multiplier : float
        sigma, > 0.
    sum_bound : float
        Largest per-record reward, >= 0.
    rng : np.random.Generator
        Source of the noise.
    max_records_per_unit : int
        Most records per privacy unit (1 for record-level privacy).

    Returns
    -------
    (np.ndarray, np.ndarray)
        (D,) noisy counts and (D,) noisy sums, float64.

    Raises
    ------
    ValueError
        If shapes differ, or a sum lies outside [0, count * sum_bound], which means
        rewards were not clipped and the stated sensitivity would be wrong.
    """
    counts = np.asarray(counts, dtype=np.float64)
    sums = np.asarray(sums, dtype=np.float64)
    if counts.ndim != 1 or counts.shape != sums.shape:
        raise ValueError(
            f"counts and sums must be 1-D arrays of the same length, got shapes "
            f"{counts.shape} and {sums.shape}"
        )
    if np.any(counts < 0):
        raise ValueError(f"counts must be >= 0, got {counts.tolist()}")
    # A tolerance for floating-point sums of clipped rewards.
    slack = 1e-9 * np.maximum(1.0, counts * sum_bound)
    bad = (sums < -slack) | (sums > counts * sum_bound + slack)
    if np.any(bad):
        d = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"reward sum {float(sums[d]):g} of domain #{d} is outside [0, {counts[d]:g} * "
            f"{sum_bound:g}]: clip each record's reward to [0, {sum_bound:g}] before "
            "summing"
        )
    sensitivity = counts_and_sums_sensitivity(
        sum_bound=sum_bound, max_records_per_unit=max_records_per_unit
    )
    joint = np.concatenate([counts, sums])  # (2D,)
    noisy = gaussian_release(
        joint, l2_sensitivity=sensitivity, noise_multiplier=noise_multiplier, rng=rng
    )
    return noisy[: counts.size], noisy[counts.size :]


def clamp_counts_and_means(
    noisy_counts: np.ndarray,
    noisy_sums: np.ndarray,
    *,
    sum_bound: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Post-process released counts and sums (free under DP: no data is read).

    Parameters
    ----------
    noisy_counts, noisy_sums : np.ndarray
        (D,) outputs of :func:`release_counts_and_sums`.
    sum_bound : float
        Largest per-record reward.

    Returns
    -------
    (np.ndarray, np.ndarray)
        (D,) counts clamped to >= 0, and (D,) mean rewards ``sum / count`` clamped to
        [0, sum_bound], NaN where the clamped count is 0 (no usable estimate).
    """
    counts = np.maximum(np.asarray(noisy_counts, dtype=np.float64), 0.0)
    sums = np.asarray(noisy_sums, dtype=np.float64)
    means = np.full_like(counts, np.nan)
    positive = counts > 0
    means[positive] = np.clip(sums[positive] / counts[positive], 0.0, sum_bound)
    return counts, means


def eval_sums_sensitivity(num_sums: int) -> float:
    """L2 sensitivity of the joint per-domain vector (units, sum_1, ..., sum_k).

    Every privacy unit spreads a total weight of at most 1 over its records (1 for a
    record unit, 1/m for each record of a patient with m records); a record of weight w
    in domain d adds w to ``units[d]`` and w * v_j to ``sum_j[d]`` with v_j in [0, 1].
    One record's vector (1, v_1, ..., v_k) has L2 norm at most sqrt(1 + k), and a unit's
    change is a weighted sum of its records' vectors with weights summing to at most 1,
    so by the triangle inequality it is at most sqrt(1 + k) whatever the domains.

    Parameters
    ----------
    num_sums : int
        k >= 0, the number of per-record values summed besides the unit weight.

    Returns
    -------
    float
        ``sqrt(1 + num_sums)``.
    """
    if isinstance(num_sums, bool) or not isinstance(num_sums, int) or num_sums < 0:
        raise ValueError(f"num_sums must be an integer >= 0, got {num_sums!r}")
    return math.sqrt(1.0 + num_sums)


def release_eval_sums(
    units: np.ndarray,
    sums: list[np.ndarray],
    *,
    noise_multiplier: float,
    rng: NormalSource,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """DP release of per-domain evaluation sums (one Gaussian mechanism).

    Parameters
    ----------
    units : np.ndarray
        (D,) unit-weighted record counts per domain, >= 0 (see
        :func:`eval_sums_sensitivity` for the weighting).
    sums : list of np.ndarray
        k arrays (D,): per domain, the unit-weighted sum of a per-record value in [0, 1]
        (accuracy, reward, ...); each must lie in [0, units[d]].
    noise_multiplier : float
        sigma, > 0; noise std is ``sigma * sqrt(1 + k)``.
    rng : NormalSource
        Source of the noise.

    Returns
    -------
    (np.ndarray, list of np.ndarray)
        Noisy units and noisy sums (float64; may be negative). Account as
        ``(noise_multiplier, 1.0, 1)``.

    Raises
    ------
    ValueError
        If shapes differ, or a sum lies outside [0, units], which means a value was not
        in [0, 1] and the stated sensitivity would be wrong.
    """
    units = np.asarray(units, dtype=np.float64)
    arrays = [np.asarray(x, dtype=np.float64) for x in sums]
    if units.ndim != 1 or any(a.shape != units.shape for a in arrays):
        raise ValueError(
            f"units and sums must be 1-D arrays of the same length, got shapes "
            f"{units.shape} and {[a.shape for a in arrays]}"
        )
    if np.any(units < 0):
        raise ValueError(f"units must be >= 0, got {units.tolist()}")
    slack = 1e-9 * np.maximum(1.0, units)
    for j, a in enumerate(arrays):
        bad = (a < -slack) | (a > units + slack)
        if np.any(bad):
            d = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"sum #{j} of domain #{d} is {float(a[d]):g}, outside [0, {units[d]:g}]: "
                "every per-record value must lie in [0, 1]"
            )
    joint = np.concatenate([units, *arrays])
    noisy = gaussian_release(
        joint,
        l2_sensitivity=eval_sums_sensitivity(len(arrays)),
        noise_multiplier=noise_multiplier,
        rng=rng,
    )
    n = units.size
    return noisy[:n], [noisy[(j + 1) * n : (j + 2) * n] for j in range(len(arrays))]
