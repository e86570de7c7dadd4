"""Helpers shared by test files (importable as ``from conftest import ...``)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` (8-bit grey) with a tiny IDAT: a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4096)))
                     + chunk(b"IEND", b""))
    return path


class _SignalsInDel:
    """Sends ``sig`` to this process from ``__del__``, where Python drops the handler's exception."""

    def __init__(self, sig: int) -> None:
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)
        total = 0
        for i in range(10_000):  # the handler runs at one of these bytecode boundaries
            total += i


def lose_signal(sig: int) -> None:
    """Deliver ``sig`` where its handler's exception is dropped (as in the fork of a child)."""
    obj = _SignalsInDel(sig)
    del obj  # the exception raised in __del__ goes to sys.unraisablehook, not here
