"""Sample N uniformly spaced 2D frames from 3D volumes and videos.

Sources handled by :func:`load_frames`:

- a directory holding one DICOM series (one file per slice),
- a multi-frame DICOM file (a single-frame DICOM gives one frame),
- a NIfTI file (``.nii`` / ``.nii.gz``),
- a video (``.mp4`` and other ffmpeg containers, see :mod:`common.climb.video`),
- any other file is treated as a single 2D image.

Frames are chosen with :func:`common.climb.sampling.uniform_indices` (QoQ-Med
feeds 4 frames of a 3D study to the model). Sizes are checked from headers before any
voxel is decoded (:class:`common.climb.limits.Bounds`): slices per series, frames, the
NIfTI shape (one slice's pixels, the slice count, the float32 volume's bytes).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel
import numpy as np
from PIL import Image

from common.climb.dicom import Window, dataset_frames, frame_count, is_dicom_file, read_dicom
from common.climb.errors import MediaError
from common.climb.images import DICOM_SUFFIXES, array_to_rgb, load_image
from common.climb.limits import DEFAULT_BOUNDS, Bounds
from common.climb.messages import one_line
from common.climb.sampling import DEFAULT_FRAMES, uniform_indices
from common.climb.video import VIDEO_SUFFIXES, video_frames
from common.climb.windowing import minmax_to_uint8, window_linear

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_AXIS = 2


def load_frames(
    path: str | os.PathLike[str],
    n_frames: int = DEFAULT_FRAMES,
    *,
    window: Window | None = None,
    bounds: Bounds = DEFAULT_BOUNDS,
) -> list[Image.Image]:
    """Return up to ``n_frames`` uniformly spaced frames of a volume, video or image as RGB images.

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM series directory, a DICOM file, a NIfTI file, a video, or a 2D image.
    n_frames : int
        Number of frames wanted (fewer come back when the source has fewer).
    window : (center, width), optional
        Intensity window for greyscale DICOM and NIfTI (default: the DICOM's own
        VOI, or the NIfTI volume's min-max). Ignored for videos and 2D images.
    bounds : Bounds
        Where the source may be and the limits its headers must respect.

    Returns
    -------
    list of PIL.Image.Image
        RGB frames in slice / time order.

    Raises
    ------
    MediaError
        The source is missing, empty or cannot be decoded.
    """
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return dicom_series_frames(path, n_frames, window=window, bounds=bounds)
    path = bounds.file(path, "media file")
    if name.endswith(NIFTI_SUFFIXES):
        return nifti_frames(path, n_frames, window=window, bounds=bounds)
    if name.endswith(VIDEO_SUFFIXES):
        return video_frames(path, n_frames, bounds=bounds)
    if name.endswith(DICOM_SUFFIXES) or is_dicom_file(path):
        return dicom_multiframe_frames(path, n_frames, window=window, bounds=bounds)
    return [load_image(path, bounds=bounds)]


def dicom_multiframe_frames(
    path: str | os.PathLike[str],
    n_frames: int = DEFAULT_FRAMES,
    *,
    window: Window | None = None,
    bounds: Bounds = DEFAULT_BOUNDS,
) -> list[Image.Image]:
    """Return ``n_frames`` uniformly spaced frames of a (multi-frame) DICOM file.

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM file with pixel data.
    n_frames : int
        Number of frames wanted.
    window : (center, width), optional
        Overrides the file's VOI for monochrome images.

    Returns
    -------
    list of PIL.Image.Image
        RGB frames; only the chosen frames are decoded.
    """
    ds = read_dicom(path, bounds=bounds)
    indices = uniform_indices(frame_count(ds), n_frames)
    frames = dataset_frames(ds, indices, window=window, source=str(path), bounds=bounds)
    return [array_to_rgb(frame) for frame in frames]


def series_sort_key(
    instance_number: int | None,
    position: Sequence[float] | None,
    orientation: Sequence[float] | None,
    name: str,
) -> tuple[float, float, str]:
    """Sort key of one slice: InstanceNumber, then position along the slice normal, then file name.

    Parameters
    ----------
    instance_number : int or None
        InstanceNumber (missing values sort last).
    position : sequence of 3 float or None
        ImagePositionPatient.
    orientation : sequence of 6 float or None
        ImageOrientationPatient (row and column direction cosines). Without it the
        position's z coordinate is used.
    name : str
        File name, the final tie-breaker.

    Returns
    -------
    tuple
        ``(instance_number, distance_along_normal, name)`` with ``inf`` for missing values.
    """
    number = math.inf if instance_number is None else float(instance_number)
    return number, slice_distance(position, orientation), name


def slice_distance(position: Sequence[float] | None, orientation: Sequence[float] | None) -> float:
    """Project ImagePositionPatient onto the slice normal (``row x column``).

    Parameters
    ----------
    position : sequence of 3 float or None
        ImagePositionPatient.
    orientation : sequence of 6 float or None
        ImageOrientationPatient.

    Returns
    -------
    float
        The signed distance along the normal; the z coordinate without orientation;
        ``inf`` without position.
    """
    if position is None or len(position) != 3:
        return math.inf
    point = np.asarray(position, dtype=np.float64)
    if orientation is None or len(orientation) != 6:
        return float(point[2])
    cosines = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    return float(point @ normal)


def dicom_series_frames(
    directory: str | os.PathLike[str],
    n_frames: int = DEFAULT_FRAMES,
    *,
    window: Window | None = None,
    bounds: Bounds = DEFAULT_BOUNDS,
) -> list[Image.Image]:
    """Return ``n_frames`` uniformly spaced slices of the DICOM series stored in ``directory``.

    Files directly inside ``directory`` that are not DICOM images (no ``DICM``
    marker, or no Rows, e.g. a DICOMDIR) are skipped. Slices are ordered by
    :func:`series_sort_key`; only the chosen slices have their pixels decoded.
    Each slice uses its own VOI unless ``window`` is given.

    Parameters
    ----------
    directory : str or os.PathLike
        A folder holding exactly one series.
    n_frames : int
        Number of slices wanted.
    window : (center, width), optional
        Overrides every slice's VOI.

    Returns
    -------
    list of PIL.Image.Image
        RGB slices in series order.

    Raises
    ------
    MediaError
        No image slices, or slices from more than one SeriesInstanceUID.
    """
    directory = Path(directory)
    slices = sorted_series(directory, bounds=bounds)
    chosen = [slices[i] for i in uniform_indices(len(slices), n_frames)]
    frames = []
    for path in chosen:
        ds = read_dicom(path, bounds=bounds)
        frames.append(array_to_rgb(dataset_frames(ds, [0], window=window, source=str(path), bounds=bounds)[0]))
    return frames


def sorted_series(directory: Path, *, bounds: Bounds = DEFAULT_BOUNDS) -> list[Path]:
    """Return the DICOM image files of a one-series directory in slice order.

    Parameters
    ----------
    directory : pathlib.Path
        The series folder.
    bounds : Bounds
        The folder and every slice must lie inside its roots; at most ``max_frames`` files.

    Returns
    -------
    list of pathlib.Path
        Files sorted by :func:`series_sort_key`.
    """
    bounds.folder(directory)
    keyed = []
    series_uids = set()
    files = sorted(p for p in directory.iterdir() if p.is_file() or p.is_symlink())
    bounds.frames(len(files), str(directory))
    for path in files:
        bounds.file(path, "DICOM slice")
        if not is_dicom_file(path):
            logger.debug("skipping %s in series %s: not a DICOM file", path.name, directory)
            continue
        ds = read_dicom(path, stop_before_pixels=True, bounds=bounds)
        if "Rows" not in ds:
            logger.debug("skipping %s in series %s: not an image", path.name, directory)
            continue
        series_uids.add(str(ds.get("SeriesInstanceUID", "")))
        key = series_sort_key(
            _int_or_none(ds.get("InstanceNumber")),
            _floats(ds.get("ImagePositionPatient")),
            _floats(ds.get("ImageOrientationPatient")),
            path.name,
        )
        keyed.append((key, path))
    if not keyed:
        raise MediaError(f"directory {directory} holds no DICOM image files; point the record at a series folder")
    if len(series_uids) > 1:
        raise MediaError(
            f"directory {directory} mixes {len(series_uids)} DICOM series; put each series in its own folder"
        )
    return [path for _, path in sorted(keyed)]


def nifti_frames(
    path: str | os.PathLike[str],
    n_frames: int = DEFAULT_FRAMES,
    *,
    window: Window | None = None,
    bounds: Bounds = DEFAULT_BOUNDS,
) -> list[Image.Image]:
    """Return ``n_frames`` uniformly spaced slices of a NIfTI volume as RGB images.

    The volume is reoriented to the closest canonical (RAS+) orientation and sliced
    along its last spatial axis (axial for RAS+). Each slice is shown with anterior
    at the top and the patient's left on the image's left. A 4D (or higher) image
    uses its first volume. Intensities: ``window`` (center, width) with the DICOM
    LINEAR function if given, else the min-max of the whole volume.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.nii`` or ``.nii.gz`` file.
    n_frames : int
        Number of slices wanted.
    window : (center, width), optional
        Intensity window.

    Returns
    -------
    list of PIL.Image.Image
        RGB slices, inferior to superior.
    """
    volume = load_nifti_volume(path, bounds=bounds)
    if window is None:
        shown = minmax_to_uint8(volume)
    else:
        shown = window_linear(volume, window[0], window[1])
    indices = uniform_indices(shown.shape[SLICE_AXIS], n_frames)
    return [array_to_rgb(display_slice(shown[:, :, k])) for k in indices]


def load_nifti_volume(path: str | os.PathLike[str], *, bounds: Bounds = DEFAULT_BOUNDS) -> np.ndarray:
    """Read a NIfTI file as a canonical (RAS+) 3D float32 array.

    The header's shape is checked first: one slice at most ``max_pixels``, at most
    ``max_frames`` slices, the float32 volume at most ``max_file_bytes``. Only the
    first volume of a 4D (or higher) image is read.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.nii`` or ``.nii.gz`` file.
    bounds : Bounds
        Where the file may be and the limits its header must respect.

    Returns
    -------
    np.ndarray
        Shape (X, Y, Z); a 2D image gets Z = 1, extra dimensions keep index 0.

    Raises
    ------
    MediaError
        The file is missing or cannot be read.
    """
    path = bounds.file(path, "NIfTI file")
    try:
        image = nibabel.load(path)
        shape = tuple(int(n) for n in image.shape)
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib.error, ...
        raise MediaError(f"{path} could not be read as NIfTI ({type(exc).__name__}: {one_line(exc)})") from exc
    _check_volume_shape(shape, bounds, str(path))
    try:
        if len(shape) > 3:
            logger.debug("%s has shape %s; using its first volume", path, shape)
            first = np.asarray(image.dataobj[(slice(None),) * 3 + (0,) * (len(shape) - 3)], dtype=np.float32)
            image = nibabel.Nifti1Image(first, image.affine)
        if len(image.shape) >= 3:
            image = nibabel.as_closest_canonical(image)
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib.error, ...
        raise MediaError(f"{path} could not be read as NIfTI ({type(exc).__name__}: {one_line(exc)})") from exc
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim != 3 or data.size == 0:
        raise MediaError(f"{path} has shape {data.shape}; expected a 2D or 3D image")
    return data


def _check_volume_shape(shape: tuple[int, ...], bounds: Bounds, source: str) -> None:
    """Refuse a NIfTI whose header shape exceeds ``bounds`` (nothing decoded yet)."""
    if len(shape) < 2 or any(n < 1 for n in shape):
        raise MediaError(f"{source} has shape {shape}; expected a 2D or 3D image")
    x, y = shape[0], shape[1]
    z = shape[2] if len(shape) > 2 else 1
    bounds.pixels(x, y, source)
    bounds.frames(z, source)
    bounds.decoded(x * y * z * np.dtype(np.float32).itemsize, source)


def display_slice(plane: np.ndarray) -> np.ndarray:
    """Turn an (X, Y) RAS+ plane into a (rows, columns) image with anterior at the top.

    Parameters
    ----------
    plane : np.ndarray
        ``volume[:, :, k]`` of a RAS+ volume.

    Returns
    -------
    np.ndarray
        ``plane.T`` flipped vertically.
    """
    return np.ascontiguousarray(plane.T[::-1])


def _int_or_none(value: object) -> int | None:
    """An IS element as int (None if absent or not numeric)."""
    try:
        return None if value is None or value == "" else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _floats(value: object) -> list[float] | None:
    """A multi-valued DS element as a list of floats (None if absent or not numeric)."""
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
