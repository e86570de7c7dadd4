"""Explicit seeds: every random stream is derived from named parts, never from globals.

The one exception is ``secret_seed``: where nobody else may know or recompute a stream
(DP noise, Poisson samples, rollouts under DP), it comes from the operating system.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["derive_seed", "secret_seed"]

_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. seed, hospital, round)."""
    digest = hashlib.sha256(repr(tuple(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def secret_seed() -> int:
    """A 63-bit seed from the operating system's secure generator (nobody else can know it)."""
    return int.from_bytes(os.urandom(8), "little") & _SEED_MASK
