"""uniform_indices against hand-computed values."""

import pytest

from common.climb.sampling import uniform_indices


@pytest.mark.parametrize(
    ("total", "n", "expected"),
    [
        (10, 4, [0, 3, 6, 9]),
        (5, 4, [0, 1, 3, 4]),  # 0, 1.33, 2.67, 4 rounded half up
        (100, 4, [0, 33, 66, 99]),
        (7, 3, [0, 3, 6]),
        (30, 4, [0, 10, 19, 29]),  # 0, 9.67, 19.33, 29
        (6, 4, [0, 2, 3, 5]),  # 0, 1.67, 3.33, 5
        (9, 2, [0, 8]),
        (10, 1, [4]),  # the middle, (total - 1) // 2
        (4, 4, [0, 1, 2, 3]),
        (3, 5, [0, 1, 2]),
        (1, 4, [0]),
        (0, 4, []),
    ],
)
def test_hand_values(total: int, n: int, expected: list[int]) -> None:
    assert uniform_indices(total, n) == expected


def test_strictly_increasing_and_keeps_both_ends() -> None:
    for total in range(2, 60):
        for n in range(2, total):
            picked = uniform_indices(total, n)
            assert len(picked) == n
            assert picked[0] == 0 and picked[-1] == total - 1
            assert all(a < b for a, b in zip(picked, picked[1:]))


@pytest.mark.parametrize(("total", "n"), [(-1, 4), (10, 0)])
def test_rejects_bad_arguments(total: int, n: int) -> None:
    with pytest.raises(ValueError):
        uniform_indices(total, n)
