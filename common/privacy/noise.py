"""The source of all DP randomness: a ChaCha20 keystream turned into uniforms and Gaussians.

A Mersenne Twister (torch's and NumPy's legacy generator) is not cryptographic: its state
can be recovered from its outputs, so noise drawn from it after any other draw the server
can see is in principle predictable. :class:`NoiseSource` draws every DP random number
(the Poisson samples, the DP-SGD noise, the noise of statistics releases) from ChaCha20
(``cryptography``, OpenSSL) under a 256-bit key:

* ``NoiseSource.secure()`` takes the key from ``os.urandom`` (hospitals:
  ``privacy.secure_rng: true``);
* ``NoiseSource.from_seed(seed)`` derives it from a seed by SHA-256 (reproducible
  simulations with ``secure_rng: false``; whoever knows the seed knows the noise).

Each draw encrypts zeros under a fresh nonce (the draw's index), so draws never share
keystream. 64-bit keystream words become uniforms ``(x >> 11 + 1) / 2**53`` in (0, 1]
(53 random bits, the float64 mantissa), and pairs of uniforms become independent
standard normals by the Box-Muller transform ``sqrt(-2 ln u1) * (cos, sin)(2 pi u2)``,
vectorised in NumPy float64, then cast to the gradients' dtype.

What remains (docs/privacy.md, "Noise generation"): the Gaussian is sampled in floating
point, so the set of reachable noisy values depends on the secret value (Mironov 2012);
no snapping mechanism or discrete Gaussian is used.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["KEY_BYTES", "NoiseSource", "box_muller", "uniform_from_words"]

KEY_BYTES = 32
_TWO_PI = 2.0 * math.pi
_SEED_DOMAIN = b"fedclimb/dp-noise/chacha20/v1\x00"


def uniform_from_words(words: np.ndarray) -> np.ndarray:
    """uint64 words -> float64 uniforms ``((w >> 11) + 1) * 2**-53`` in (0, 1], exactly."""
    top = words.astype(np.uint64) >> np.uint64(11)  # [0, 2**53): exact in float64
    return (top + np.uint64(1)).astype(np.float64) * 2.0**-53


def box_muller(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Two independent N(0, 1) per pair: ``sqrt(-2 ln u1) * (cos, sin)(2 pi u2)``, concatenated.

    ``u1`` must lie in (0, 1] (finite logarithm); ``u2`` in [0, 1].
    """
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = _TWO_PI * u2
    out = np.empty(2 * radius.size, dtype=np.float64)
    np.multiply(radius, np.cos(angle), out=out[: radius.size])
    np.multiply(radius, np.sin(angle), out=out[radius.size :])
    return out


class NoiseSource:
    """Uniforms and Gaussians from a ChaCha20 keystream under one key.

    Deterministic for a given key and sequence of calls; two keys give independent
    streams. Not thread-safe (one source per round).
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a noise key is {KEY_BYTES} bytes, got {key!r:.40}")
        self._key = key
        self._draws = 0

    @classmethod
    def secure(cls) -> NoiseSource:
        """A source keyed from the operating system (nobody else can know the noise)."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: int) -> NoiseSource:
        """A reproducible source keyed by SHA-256 of ``seed`` (simulations only)."""
        return cls(hashlib.sha256(_SEED_DOMAIN + str(int(seed)).encode()).digest())

    def __repr__(self) -> str:  # never print the key
        return f"NoiseSource(draws={self._draws})"

    # ------------------------------------------------------------------ raw draws

    def _words(self, count: int) -> np.ndarray:
        """(count,) uint64 keystream words of a fresh draw."""
        nonce = (0).to_bytes(4, "little") + self._draws.to_bytes(12, "little")  # counter 0 | draw
        self._draws += 1
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        stream = encryptor.update(bytes(8 * count))
        return np.frombuffer(stream, dtype="<u8")

    def uniform(self, size: int | tuple[int, ...]) -> np.ndarray:
        """Uniforms in (0, 1], float64, 53 random bits each."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        return uniform_from_words(self._words(math.prod(shape))).reshape(shape)

    def standard_normal(self, size: int | tuple[int, ...]) -> np.ndarray:
        """Independent N(0, 1) draws, float64 (Box-Muller on :meth:`uniform` pairs)."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform(2 * half)  # (2 half,)
        return box_muller(u[:half], u[half:])[:n].reshape(shape)

    # ------------------------------------------------------------------ adapters

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None
    ) -> np.ndarray:
        """``numpy.random.Generator.normal``'s signature (for ``gaussian_release``)."""
        shape = () if size is None else size
        return loc + scale * self.standard_normal(shape)

    def randn(
        self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """N(0, 1) tensor of ``shape``, drawn in float64 then cast to ``dtype`` on ``device``."""
        z = torch.from_numpy(self.standard_normal(tuple(shape)))
        return z.to(dtype=dtype, device=device)

    def rand(self, n: int) -> torch.Tensor:
        """(n,) float64 uniforms in (0, 1] (Poisson sampling)."""
        return torch.from_numpy(self.uniform(n))
