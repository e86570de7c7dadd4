"""What a media loader may read: the data-root boundary and the size limits.

Every loader of :mod:`common.climb` takes a :class:`Bounds`. Before anything is decoded
it checks, from headers only, that the file

- lies inside the data root (or one of its linked roots, see
  :func:`common.climb.records.linked_roots`) once every symbolic link is resolved,
- is a regular file (so a link to ``/dev/zero`` or a FIFO is refused) of at most
  ``max_file_bytes`` bytes,
- declares at most ``max_pixels`` pixels per frame, ``max_frames`` frames or slices and
  ``max_ecg_samples`` samples per ECG lead.

A violation raises :class:`~common.climb.errors.MediaError` with a one-line reason that
names the ``data.*`` key to raise; the record is then reported (or left out) like any
other invalid record. The defaults suit CLIMB (the largest mammograms are about 30
megapixels, CT series a few hundred slices, ECGs 10 s at 500 Hz).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.climb.errors import MediaError

__all__ = ["Bounds", "DEFAULT_BOUNDS", "bounds_for", "outside_root_message", "is_inside", "resolved"]


def outside_root_message(rel: str, what: str = "media path") -> str:
    """The one reason for any path that leaves the data root (the same whether or not it exists)."""
    return (
        f"{what} {rel!r} is outside the data root; use a path relative to the root, without '..', "
        "that stays inside it (symbolic links included) or list the other folder in linked_roots.txt"
    )


def resolved(path: Path, what: str = "media path") -> Path:
    """``path`` with every symbolic link followed; a link loop is a MediaError, not a crash."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a symlink loop
        raise MediaError(f"{what} {str(path)!r} cannot be resolved (a symbolic link loop?)") from None


def is_inside(path: Path, roots: Iterable[Path]) -> bool:
    """Whether the resolved ``path`` lies in (or is) one of the resolved ``roots``."""
    return any(path == root or path.is_relative_to(root) for root in roots)


@dataclass(frozen=True)
class Bounds:
    """The data roots a loader may read from and the limits on what it decodes.

    Attributes
    ----------
    roots : tuple of pathlib.Path
        Resolved folders media must resolve into; empty means no boundary (a library
        call on a file the caller chose).
    max_pixels : int
        Pixels (rows x columns) of one image or frame.
    max_frames : int
        Frames of a multi-frame DICOM or video, slices of a series or volume.
    max_ecg_samples : int
        Samples per ECG lead, both as stored and after resampling to 500 Hz.
    max_file_bytes : int
        Bytes of one media file on disk, and of its content once inflated or decoded
        (a deflated DICOM, a NIfTI volume as float32).
    max_line_bytes : int
        Bytes of one annotation line (and of an ECG sidecar or linked_roots.txt).
    """

    roots: tuple[Path, ...] = ()
    max_pixels: int = 50_000_000
    max_frames: int = 2048
    max_ecg_samples: int = 1_000_000
    max_file_bytes: int = 1 << 30
    max_line_bytes: int = 1 << 20

    def within(self, roots: Iterable[str | os.PathLike[str]]) -> Bounds:
        """The same limits with the boundary set to ``roots`` (resolved)."""
        return replace(self, roots=tuple(Path(r).resolve() for r in roots))

    def file(self, path: str | os.PathLike[str], what: str, *, max_bytes: int | None = None) -> Path:
        """Check that ``path`` may be read: inside the roots, a regular file, not too large.

        Raises
        ------
        MediaError
            Outside the roots (one message whether or not the target exists), missing,
            not a regular file, or larger than ``max_bytes`` (default ``max_file_bytes``).
        """
        path = Path(path)
        if self.roots and not is_inside(resolved(path, what), self.roots):
            raise MediaError(outside_root_message(str(path), what))
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise MediaError(f"{what} {path} does not exist; check the record's path") from None
        except OSError as exc:
            raise MediaError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"{what} {path} is not a regular file; point the record at the file itself")
        limit = self.max_file_bytes if max_bytes is None else max_bytes
        if info.st_size > limit:
            key = "data.max_file_bytes" if max_bytes is None else "data.max_line_bytes"
            raise MediaError(f"{what} {path} has {info.st_size} bytes, more than {key}={limit}")
        return path

    def folder(self, path: str | os.PathLike[str]) -> None:
        """Check that a series folder lies inside the roots."""
        if self.roots and not is_inside(resolved(Path(path)), self.roots):
            raise MediaError(outside_root_message(str(path), "series folder"))

    def pixels(self, width: int, height: int, source: str) -> None:
        """Refuse a frame of more than ``max_pixels`` pixels (before it is decoded)."""
        if width < 1 or height < 1:
            raise MediaError(f"{source}: image size {width}x{height} is empty")
        if width * height > self.max_pixels:
            raise MediaError(
                f"{source}: image of {width}x{height} = {width * height} pixels is larger than "
                f"data.max_pixels={self.max_pixels}"
            )

    def frames(self, count: int, source: str) -> None:
        """Refuse more than ``max_frames`` frames or slices."""
        if count > self.max_frames:
            raise MediaError(f"{source}: {count} frames/slices, more than data.max_frames={self.max_frames}")

    def decoded(self, nbytes: int, source: str) -> None:
        """Refuse content that would take more than ``max_file_bytes`` once decoded."""
        if nbytes > self.max_file_bytes:
            raise MediaError(
                f"{source}: decodes to {nbytes} bytes, more than data.max_file_bytes={self.max_file_bytes}"
            )

    def samples(self, count: int, fs: float, target_fs: float, source: str) -> None:
        """Refuse an ECG longer than ``max_ecg_samples`` per lead, as stored or at ``target_fs``."""
        resampled = count * target_fs / fs
        if count > self.max_ecg_samples or resampled > self.max_ecg_samples:
            raise MediaError(
                f"{source}: ECG of {count} samples at {fs:g} Hz ({count / fs:g} s) exceeds "
                f"data.max_ecg_samples={self.max_ecg_samples} samples per lead (at {target_fs:g} Hz)"
            )


DEFAULT_BOUNDS = Bounds()


def bounds_for(data: Any, roots: Iterable[str | os.PathLike[str]] = ()) -> Bounds:
    """The :class:`Bounds` of a ``DataConfig`` (read by attribute), inside ``roots``."""
    return Bounds(
        max_pixels=data.max_pixels,
        max_frames=data.max_frames,
        max_ecg_samples=data.max_ecg_samples,
        max_file_bytes=data.max_file_bytes,
        max_line_bytes=data.max_line_bytes,
    ).within(roots)
