"""Small deterministic k-means and the elbow rule used by DRPO's clustering.

DRPO (QoQ-Med, arXiv 2506.00711, Sec. 3.3 and App. B.1) clusters the reward vectors
of one domain's questions with k-means and picks the number of clusters with an elbow
rule. The inputs are tiny (tens to thousands of rows of 2 to 10 columns, many of them
identical), so the implementation works on the distinct rows weighted by their
multiplicity: this is exactly k-means on the full set (same k-means++ distribution,
same Lloyd updates, same inertia) and makes duplicates harmless.
"""

from __future__ import annotations

import numpy as np


def _check_points(points: np.ndarray) -> np.ndarray:
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"points must be a non-empty 2-D array (n, d), got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("points contain NaN or inf; pass finite values only")
    return x


def _distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows, the index of each input row's distinct row, and the counts."""
    rows, inverse, counts = np.unique(
        x, axis=0, return_inverse=True, return_counts=True
    )
    return rows, inverse.reshape(-1), counts.astype(np.float64)


def _sq_dist(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (m, k); exactly 0 between identical rows."""
    diff = rows[:, None, :] - centres[None, :, :]  # (m, k, d)
    return np.einsum("mkd,mkd->mk", diff, diff)


def _plus_plus_init(
    rows: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """k-means++ seeding on weighted distinct rows (one candidate per step)."""
    m = rows.shape[0]
    first = rng.choice(m, p=weights / weights.sum())
    chosen = [first]
    closest = _sq_dist(rows, rows[[first]])[:, 0]  # (m,)
    for _ in range(1, k):
        mass = weights * closest
        total = mass.sum()
        if total > 0:
            nxt = rng.choice(m, p=mass / total)
        else:
            # Every distinct row is already a centre (k exceeds the distinct rows):
            # the extra centres duplicate existing ones and their clusters stay empty.
            nxt = rng.choice(m, p=weights / weights.sum())
        chosen.append(nxt)
        closest = np.minimum(closest, _sq_dist(rows, rows[[nxt]])[:, 0])
    return rows[chosen].copy()


def _update_centres(
    rows: np.ndarray,
    weights: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    dist: np.ndarray,
) -> np.ndarray:
    """Weighted means per cluster; an empty cluster takes the farthest row."""
    k = centres.shape[0]
    new = centres.copy()
    mass = np.bincount(labels, weights=weights, minlength=k)  # (k,)
    sums = np.zeros_like(centres)
    np.add.at(sums, labels, rows * weights[:, None])
    filled = mass > 0
    new[filled] = sums[filled] / mass[filled, None]
    own = dist[np.arange(rows.shape[0]), labels].copy()  # (m,)
    for j in np.flatnonzero(~filled):
        far = int(np.argmax(own))
        if own[far] <= 0:
            break  # every row sits on its centre: nothing to move, keep the centre
        new[j] = rows[far]
        own[far] = 0.0
    return new


def _lloyd(
    rows: np.ndarray, weights: np.ndarray, centres: np.ndarray, max_iter: int
) -> tuple[np.ndarray, np.ndarray, float]:
    labels: np.ndarray | None = None
    for _ in range(max_iter):
        dist = _sq_dist(rows, centres)
        new_labels = dist.argmin(axis=1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centres = _update_centres(rows, weights, labels, centres, dist)
    dist = _sq_dist(rows, centres)
    labels = dist.argmin(axis=1)
    inertia = float((weights * dist[np.arange(rows.shape[0]), labels]).sum())
    return labels, centres, inertia


def kmeans(
    points: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 4,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs.

    Deterministic: all runs draw from one ``numpy.random.default_rng(seed)``.
    Duplicate points are fine. With ``k`` equal to the number of distinct points
    every distinct point gets its own cluster and the inertia is 0. With ``k``
    larger than that, the extra clusters are empty (their centroids duplicate
    existing ones) and ``labels`` uses fewer than ``k`` values.

    Parameters
    ----------
    points : numpy.ndarray, shape (n, d)
        Finite points.
    k : int
        Number of clusters, ``1 <= k <= n``.
    seed : int
        Seed of the k-means++ draws.
    n_init : int
        Number of seedings; the run with the lowest inertia wins (the first on ties).
    max_iter : int
        Maximum Lloyd iterations per run; a run stops earlier when the assignment
        no longer changes.

    Returns
    -------
    labels : numpy.ndarray of int64, shape (n,)
        Cluster of each point.
    centroids : numpy.ndarray, shape (k, d)
        Cluster centres.
    inertia : float
        Sum of squared distances of the points to their centroids.
    """
    x = _check_points(points)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= n:
        raise ValueError(
            f"k must be an integer in [1, {n}] (the number of points), got {k!r}"
        )
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    rows, inverse, weights = _distinct_rows(x)
    rng = np.random.default_rng(seed)
    runs = (
        _lloyd(rows, weights, _plus_plus_init(rows, weights, int(k), rng), max_iter)
        for _ in range(n_init)
    )
    # min keeps the first of equal inertias, so ties go to the earliest run.
    labels, centres, inertia = min(runs, key=lambda run: run[2])
    return labels[inverse].astype(np.int64), centres, inertia


def elbow_choice(inertias: list[float], *, tol: float = 0.10) -> int | None:
    """The elbow rule on inertias ``I_1, I_2, ...`` (list index 0 holds ``I_1``).

    With ``drop[i] = I_{i+1} - I_{i+2}``, returns ``i + 1`` for the first ``i >= 1``
    with ``drop[i] < tol * drop[i - 1]``, or None if no ``i`` qualifies yet.
    """
    drops = [inertias[i] - inertias[i + 1] for i in range(len(inertias) - 1)]
    for i in range(1, len(drops)):
        if drops[i] < tol * drops[i - 1]:
            return i + 1
    return None


def merge_small_clusters(
    points: np.ndarray, labels: np.ndarray, *, min_size: int
) -> np.ndarray:
    """Fold every cluster of fewer than ``min_size`` points into its nearest neighbour.

    Repeatedly, the smallest cluster below ``min_size`` (ties: the lowest label) moves
    all its points to the cluster whose centroid (mean) is nearest to its own (ties:
    the lowest label), until every cluster has ``min_size`` points or one is left.

    Parameters
    ----------
    points : numpy.ndarray, shape (n, d)
        Finite points.
    labels : numpy.ndarray of int, shape (n,)
        Cluster of each point.
    min_size : int
        Smallest allowed cluster (>= 1; 1 changes nothing but the numbering).

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
        New labels, numbered 0..k-1 in the order of the old labels.
    """
    x = _check_points(points)
    current = np.asarray(labels).reshape(-1)
    if current.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels has {current.shape[0]} entries for {x.shape[0]} points"
        )
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size!r}")
    current = np.unique(current, return_inverse=True)[1].reshape(-1)  # 0..k-1
    while True:
        sizes = np.bincount(current)  # (k,)
        small = np.flatnonzero(sizes < min_size)
        if sizes.shape[0] == 1 or small.shape[0] == 0:
            return current.astype(np.int64)
        victim = int(small[np.argmin(sizes[small])])  # argmin: the lowest label on ties
        centres = np.stack([x[current == c].mean(axis=0) for c in range(len(sizes))])
        dist = _sq_dist(centres[[victim]], centres)[0]  # (k,)
        dist[victim] = np.inf
        current[current == victim] = int(np.argmin(dist))
        current = np.unique(current, return_inverse=True)[1].reshape(-1)


