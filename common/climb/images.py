"""Load 2D images (PNG, JPEG, BMP, ... or the first frame of a DICOM) as RGB PIL images.

Pillow reads the header lazily: the size is checked against ``data.max_pixels`` before
any pixel is decoded (:class:`common.climb.limits.Bounds`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.climb.dicom import dicom_frames, is_dicom_file
from common.climb.errors import MediaError
from common.climb.limits import DEFAULT_BOUNDS, Bounds
from common.climb.messages import one_line
from common.climb.windowing import minmax_to_uint8

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")


def load_image(path: str | os.PathLike[str], *, bounds: Bounds = DEFAULT_BOUNDS) -> Image.Image:
    """Load an image file as an RGB PIL image.

    DICOM files (a ``.dcm`` / ``.dicom`` suffix or the ``DICM`` marker) give their
    first frame after the display pipeline of :mod:`common.climb.dicom`; every
    other file goes through Pillow.

    Parameters
    ----------
    path : str or os.PathLike
        A PNG, JPEG, BMP (any format Pillow reads) or DICOM file.
    bounds : Bounds
        Where the file may be and how large it may be (checked before decoding).

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, fully loaded (the file is closed).

    Raises
    ------
    MediaError
        The file is missing, outside the bounds, too large or cannot be decoded.
    """
    path = bounds.file(path, "image file")
    if path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path):
        return array_to_rgb(dicom_frames(path, [0], bounds=bounds)[0])
    return _load_with_pillow(path, bounds)


def load_mask(path: str | os.PathLike[str], *, bounds: Bounds = DEFAULT_BOUNDS) -> np.ndarray:
    """Load a segmentation mask (any raster format Pillow reads) as a boolean HxW array.

    Non-zero pixels are foreground, as the reward's mask IoU counts them.

    Raises
    ------
    MediaError
        The file is missing, outside the bounds, too large or cannot be decoded.
    """
    path = bounds.file(path, "segmentation mask")
    with _opened(path, bounds) as image:
        return np.asarray(image.convert("L")) > 0


def array_to_rgb(frame: np.ndarray) -> Image.Image:
    """Wrap a uint8 HxW or HxWx3 array as an RGB PIL image.

    Parameters
    ----------
    frame : np.ndarray
        uint8 array; a grey frame is replicated onto three channels.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``.
    """
    if frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 frame, got {frame.dtype}; convert with common.climb.windowing first")
    if frame.ndim == 2:
        return Image.fromarray(frame).convert("RGB")
    if frame.ndim == 3 and frame.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(frame))
    raise ValueError(f"expected an HxW or HxWx3 frame, got shape {frame.shape}")


def _load_with_pillow(path: Path, bounds: Bounds) -> Image.Image:
    """Open, size-check, fully decode and convert a raster image file to RGB."""
    with _opened(path, bounds) as image:
        return _pillow_to_rgb(image)


@contextmanager
def _opened(path: Path, bounds: Bounds) -> Iterator[Image.Image]:
    """A Pillow image whose header size was checked against ``bounds`` before it was decoded."""
    try:
        with warnings.catch_warnings():  # the size is checked below, against data.max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise MediaError(
            f"{path}: image is larger than Pillow's decompression-bomb limit (data.max_pixels={bounds.max_pixels})"
        ) from None
    except _PILLOW_ERRORS as exc:
        raise _undecodable(path, exc) from exc
    with image:
        width, height = image.size
        bounds.pixels(width, height, str(path))  # before a single pixel is decoded
        try:
            image.load()
        except _PILLOW_ERRORS as exc:
            raise _undecodable(path, exc) from exc
        yield image


_PILLOW_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError)


def _undecodable(path: Path, exc: BaseException) -> MediaError:
    return MediaError(
        f"{path} could not be decoded as an image ({type(exc).__name__}: {one_line(exc)}); re-save it as PNG or JPEG"
    )


def _pillow_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; 16-bit and float greyscale are min-max stretched."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return array_to_rgb(minmax_to_uint8(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
