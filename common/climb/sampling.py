"""Choose which frames of a volume or video to keep."""

from __future__ import annotations

DEFAULT_FRAMES = 4
"""Frames kept from a 3D volume or video (QoQ-Med samples 4)."""


def uniform_indices(total: int, n: int) -> list[int]:
    """Pick ``n`` uniformly spaced indices out of ``range(total)``, always keeping both ends.

    The rule, in integers only:

    - ``n >= total``: every index, ``[0, 1, ..., total - 1]`` (``[]`` when ``total == 0``);
    - ``n == 1``: the middle index ``(total - 1) // 2``;
    - otherwise index ``k`` (``k = 0 .. n-1``) is ``k * (total - 1) / (n - 1)`` rounded
      half up, i.e. ``(2 * k * (total - 1) + (n - 1)) // (2 * (n - 1))``.

    Examples: ``(10, 4) -> [0, 3, 6, 9]``, ``(5, 4) -> [0, 1, 3, 4]``,
    ``(100, 4) -> [0, 33, 66, 99]``, ``(7, 3) -> [0, 3, 6]``, ``(3, 5) -> [0, 1, 2]``.
    The result is strictly increasing.

    Parameters
    ----------
    total : int
        Number of frames available (>= 0).
    n : int
        Number of frames wanted (>= 1).

    Returns
    -------
    list of int
        ``min(n, total)`` sorted, distinct indices.
    """
    if total < 0:
        raise ValueError(f"total frame count {total} must be >= 0")
    if n < 1:
        raise ValueError(f"number of frames to sample {n} must be >= 1")
    if n >= total:
        return list(range(total))
    if n == 1:
        return [(total - 1) // 2]
    steps = n - 1
    return [(2 * k * (total - 1) + steps) // (2 * steps) for k in range(n)]
