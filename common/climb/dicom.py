"""Read DICOM files and turn their pixel data into 8-bit display frames.

The pipeline for one frame follows DICOM PS3.3 C.11:

1. decode (pydicom's pixel decoders; a compressed transfer syntax needs its plugin),
2. Modality LUT (RescaleSlope / RescaleIntercept, or a Modality LUT Sequence),
3. VOI: an explicit ``window`` argument, else the first WindowCenter / WindowWidth
   value, else a VOI LUT Sequence, else the min-max of the frame,
4. MONOCHROME1 is inverted so that high values are bright.

Colour images skip 2-4: PALETTE COLOR goes through pydicom's ``apply_color_lut``,
YBR_FULL / YBR_FULL_422 are converted to RGB (unless the decoder already did so,
which pydicom 3 does by default and reports in its decode metadata), and samples
wider than 8 bits are scaled down. Frames come back as uint8 arrays, HxW for
monochrome and HxWx3 for colour.

Every failure (missing file, not DICOM, no pixel data, truncated data, missing
decoder) raises :class:`~common.climb.errors.MediaError` with a one-line message.

Nothing is decoded before its declared size is checked (:class:`~common.climb.limits.Bounds`):
Rows x Columns against ``data.max_pixels``, NumberOfFrames against ``data.max_frames`` and
the declared pixel bytes against ``data.max_file_bytes``. A deflated file (the whole
dataset zlib-compressed) is inflated in bounded pieces, its header checked from the
first piece, so a small file cannot expand into gigabytes.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import Decoder
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, convert_color_space, get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from common.climb.errors import MediaError
from common.climb.limits import DEFAULT_BOUNDS, Bounds
from common.climb.messages import one_line
from common.climb.windowing import (
    invert_uint8,
    minmax_to_uint8,
    reduce_bit_depth,
    rescale,
    window,
)

logger = logging.getLogger(__name__)

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
YBR_TO_CONVERT = ("YBR_FULL", "YBR_FULL_422")
RGB_LIKE = ("RGB", "YBR_ICT", "YBR_RCT")
PREAMBLE_LENGTH = 128
DICOM_MAGIC = b"DICM"
# pip distribution names where they differ from the import names pydicom reports.
PIP_NAMES = {"gdcm": "python-gdcm"}
# A deflated dataset's header is read from its first inflated piece of this size.
HEADER_PROBE_BYTES = 4 << 20

Window = tuple[float, float]


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Return True when ``path`` is a file with the DICOM Part 10 ``DICM`` marker.

    Parameters
    ----------
    path : str or os.PathLike
        Any path.

    Returns
    -------
    bool
        False for directories, unreadable files and files without the marker.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(PREAMBLE_LENGTH + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[PREAMBLE_LENGTH:] == DICOM_MAGIC


def read_dicom(
    path: str | os.PathLike[str], *, stop_before_pixels: bool = False, bounds: Bounds = DEFAULT_BOUNDS
) -> Dataset:
    """Read a DICOM Part 10 file.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    stop_before_pixels : bool
        Skip the pixel data (fast header-only read).
    bounds : Bounds
        Where the file may be and the limits its header must respect.

    Returns
    -------
    pydicom.dataset.Dataset
        The parsed dataset (its image header already checked against ``bounds``).

    Raises
    ------
    MediaError
        The file is missing, outside the bounds, too large, is not DICOM, or cannot be parsed.
    """
    path = bounds.file(path, "DICOM file")
    try:
        if _is_deflated(path):
            ds = _read_deflated(path, bounds, stop_before_pixels)
        else:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except MediaError:
        raise
    except InvalidDicomError as exc:
        raise MediaError(
            f"{path} is not a DICOM file (no 'DICM' marker after the 128-byte preamble); "
            "export it from the PACS as DICOM Part 10"
        ) from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise MediaError(f"{path} could not be parsed as DICOM ({type(exc).__name__}: {one_line(exc)})") from exc
    check_header(ds, bounds, str(path))
    return ds


def check_header(ds: Dataset, bounds: Bounds, source: str) -> None:
    """Check an image header against ``bounds`` before any pixel is decoded.

    Rows x Columns must be at most ``max_pixels``, NumberOfFrames at most ``max_frames``
    and Rows x Columns x frames x SamplesPerPixel x BitsAllocated / 8 at most
    ``max_file_bytes``. A dataset without Rows (a waveform, a report) passes.

    Raises
    ------
    MediaError
        A limit is exceeded or a size element is not a number.
    """
    if "Rows" not in ds and "Columns" not in ds:
        return
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError) as exc:
        raise MediaError(f"{source}: image size elements are not numbers ({one_line(exc)})") from None
    bounds.pixels(columns, rows, source)
    bounds.frames(frames, source)
    bounds.decoded(rows * columns * max(frames, 1) * max(samples, 1) * max(-(-bits // 8), 1), source)


def _is_deflated(path: Path) -> bool:
    """Whether the file meta names the Deflated Explicit VR Little Endian transfer syntax."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # not DICOM or corrupt: dcmread reports it
        return False
    return meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def _read_deflated(path: Path, bounds: Bounds, stop_before_pixels: bool) -> Dataset:
    """Read a deflated file, inflating at most ``max_file_bytes`` and checking the header first."""
    with open(path, "rb") as handle:
        preamble = handle.read(PREAMBLE_LENGTH)
        if handle.read(len(DICOM_MAGIC)) != DICOM_MAGIC:
            raise InvalidDicomError("no DICM marker")
        meta = _read_file_meta_info(handle)
        zipped = handle.read()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pieces = [inflater.decompress(zipped, min(HEADER_PROBE_BYTES, bounds.max_file_bytes + 1))]
    bounds.decoded(len(pieces[0]), f"{path} (deflated)")
    try:
        probe = read_dataset(DicomBytesIO(pieces[0]), False, True, stop_when=_at_pixels)
    except Exception:  # a header longer than the probe: checked once fully inflated
        probe = None
    if probe is not None:
        check_header(probe, bounds, str(path))
        if stop_before_pixels:
            return FileDataset(str(path), probe, preamble=preamble, file_meta=meta,
                               is_implicit_VR=False, is_little_endian=True)
    total = len(pieces[0])
    while inflater.unconsumed_tail:
        pieces.append(inflater.decompress(inflater.unconsumed_tail, bounds.max_file_bytes - total + 1))
        total += len(pieces[-1])
        bounds.decoded(total, f"{path} (deflated)")
    pieces.append(inflater.flush())  # at most zlib's 32 KiB window
    stop = _at_pixels if stop_before_pixels else None
    ds = read_dataset(DicomBytesIO(b"".join(pieces)), False, True, stop_when=stop)
    return FileDataset(str(path), ds, preamble=preamble, file_meta=meta, is_implicit_VR=False, is_little_endian=True)


