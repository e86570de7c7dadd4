"""`fedclimb data validate`: check every record of a CLIMB root, media included.

Never raises on bad data: each invalid line becomes a :class:`Problem` (file, line,
one-line reason). Media are decoded (images, DICOM pixels, volume frames, ECG
signals, segmentation masks) inside the data root and within the size limits of
:class:`common.climb.limits.Bounds`, so that a codec without a decoder, an oversized file
or a path out of the root is found here, not in the middle of a round.

The same check runs when a hospital loads its data (:func:`usable_records`): a record
that would fail when first sampled is left out before any round, so a failed round never
tells the server that a bad record was drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.climb.errors import MediaError, RecordError
from common.climb.limits import DEFAULT_BOUNDS, Bounds
from common.climb.messages import one_line
from common.climb.records import Problem, Record, iter_records

__all__ = ["ValidationReport", "validate_root", "check_media", "media_problem", "usable_records"]

log = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """Counts of valid records per split and domain, and every invalid line."""

    valid: int = 0
    invalid: list[Problem] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    modalities: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.invalid

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "invalid": [{"file": p.file, "line": p.line, "reason": p.reason} for p in self.invalid],
            "counts": {s: dict(sorted(d.items())) for s, d in sorted(self.counts.items())},
        }


def _inside(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    x1, y1, x2, y2 = box
    return x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height


def check_media(
    record: Record, *, video_frames: int = 4, bounds: Bounds = DEFAULT_BOUNDS, max_images: int | None = None
) -> None:
    """Decode every medium ``record`` references; raise :class:`RecordError` if one fails.

    Parameters
    ----------
    record : Record
        A structurally valid record.
    video_frames : int
        Frames decoded from a volume or video.
    bounds : Bounds
        Size limits (the roots are the record's own: its root and linked roots).
    max_images : int, optional
        Media files (images, videos, ECGs) the record may reference (``data.max_images``).
    """
    from common.climb import media

    bounds = bounds.within(record.roots)
    count = len(record.images) + len(record.videos) + len(record.time_series)
    if max_images is not None and count > max_images:
        raise RecordError(f"record references {count} media files, more than data.max_images={max_images}")
    sizes = []
    for rel in record.images:
        sizes.append(media.load_image(_existing(record, rel, "image"), bounds=bounds).size)
    for rel in record.videos:
        media.load_frames(_existing(record, rel, "video/volume"), n_frames=video_frames, bounds=bounds)
    for rel in record.time_series:
        media.load_ecg_12lead(_existing(record, rel, "ECG"), bounds=bounds)  # what a round reads
    if record.segmentation is not None:
        mask = media.load_mask(_existing(record, record.segmentation, "segmentation mask"), bounds=bounds)
        sizes = sizes or [(mask.shape[1], mask.shape[0])]
    if record.bboxes:
        if not sizes:
            raise RecordError("bbox given but the record has no image to locate it in")
        width, height = sizes[0]
        reference = record.images[0] if record.images else record.segmentation
        for box in record.bboxes:
            if not _inside(box, width, height):
                raise RecordError(f"bbox {list(box)} lies outside the {width}x{height} image {reference}")


def _existing(record: Record, rel: str, what: str) -> Path:
    """The checked media path (inside the roots first, so the reason never reveals what exists outside)."""
    path = record.media_path(rel)
    if not path.exists() and not path.is_symlink():
        raise MediaError(f"{what} not found: {rel}")
    return path


def media_problem(
    record: Record, *, video_frames: int = 4, bounds: Bounds = DEFAULT_BOUNDS, max_images: int | None = None
) -> str | None:
    """:func:`check_media`'s one-line reason, or None when every medium is usable; never raises."""
    try:
        check_media(record, video_frames=video_frames, bounds=bounds, max_images=max_images)
    except RecordError as exc:
        return str(exc)
    except Exception as exc:  # a decoder bug (MemoryError, RecursionError included) must not stop the scan
        return f"unreadable media ({type(exc).__name__}: {one_line(exc)})"
    return None


def usable_records(
    records: Sequence[Record], *, video_frames: int = 4, bounds: Bounds = DEFAULT_BOUNDS, max_images: int | None = None
) -> list[Record]:
    """The records whose media pass :func:`check_media`; each other one is logged with its reason.

    Run when a hospital loads its data, so that no record can fail when first sampled.
    """
    out = []
    for record in records:
        reason = media_problem(record, video_frames=video_frames, bounds=bounds, max_images=max_images)
        if reason is None:
            out.append(record)
        else:
            log.warning("leaving out %s: %s", record.id, reason)
    if len(out) < len(records):
        log.warning("%d record(s) left out for their media; run `fedclimb data validate`", len(records) - len(out))
    return out


def validate_root(
    root: str | Path,
    *,
    domain_key: Literal["dataset", "modality"] = "dataset",
    media: bool = True,
    video_frames: int = 4,
    on_record: Callable[[], None] | None = None,
    bounds: Bounds = DEFAULT_BOUNDS,
    max_images: int | None = None,
) -> ValidationReport:
    """Validate every annotation line under ``root`` (see module docstring)."""
    report = ValidationReport()
    for item in iter_records(root, domain_key=domain_key, max_line_bytes=bounds.max_line_bytes):
        if on_record:
            on_record()
        if isinstance(item, Problem):
            report.invalid.append(item)
            continue
        if media:
            reason = media_problem(item, video_frames=video_frames, bounds=bounds, max_images=max_images)
            if reason is not None:
                report.invalid.append(Problem(item.file, item.line, reason))
                continue
        report.valid += 1
        report.counts.setdefault(item.split, {}).setdefault(item.domain, 0)
        report.counts[item.split][item.domain] += 1
        report.modalities.setdefault(item.split, {}).setdefault(item.modality, 0)
        report.modalities[item.split][item.modality] += 1
    return report
