"""Per-domain statistics a hospital may send, with a bounded contribution per privacy unit.

During a round a record may be sampled in several steps, so "rollouts per domain" would
let one record move the totals by up to steps x K. The released statistics are defined
per *used unit* instead: every privacy unit used in the round spreads a total weight of 1
over the records of it that were used (1 each for record units), and contributes, per
domain d, ``n_d = sum of its weights there`` and ``s_d = sum of weight x the record's mean
reward`` (rewards lie in [0, 1]). One unit therefore changes the joint vector (n, s) by at
most 1 in L1 over n and at most 1 over s, so its L2 sensitivity is sqrt(1 + 1) = sqrt(2)
under add/remove-one-unit (common/privacy/release.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RecordUse", "domain_statistics", "REWARD_BOUND"]

# Rewards are convex combinations of terms in [0, 1].
REWARD_BOUND = 1.0


@dataclass
class RecordUse:
    """How one record was used in a round."""

    domain: str
    rollouts: int
    reward_sum: float

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rollouts if self.rollouts else 0.0


def domain_statistics(
    uses: Mapping[int, RecordUse],
    units: Sequence[Sequence[int]],
    domain_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """(n_d, s_d) aligned with ``domain_names``; domains not listed are left out.

    ``uses`` maps record index -> its use this round; ``units`` lists the record indices
    of each privacy unit.
    """
    index = {d: i for i, d in enumerate(domain_names)}
    n = np.zeros(len(domain_names))
    s = np.zeros(len(domain_names))
    for unit in units:
        used = [r for r in unit if r in uses]
        if not used:
            continue
        w = 1.0 / len(used)
        for r in used:
            u = uses[r]
            i = index.get(u.domain)
            if i is None:
                continue
            n[i] += w
            s[i] += w * min(max(u.mean_reward, 0.0), REWARD_BOUND)
    return n, s