def _at_pixels(tag: object, vr: object, length: int) -> bool:
    return int(tag) >= 0x7FE00008  # type: ignore[call-overload]  # Float/Double Float/Pixel Data


def frame_count(ds: Dataset) -> int:
    """Return the number of frames in a dataset (NumberOfFrames, default 1).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset with an Image Pixel module.

    Returns
    -------
    int
        At least 1.
    """
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def has_pixels(ds: Dataset) -> bool:
    """Return True when the dataset carries (Float / Double Float) Pixel Data."""
    return any(keyword in ds for keyword in PIXEL_KEYWORDS)


def dicom_frames(
    path: str | os.PathLike[str],
    indices: Sequence[int] | None = None,
    *,
    window: Window | None = None,
    bounds: Bounds = DEFAULT_BOUNDS,
) -> list[np.ndarray]:
    """Read a DICOM file and return display frames as uint8 arrays.

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM file with pixel data.
    indices : sequence of int, optional
        Frame indices to decode (default: all frames).
    window : (center, width), optional
        Overrides the file's VOI for monochrome images.
    bounds : Bounds
        Where the file may be and the limits its header must respect.

    Returns
    -------
    list of np.ndarray
        uint8 frames, HxW (monochrome) or HxWx3 (colour).

    Raises
    ------
    MediaError
        The file cannot be read or decoded, or exceeds ``bounds``.
    """
    return dataset_frames(read_dicom(path, bounds=bounds), indices, window=window, source=str(path), bounds=bounds)


