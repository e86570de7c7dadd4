"""`fedclimb data validate`: check every record of a CLIMB root, media included.

Never raises on bad data: each invalid line becomes a :class:`Problem` (file, line,
one-line reason). Media are decoded (images, DICOM pixels, volume frames, ECG
signals) so that a codec without a decoder is found here, not in the middle of a round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.climb.errors import MediaError, RecordError
from common.climb.records import Problem, Record, iter_records

__all__ = ["ValidationReport", "validate_root", "check_media"]


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


def check_media(record: Record, *, video_frames: int = 4) -> None:
    """Decode every medium ``record`` references; raise :class:`RecordError` if one fails."""
    from common.climb import media

    sizes = []
    for rel in record.images:
        path = record.media_path(rel)
        if not path.exists():
            raise MediaError(f"image not found: {rel}")
        img = media.load_image(path)
        sizes.append(img.size)
    for rel in record.videos:
        if not record.media_path(rel).exists():
            raise MediaError(f"video/volume not found: {rel}")
        media.load_frames(record.media_path(rel), n_frames=video_frames)
    for rel in record.time_series:
        if not record.media_path(rel).exists():
            raise MediaError(f"ECG not found: {rel}")
        media.load_ecg(record.media_path(rel))
    if record.segmentation is not None:
        seg = record.media_path(record.segmentation)
        if not seg.exists():
            raise MediaError(f"segmentation mask not found: {record.segmentation}")
        mask = media.load_image(seg)
        sizes = sizes or [mask.size]
    if record.bboxes:
        if not sizes:
            raise RecordError("bbox given but the record has no image to locate it in")
        width, height = sizes[0]
        reference = record.images[0] if record.images else record.segmentation
        for box in record.bboxes:
            if not _inside(box, width, height):
                raise RecordError(f"bbox {list(box)} lies outside the {width}x{height} image {reference}")


def validate_root(
    root: str | Path,
    *,
    domain_key: Literal["dataset", "modality"] = "dataset",
    media: bool = True,
    video_frames: int = 4,
    on_record: Callable[[], None] | None = None,
) -> ValidationReport:
    """Validate every annotation line under ``root`` (see module docstring)."""
    report = ValidationReport()
    for item in iter_records(root, domain_key=domain_key):
        if on_record:
            on_record()
        if isinstance(item, Problem):
            report.invalid.append(item)
            continue
        if media:
            try:
                check_media(item, video_frames=video_frames)
            except RecordError as exc:
                report.invalid.append(Problem(item.file, item.line, str(exc)))
                continue
            except Exception as exc:  # a decoder bug must not stop the whole scan
                report.invalid.append(Problem(item.file, item.line, f"unreadable media ({type(exc).__name__}: {exc})"))
                continue
        report.valid += 1
        report.counts.setdefault(item.split, {}).setdefault(item.domain, 0)
        report.counts[item.split][item.domain] += 1
        report.modalities.setdefault(item.split, {}).setdefault(item.modality, 0)
        report.modalities[item.split][item.modality] += 1
    return report
