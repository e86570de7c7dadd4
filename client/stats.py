"""The per-domain statistic a hospital may send: how many privacy units it holds per domain.

The federation needs, per domain d, a size N_d (for DRPO's temperature and the server's
domain-aware weights). A hospital contributes ``n_d``: every privacy unit of its training
split spreads a total weight of 1 over its records (1 each for record units, 1/m each for
a patient with m records), so n_d is the weighted number of units in domain d. One unit
changes the vector n by at most 1 in L1, hence at most 1 in L2: the L2 sensitivity under
add/remove-one-unit is 1.

The statistic covers the whole training split, not the units sampled in a round, so it
does not depend on (or reveal) the Poisson samples that DP-SGD's amplification relies on.
Under DP it is released once per domain name with the Gaussian mechanism, recorded in the
ledger, and the noisy values are kept by name in the hospital's state directory and re-sent
every round in the order the server lists them (re-sending a released value is
post-processing; a changed training split is released anew). The total number of units N
is released the same way, once per split: the sample rate and the DP-SGD divisor are
computed from that released N, never from the exact one (client/privacy_round.py).
The domains' difficulty (mean reward) comes from the evaluation of the global adapter on
the held-out split instead (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.files import write_text_atomic

__all__ = ["unit_domain_counts", "ReleasedCounts", "load_released", "save_released", "fingerprint"]

RELEASE_FILE = "released_domain_counts.json"
VERSION = 2


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


def fingerprint(record_ids: Sequence[str], unit: str) -> str:
    """Identifies the training split and the privacy unit a release is about.

    The server's domain list is not part of it: releases are kept by domain name, so a
    server that reorders or repeats its names cannot force (and charge) a new release.
    """
    h = hashlib.sha256()
    for part in (f"v{VERSION}", unit, "|", *sorted(record_ids)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class ReleasedCounts:
    """What was DP-released about one training split: its number of units and n_d by name."""

    fingerprint: str
    # The DP-released number of privacy units (None until released).
    units: float | None = None
    # Domain name -> DP-released n_d. Names are added (each new set released once), never changed.
    counts: dict[str, float] = field(default_factory=dict)

    def missing(self, domain_names: Sequence[str]) -> list[str]:
        """The names (first occurrence, in order) with no released count yet."""
        return [d for d in dict.fromkeys(domain_names) if d not in self.counts]

    def aligned(self, domain_names: Sequence[str]) -> list[float]:
        """The released counts in the order of ``domain_names`` (all must be released)."""
        return [float(self.counts[d]) for d in domain_names]

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "fingerprint": self.fingerprint, "units": self.units, "counts": dict(self.counts)}


def load_released(state_dir: Path, fp: str) -> ReleasedCounts:
    """The releases stored for this exact split (an empty record for a new split)."""
    path = Path(state_dir) / RELEASE_FILE
    if not path.is_file():
        return ReleasedCounts(fp)
    data: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version") != VERSION or data.get("fingerprint") != fp:
        return ReleasedCounts(fp)
    units = data.get("units")
    return ReleasedCounts(fp, None if units is None else float(units),
                          {str(k): float(v) for k, v in dict(data.get("counts") or {}).items()})


def save_released(state_dir: Path, release: ReleasedCounts) -> None:
    """Write crash-safely (``common.files.write_text_atomic``)."""
    write_text_atomic(Path(state_dir) / RELEASE_FILE, json.dumps(release.to_json()))
