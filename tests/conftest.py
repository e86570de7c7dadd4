"""Helpers shared by test files (importable as ``from conftest import ...``)."""

from __future__ import annotations

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
