"""Lazy loading of a record's media into the images a vision-language model sees.

Images and DICOM files become one image each, a 3D volume or video becomes N uniformly
sampled frames (QoQ-Med: 4), and an ECG becomes a standard 12-lead paper-style
rendering shown before the question (our models have no ECG encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.climb.limits import DEFAULT_BOUNDS, Bounds
from common.climb.records import Record

__all__ = ["RecordVisuals", "load_visuals"]


@dataclass
class RecordVisuals:
    """The images of one record, and where they go in the prompt."""

    images: list[Any] = field(default_factory=list)
    # Images per <image>/<video> placeholder, in prompt order.
    per_placeholder: list[int] = field(default_factory=list)
    # Images shown before the question (ECG renderings).
    leading: int = 0


def load_visuals(
    record: Record, *, video_frames: int = 4, ecg_px_per_mm: float = 2.0, bounds: Bounds = DEFAULT_BOUNDS
) -> RecordVisuals:
    """Load (decode) every medium ``record`` references, inside the record's roots.

    ``bounds`` gives the size limits (its roots are replaced by the record's own).

    Raises
    ------
    common.climb.errors.MediaError
        A one-line reason when a file is missing, outside the data root, over a limit
        or cannot be decoded.
    """
    from common.climb import media

    bounds = bounds.within(record.roots)
    out = RecordVisuals()
    for rel in record.time_series:
        signals, fs = media.load_ecg_12lead(record.media_path(rel), bounds=bounds)
        out.images.append(media.render_ecg(signals, fs, px_per_mm=ecg_px_per_mm))
        out.leading += 1
    # Placeholders appear in the prompt in some order of <image> and <video>; CLIMB lists
    # images and videos separately, each in the order of its own placeholders.
    images = iter(record.images)
    videos = iter(record.videos)
    for token in _placeholder_order(record.prompt):
        if token == "<image>":
            out.images.append(media.load_image(record.media_path(next(images)), bounds=bounds))
            out.per_placeholder.append(1)
        else:
            frames = media.load_frames(record.media_path(next(videos)), n_frames=video_frames, bounds=bounds)
            out.images.extend(frames)
            out.per_placeholder.append(len(frames))
    return out


def _placeholder_order(prompt: str) -> list[str]:
    import re

    return re.findall(r"<image>|<video>", prompt)
