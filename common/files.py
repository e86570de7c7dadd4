"""Crash-safe file writes: the privacy ledger, released statistics, checkpoints.

``write_text_atomic`` writes a temporary file in the same folder, flushes and fsyncs it,
renames it over the target (``os.replace`` is atomic on POSIX and Windows within one
file system), then fsyncs the folder so that the rename survives a power loss. Readers
see the old file or the new one, whole. A crash can leave a stray hidden
``.<name>.<random>.tmp`` file, never a partial target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["fsync_path", "write_bytes_atomic", "write_text_atomic"]


def fsync_path(path: str | Path) -> None:
    """Flush a file's data or a folder's entries to disk (no-op where a folder cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a folder on Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so that no reader ever sees a partial file.

    ``mode`` is the new file's permission bits (0o600 for files only the owner may read).
    """
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp_name, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    fsync_path(path.parent)