def select_k_elbow(
    points: np.ndarray,
    *,
    k_max: int = 10,
    tol: float = 0.10,
    min_size: int = 1,
    seed: int = 0,
    n_init: int = 4,
    max_iter: int = 100,
) -> tuple[int, np.ndarray]:
    """Choose the number of clusters with the elbow rule and cluster the points.

    Stop adding clusters when the next one would remove less than ``tol`` times
    what the previous one removed. Precisely, as in the released QoQ-Med code: with
    ``k_eff = min(k_max, number of distinct rows)``, inertias ``I_1 .. I_k_eff`` and
    ``drop[i] = I_{i+1} - I_{i+2}`` (0-based ``i``), the first ``i >= 1`` with
    ``drop[i] < tol * drop[i-1]`` gives ``k = i + 1``; if there is none,
    ``k = k_eff``. The rule therefore never returns 1 unless there is only one
    distinct row (or ``k_max`` is 1), and two distinct rows always give 2.
    Inertias are computed lazily, stopping as soon as the rule fires.

    With ``min_size > 1`` no cluster is smaller than ``min_size`` points (unless
    there are fewer points than that, giving one cluster): at most
    ``n // min_size`` clusters are tried, and clusters of the chosen k-means that are
    still too small are folded into their nearest neighbour
    (:func:`merge_small_clusters`), so the returned ``k`` may be lower than the
    elbow's. ``min_size=1`` is the rule above, unchanged.

    Parameters
    ----------
    points : numpy.ndarray, shape (n, d)
        Finite points (here: one reward vector per question).
    k_max : int
        Largest number of clusters tried (10 in the paper and released code, 3 in
        a later fork).
    tol : float
        Relative drop below which adding clusters stops (0.10).
    min_size : int
        Fewest points per cluster (>= 1).
    seed, n_init, max_iter
        Passed to :func:`kmeans` for every ``k``.

    Returns
    -------
    k : int
        The chosen number of clusters.
    labels : numpy.ndarray of int64, shape (n,)
        Cluster of each point for that ``k``.
    """
    x = _check_points(points)
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)):
        raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
    if k_max < 1:
        raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)):
        raise ValueError(f"min_size must be an integer >= 1, got {min_size!r}")
    if min_size < 1:
        raise ValueError(f"min_size must be an integer >= 1, got {min_size!r}")
    by_size = max(1, x.shape[0] // int(min_size))
    k_eff = min(int(k_max), _distinct_rows(x)[0].shape[0], by_size)
    inertias: list[float] = []
    labels_by_k: list[np.ndarray] = []
    chosen: int | None = None
    for k in range(1, k_eff + 1):
        labels, _, inertia = kmeans(x, k, seed=seed, n_init=n_init, max_iter=max_iter)
        inertias.append(inertia)
        labels_by_k.append(labels)
        chosen = elbow_choice(inertias, tol=tol)
        if chosen is not None:
            break
    labels = labels_by_k[(chosen or k_eff) - 1]
    if min_size == 1:
        return chosen or k_eff, labels
    merged = merge_small_clusters(x, labels, min_size=int(min_size))
    return int(merged.max()) + 1, merged
