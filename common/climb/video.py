"""Sample frames from video files (.mp4 and other containers ffmpeg reads) via imageio."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.climb.errors import MediaError
from common.climb.images import array_to_rgb
from common.climb.limits import DEFAULT_BOUNDS, Bounds
from common.climb.messages import one_line
from common.climb.sampling import DEFAULT_FRAMES, uniform_indices

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")
FFMPEG_FORMAT = "FFMPEG"


def video_frames(
    path: str | os.PathLike[str], n_frames: int = DEFAULT_FRAMES, *, bounds: Bounds = DEFAULT_BOUNDS
) -> list[Image.Image]:
    """Return ``n_frames`` uniformly spaced frames of a video as RGB images.

    Frames are chosen by :func:`common.climb.sampling.uniform_indices` over the exact
    frame count (ffmpeg counts them; container metadata is often wrong), and the
    video is decoded once up to the last chosen frame. The frame size (from the
    container header) and the frame count are checked against ``bounds`` first.

    Parameters
    ----------
    path : str or os.PathLike
        A video file.
    n_frames : int
        Number of frames to keep (all frames if the video has fewer).
    bounds : Bounds
        Where the file may be and the limits on frame size and count.

    Returns
    -------
    list of PIL.Image.Image
        RGB frames in time order.

    Raises
    ------
    MediaError
        imageio's ffmpeg plugin is missing, or the file cannot be decoded.
    """
    path = bounds.file(path, "video file")
    reader = _open_reader(path)
    try:
        width, height = (int(n) for n in reader.get_meta_data()["size"])
        bounds.pixels(width, height, str(path))
        total = int(reader.count_frames())
        bounds.frames(total, str(path))
        wanted = uniform_indices(total, n_frames)
        frames = _collect(reader, wanted)
    except MediaError:
        raise
    except Exception as exc:  # imageio/ffmpeg raise OSError, RuntimeError, IndexError, ...
        raise MediaError(f"{path} could not be decoded as video ({type(exc).__name__}: {one_line(exc)})") from exc
    finally:
        reader.close()
    if not frames:
        raise MediaError(f"{path} holds no video frames; re-encode it (e.g. H.264 mp4)")
    return [array_to_rgb(_as_rgb_uint8(frame)) for frame in frames]


def _open_reader(path: Path) -> Any:
    """Open an imageio ffmpeg reader, turning a missing plugin into MediaError."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (imageio's FFMPEG plugin needs it)
    except ImportError as exc:
        raise MediaError(
            f"cannot read video {path}: imageio's ffmpeg plugin is unavailable ({one_line(exc)}); "
            "pip install imageio imageio-ffmpeg"
        ) from exc
    try:
        return imageio.get_reader(path, format=FFMPEG_FORMAT)
    except Exception as exc:
        raise MediaError(f"{path} could not be opened as video ({type(exc).__name__}: {one_line(exc)})") from exc


def _collect(reader: Any, wanted: list[int]) -> list[np.ndarray]:
    """Iterate the reader once, keeping the frames whose indices are in ``wanted``."""
    keep = set(wanted)
    last = max(wanted, default=-1)
    frames = []
    for index, frame in enumerate(reader):
        if index in keep:
            frames.append(np.asarray(frame))
        if index >= last:
            break
    return frames


def _as_rgb_uint8(frame: np.ndarray) -> np.ndarray:
    """Drop an alpha channel and make the frame uint8 HxWx3 or HxW."""
    if frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[:, :, :3]
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    return frame.astype(np.uint8, copy=False)