def dataset_frames(
    ds: Dataset,
    indices: Sequence[int] | None = None,
    *,
    window: Window | None = None,
    source: str = "",
    bounds: Bounds = DEFAULT_BOUNDS,
) -> list[np.ndarray]:
    """Decode frames of an already-read dataset into uint8 display arrays.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset read with its pixel data.
    indices : sequence of int, optional
        Frame indices (0-based) to decode; default all frames.
    window : (center, width), optional
        Overrides the file's VOI for monochrome images.
    source : str
        Name used in error messages (usually the file path).
    bounds : Bounds
        Limits the image header must respect (checked before decoding).

    Returns
    -------
    list of np.ndarray
        uint8 frames in the order of ``indices``.

    Raises
    ------
    MediaError
        No pixel data, a missing decoder, bad indices or corrupt pixel data.
    """
    source = source or str(getattr(ds, "filename", "") or "<dataset>")
    if not has_pixels(ds):
        sop_class = ds.get("SOPClassUID", "unknown")
        raise MediaError(f"{source} has no Pixel Data (SOP class {sop_class}); it is not an image")
    check_header(ds, bounds, source)
    total = frame_count(ds)
    wanted = list(range(total)) if indices is None else [int(i) for i in indices]
    bad = [i for i in wanted if not 0 <= i < total]
    if bad:
        raise MediaError(f"{source}: frame indices {bad} are outside 0..{total - 1}")
    decoder = _decoder_for(ds, source)
    frames = []
    for index in wanted:
        try:
            array, meta = decoder.as_array(ds, index=index)
            photometric = str(meta.get("photometric_interpretation", ""))
            frames.append(_display_frame(array, ds, photometric, window, source))
        except MediaError:
            raise
        except Exception as exc:  # decoders raise ValueError, RuntimeError, OSError, ...
            raise MediaError(
                f"{source}: frame {index} could not be decoded ({type(exc).__name__}: {one_line(exc)})"
                + _other_decoders_hint(decoder.missing_dependencies)
            ) from exc
    return frames


def transfer_syntax(ds: Dataset, source: str = "") -> UID:
    """Return the dataset's TransferSyntaxUID, raising MediaError if it is missing."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        raise MediaError(
            f"{source or 'dataset'} has no TransferSyntaxUID in its file meta; re-export it as DICOM Part 10"
        )
    return UID(str(uid))


def missing_decoder_message(uid: UID, missing: Sequence[str], source: str) -> str:
    """Build the one-line error for a transfer syntax whose decoders are not installed.

    Parameters
    ----------
    uid : pydicom.uid.UID
        The transfer syntax.
    missing : sequence of str
        pydicom's ``Decoder.missing_dependencies`` lines, e.g.
        ``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"``.
    source : str
        The file name for the message.

    Returns
    -------
    str
        Names the transfer syntax (name and UID) and the pip packages that would decode it.
    """
    choices = [_pip_requirements(line) for line in missing]
    choices = [choice for choice in choices if choice]
    install = " or ".join(f"'{choice}'" for choice in choices) or "a pydicom pixel-data plugin"
    return (
        f"{source}: pixel data uses transfer syntax '{uid.name}' ({uid}) and no installed decoder "
        f"supports it; pip install {install}, or re-export the file uncompressed"
    )


def modality_values(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Modality LUT: a Modality LUT Sequence if present, else slope/intercept.

    Parameters
    ----------
    frame : np.ndarray
        Stored values of one monochrome frame.
    ds : pydicom.dataset.Dataset
        Supplies RescaleSlope / RescaleIntercept (defaults 1 and 0) or ModalityLUTSequence.

    Returns
    -------
    np.ndarray
        float64 values in modality units.
    """
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return rescale(frame, slope, intercept)


