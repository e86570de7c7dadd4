"""Tests of common.kmeans against hand-computed inertias and elbow choices."""

from __future__ import annotations

import numpy as np
import pytest

from common.kmeans import elbow_choice, kmeans, merge_small_clusters, select_k_elbow


def same_partition(labels: np.ndarray, groups: list[list[int]]) -> bool:
    """Whether ``labels`` puts exactly the indices of each group together."""
    ids = [{int(labels[i]) for i in group} for group in groups]
    return all(len(s) == 1 for s in ids) and len(set().union(*ids)) == len(groups)


# ---------------------------------------------------------------------------
# kmeans
# ---------------------------------------------------------------------------


def test_kmeans_inertias_on_three_points():
    points = np.array([[0.0], [2.0], [10.0]])
    # k = 1: centroid 4; inertia 4^2 + 2^2 + 6^2 = 16 + 4 + 36 = 56
    _, centroids, inertia = kmeans(points, 1)
    assert inertia == pytest.approx(56.0)
    assert centroids[0, 0] == pytest.approx(4.0)
    # k = 2: {0, 2} around 1 and {10}; inertia 1 + 1 + 0 = 2
    labels, centroids, inertia = kmeans(points, 2)
    assert inertia == pytest.approx(2.0)
    assert same_partition(labels, [[0, 1], [2]])
    assert sorted(centroids[:, 0].tolist()) == pytest.approx([1.0, 10.0])
    # k = 3: every point its own centroid
    _, _, inertia = kmeans(points, 3)
    assert inertia == 0.0


