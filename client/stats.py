"""The per-domain statistic a hospital may send: how many privacy units it holds per domain.

The federation needs, per domain d, a size N_d (for DRPO's temperature and the server's
domain-aware weights). A hospital contributes ``n_d``: every privacy unit of its training
split spreads a total weight of 1 over its records (1 each for record units, 1/m each for
a patient with m records), so n_d is the weighted number of units in domain d. One unit
changes the vector n by at most 1 in L1, hence at most 1 in L2: the L2 sensitivity under
add/remove-one-unit is 1.

The statistic covers the whole training split, not the units sampled in a round, so it
does not depend on (or reveal) the Poisson samples that DP-SGD's amplification relies on.
Under DP it is released once with the Gaussian mechanism, recorded in the ledger, and the
noisy value is kept in the hospital's state directory and re-sent every round (re-sending
a released value is post-processing; a changed training split is released anew).
The domains' difficulty (mean reward) comes from the evaluation of the global adapter on
the held-out split instead (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.files import write_text_atomic

__all__ = ["unit_domain_counts", "ReleasedCounts", "load_released", "save_released", "fingerprint"]

RELEASE_FILE = "released_domain_counts.json"


def unit_domain_counts(
    domains: Sequence[str], units: Sequence[Sequence[int]], domain_names: Sequence[str]
) -> np.ndarray:
    """n_d aligned with ``domain_names``: each unit spreads a weight of 1 over its records.

    ``domains[i]`` is record i's domain; ``units`` lists the record indices of each unit.
    Records of domains not in ``domain_names`` keep their share of the unit's weight but
    are not counted anywhere (the vector's L1 norm per unit stays <= 1).
    """
    index = {d: i for i, d in enumerate(domain_names)}
    n = np.zeros(len(domain_names))
    for unit in units:
        if not unit:
            continue
        w = 1.0 / len(unit)
        for r in unit:
            i = index.get(domains[r])
            if i is not None:
                n[i] += w
    return n


def fingerprint(record_ids: Sequence[str], unit: str, domain_names: Sequence[str]) -> str:
    """Identifies the training split, the unit and the domain list a release is about."""
    h = hashlib.sha256()
    for part in (unit, *domain_names, "|", *sorted(record_ids)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class ReleasedCounts:
    """A DP-released n (or None if nothing was released for this split yet)."""

    fingerprint: str
    domain_names: list[str]
    noise_multiplier: float
    counts: list[float]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_released(state_dir: Path, fp: str) -> ReleasedCounts | None:
    """The stored release for this exact split, if there is one."""
    path = Path(state_dir) / RELEASE_FILE
    if not path.is_file():
        return None
    data: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if data.get("fingerprint") != fp:
        return None
    return ReleasedCounts(data["fingerprint"], list(data["domain_names"]), float(data["noise_multiplier"]),
                          [float(x) for x in data["counts"]])


def save_released(state_dir: Path, release: ReleasedCounts) -> None:
    """Write crash-safely (``common.files.write_text_atomic``)."""
    write_text_atomic(Path(state_dir) / RELEASE_FILE, json.dumps(release.to_json()))