def voi_to_uint8(values: np.ndarray, ds: Dataset, window_override: Window | None = None) -> np.ndarray:
    """Map modality values to uint8 with the VOI rules described in the module docstring.

    Parameters
    ----------
    values : np.ndarray
        Output of :func:`modality_values`.
    ds : pydicom.dataset.Dataset
        Supplies WindowCenter / WindowWidth / VOILUTFunction / VOILUTSequence.
    window_override : (center, width), optional
        Takes precedence over the dataset.

    Returns
    -------
    np.ndarray
        uint8 array.
    """
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
    if window_override is not None:
        return window(values, window_override[0], window_override[1], function)
    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        return window(values, center, width, function)
    if "VOILUTSequence" in ds:
        return _voi_lut_sequence(values, ds)
    return minmax_to_uint8(values)


def _voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the first VOI LUT of the sequence and stretch its output range to uint8."""
    item = ds.VOILUTSequence[0]
    bits = int(item.LUTDescriptor[2])
    mapped = apply_voi(np.rint(values).astype(np.int64), ds, index=0)  # a LUT is indexed by integers
    return minmax_to_uint8(np.asarray(mapped), 0.0, float(2**bits - 1))


def _display_frame(
    array: np.ndarray, ds: Dataset, photometric: str, window_override: Window | None, source: str
) -> np.ndarray:
    """Convert one decoded frame to uint8 according to its photometric interpretation."""
    photometric = (photometric or str(ds.get("PhotometricInterpretation", ""))).strip().upper()
    if photometric in MONOCHROME:
        shown = voi_to_uint8(modality_values(array, ds), ds, window_override)
        return invert_uint8(shown) if photometric == "MONOCHROME1" else shown
    if photometric == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return reduce_bit_depth(apply_color_lut(array, ds), bits)
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric in YBR_TO_CONVERT:
        array = convert_color_space(array, "YBR_FULL", "RGB")
        return reduce_bit_depth(array, bits)
    if photometric in RGB_LIKE:
        return reduce_bit_depth(array, bits)
    raise MediaError(
        f"{source}: photometric interpretation {photometric!r} is not supported; "
        "expected MONOCHROME1/2, RGB, YBR_FULL(_422) or PALETTE COLOR"
    )


def _decoder_for(ds: Dataset, source: str) -> Decoder:
    """Return pydicom's decoder for the dataset's transfer syntax, or raise MediaError."""
    uid = transfer_syntax(ds, source)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise MediaError(
            f"{source}: transfer syntax '{uid.name}' ({uid}) has no pixel decoder in pydicom; "
            "re-export the file with an uncompressed or JPEG/JPEG 2000 transfer syntax"
        ) from exc
    if not decoder.is_available:
        raise MediaError(missing_decoder_message(uid, decoder.missing_dependencies, source))
    return decoder


def _other_decoders_hint(missing: Sequence[str]) -> str:
    """Suffix naming the not-installed decoders that might succeed where the installed ones failed."""
    choices = [choice for choice in (_pip_requirements(line) for line in missing) if choice]
    if not choices:
        return ""
    return "; another decoder may handle it: pip install " + " or ".join(f"'{choice}'" for choice in choices)


def _pip_requirements(line: str) -> str:
    """Turn ``"plugin - requires a>=1 and b>=2"`` into ``"a>=1 b>=2"`` (pip names, numpy dropped)."""
    _, _, requires = line.partition("requires")
    parts = [part.strip() for part in requires.replace(",", " and ").split(" and ")]
    packages = []
    for part in parts:
        name = part.split(">")[0].split("=")[0].split("<")[0].strip()
        if not name or name == "numpy":
            continue
        packages.append(PIP_NAMES.get(name, name) + part[len(name):])
    return " ".join(packages)


def _first_value(value: object) -> float | None:
    """First element of a possibly multi-valued DS element, as float (None if absent/invalid)."""
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
