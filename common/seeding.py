"""Explicit seeds: every random stream is derived from named parts, never from globals."""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. seed, hospital, round)."""
    digest = hashlib.sha256(repr(tuple(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