RECTANGLE = np.array([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
# Corners of a 4 x 2 rectangle. Left/right split: centroids (0, 1) and (4, 1), each
# point at squared distance 1 -> inertia 4. Top/bottom split: centroids (2, 0) and
# (2, 2), each point at squared distance 4 -> inertia 16; it is a Lloyd fixed point
# too, reached when k-means++ seeds (0, 0) and (0, 2) (probability 4 / 40 after a
# first pick of (0, 0)).


def test_kmeans_finds_the_better_split_of_a_rectangle():
    labels, _, inertia = kmeans(RECTANGLE, 2)
    assert inertia == pytest.approx(4.0)
    assert same_partition(labels, [[0, 1], [2, 3]])


def test_kmeans_keeps_the_best_of_its_inits():
    # Seed 1's first seeding lands in the top/bottom fixed point (found by trying
    # seeds); the later seedings of the same generator find left/right.
    assert kmeans(RECTANGLE, 2, seed=1, n_init=1)[2] == pytest.approx(16.0)
    labels, _, inertia = kmeans(RECTANGLE, 2, seed=1, n_init=4)
    assert inertia == pytest.approx(4.0)
    assert same_partition(labels, [[0, 1], [2, 3]])


def test_kmeans_duplicates_with_k_equal_to_distinct_points():
    # 3 distinct rows, k = 3: each distinct row is a cluster, inertia 0.
    # k = 1: mean 3; 9 + 9 + 1 + 49 = 68
    points = np.array([[0.0], [0.0], [2.0], [10.0]])
    labels, centroids, inertia = kmeans(points, 3)
    assert inertia == 0.0
    assert same_partition(labels, [[0, 1], [2], [3]])
    assert np.isfinite(centroids).all()
    assert kmeans(points, 1)[2] == pytest.approx(68.0)


def test_kmeans_more_clusters_than_distinct_points_does_not_crash():
    points = np.ones((4, 3))
    labels, centroids, inertia = kmeans(points, 3)
    assert inertia == 0.0
    assert np.isfinite(centroids).all()
    assert len(set(labels.tolist())) == 1


def test_negative_zero_is_the_same_row_as_zero():
    # -0.0 and 0.0 are one distinct row: one distinct row -> k = 1.
    k, labels = select_k_elbow(np.array([[0.0, 1.0], [-0.0, 1.0]]))
    assert k == 1
    assert labels.tolist() == [0, 0]


def test_kmeans_is_deterministic_for_a_seed():
    rng = np.random.default_rng(7)
    points = rng.random((40, 5))
    first = kmeans(points, 4, seed=3)
    second = kmeans(points, 4, seed=3)
    assert np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]


@pytest.mark.parametrize("k", [0, 4, 2.0, True])
def test_kmeans_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be an integer"):
        kmeans(np.zeros((3, 2)), k)


def test_kmeans_rejects_non_finite_points():
    with pytest.raises(ValueError, match="NaN or inf"):
        kmeans(np.array([[0.0], [np.nan]]), 1)


def test_kmeans_rejects_1d_points():
    with pytest.raises(ValueError, match=r"2-D array \(n, d\), got shape \(3,\)"):
        kmeans(np.zeros(3), 1)


# ---------------------------------------------------------------------------
# elbow rule
# ---------------------------------------------------------------------------


def test_elbow_choice_on_hand_inertias():
    # drops 60, 10, 0.5: i = 1: 10 < 0.1 * 60 = 6? no; i = 2: 0.5 < 0.1 * 10 = 1? yes
    # -> k = i + 1 = 3
    assert elbow_choice([100.0, 40.0, 30.0, 29.5]) == 3
    # drops 50, 4: i = 1: 4 < 5 -> k = 2
    assert elbow_choice([100.0, 50.0, 46.0]) == 2
    # drops 50, 40: 40 < 5? no -> no elbow yet
    assert elbow_choice([100.0, 50.0, 10.0]) is None
    # drops 50, 4 with tol 0.05: 4 < 2.5? no
    assert elbow_choice([100.0, 50.0, 46.0], tol=0.05) is None


def three_groups() -> np.ndarray:
    """Six reward vectors (K = 3) in three tight groups along the first coordinate.

    First coordinates 0, 0.02 | 0.5, 0.52 | 1, 1.02; the other two are constant, so
    the inertias are those of the 1-D values:
    I_1: mean 0.51; 0.51^2 + 0.49^2 + 0.01^2 + 0.01^2 + 0.49^2 + 0.51^2 = 1.0006
    I_2: {0, .02, .5, .52} around 0.26: 0.0676 + 0.0576 + 0.0576 + 0.0676 = 0.2504,
         plus {1, 1.02}: 2 * 0.01^2 = 0.0002 -> 0.2506
    I_3: three pairs, 3 * 0.0002 = 0.0006; I_4: 0.0004 (one pair split)
    drops: 0.75, 0.25, 0.0002. i = 1: 0.25 < 0.075? no; i = 2: 0.0002 < 0.025 -> k = 3
    """
    first = np.array([0.0, 0.02, 0.5, 0.52, 1.0, 1.02])
    return np.column_stack([first, np.ones(6), np.zeros(6)])


def test_kmeans_inertias_of_three_groups():
    points = three_groups()
    inertias = [kmeans(points, k)[2] for k in (1, 2, 3, 4)]
    assert inertias == pytest.approx([1.0006, 0.2506, 0.0006, 0.0004])


def test_select_k_elbow_three_groups():
    k, labels = select_k_elbow(three_groups())
    assert k == 3
    assert same_partition(labels, [[0, 1], [2, 3], [4, 5]])


def test_select_k_elbow_one_distinct_row_gives_one():
    k, labels = select_k_elbow(np.tile([[1.0, 0.0, 0.5]], (5, 1)))
    assert k == 1
    assert labels.tolist() == [0, 0, 0, 0, 0]


def test_select_k_elbow_two_distinct_rows_gives_two():
    # k_eff = min(10, 2) = 2: one drop only, no i >= 1 to test -> k = k_eff = 2
    points = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    k, labels = select_k_elbow(points)
    assert k == 2
    assert same_partition(labels, [[0, 2], [1]])


def test_select_k_elbow_caps_at_k_max():
    # k_max = 2 < 6 distinct rows: k_eff = 2 and the rule has nothing to test -> 2
    k, labels = select_k_elbow(three_groups(), k_max=2)
    assert k == 2
    assert len(set(labels.tolist())) == 2
    assert select_k_elbow(three_groups(), k_max=1)[0] == 1


def test_select_k_elbow_rejects_bad_k_max():
    with pytest.raises(ValueError, match="k_max"):
        select_k_elbow(three_groups(), k_max=0)


# ---------------------------------------------------------------------------
# Minimum cluster size
# ---------------------------------------------------------------------------

# Four points at each of (0, 0), (10, 10), (20, 20) and one at (50, 50).
SPREAD = np.array(
    [[0.0, 0.0]] * 4 + [[10.0, 10.0]] * 4 + [[20.0, 20.0]] * 4 + [[50.0, 50.0]]
)


def test_merge_small_clusters_folds_into_the_nearest_centroid():
    """A singleton joins the cluster whose centroid is nearest; numbering stays dense."""
    points = np.array([[0.0], [1.0], [9.0], [10.0], [11.0], [4.0]])
    labels = np.array([3, 3, 7, 7, 7, 5])
    # {4} (label 5, size 1): centroids 0.5 and 10 are 3.5 and 6 away -> joins label 3.
    merged = merge_small_clusters(points, labels, min_size=2)
    assert merged.tolist() == [0, 0, 1, 1, 1, 0]
    # min_size 1 only renumbers.
    assert merge_small_clusters(points, labels, min_size=1).tolist() == [
        0,
        0,
        2,
        2,
        2,
        1,
    ]


def test_merge_small_clusters_stops_at_one_cluster():
    """Fewer points than min_size: everything ends in one cluster."""
    merged = merge_small_clusters(
        np.array([[0.0], [5.0], [9.0]]), np.array([0, 1, 2]), min_size=4
    )
    assert merged.tolist() == [0, 0, 0]


def test_select_k_elbow_gives_every_cluster_at_least_min_size_points():
    """A lone outlier is its own cluster without a minimum size, and not with one."""
    # min_size 1: 4 distinct rows, no elbow fires -> k = 4, (50, 50) alone.
    k, labels = select_k_elbow(SPREAD)
    assert k == 4 and np.bincount(labels).min() == 1
    # min_size 4: at most 13 // 4 = 3 clusters. k = 3 gives {0, 10} (centre (5, 5),
    # inertia 8 * 50 = 400), {20} and {50}; no elbow with three inertias
    # (4553.8, 1600, 400), so k = 3. The singleton {50} then joins the nearer centroid:
    # (20, 20) at squared distance 1800, not (5, 5) at 4050.
    k, labels = select_k_elbow(SPREAD, min_size=4)
    assert k == 2
    assert same_partition(labels, [list(range(8)), list(range(8, 13))])


def test_select_k_elbow_rejects_bad_min_size():
    with pytest.raises(ValueError, match="min_size must be an integer >= 1"):
        select_k_elbow(SPREAD, min_size=0)
