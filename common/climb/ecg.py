"""Load ECGs from arrays, WFDB records and DICOM waveforms.

Two outputs:

- :func:`load_ecg` gives QoQ-Med's model input: float32 ``(8, 2500)``, leads
  I, II, V1-V6 (indices 0, 1, 6..11 of the standard 12-lead order), resampled to
  500 Hz, the first 5 s kept (zero-padded at the end when shorter), then z-scored
  per lead over that whole window with the unbiased standard deviation, as
  QoQ-Med's released normalisation does (a flat lead becomes zeros).
- :func:`load_ecg_12lead` gives all 12 standard leads in mV at the source rate, for
  rendering (:mod:`common.climb.ecg_render`).

Sources, chosen by file name:

- ``.npy`` (loaded with ``allow_pickle=False``) and ``.pt`` (``torch.load`` with
  ``weights_only=True``): a 2D array of 12 leads in the standard order or 8 leads in
  QoQ-Med's order. An array shaped ``(samples, leads)`` (first dimension larger than
  the second) is transposed to ``(leads, samples)``. Values are taken as mV. The
  sampling rate is the ``fs`` argument, else ``fs`` from an optional sidecar
  ``<name>.json`` (``{"fs": 250, "leads": ["I", "II", ...]}``; ``leads`` names the
  rows in any order), else 500 Hz.
- WFDB: the ``.hea`` file or the record path without extension (``wfdb.rdrecord``);
  lead names are matched case-insensitively, physical units converted to mV.
- DICOM waveform (``.dcm`` or the ``DICM`` marker): the multiplex group with the
  longest duration, channel names from ChannelSourceSequence's CodeMeaning (e.g.
  ``"Lead I (Einthoven)"``), units from ChannelSensitivityUnitsSequence (uV/mV/V).

Before any signal is decoded the sampling rate must be a finite number > 0 and the length
(as stored and once resampled to 500 Hz) at most ``data.max_ecg_samples`` per lead
(:class:`common.climb.limits.Bounds`); a signal with NaN or infinite samples is refused
(never silently zeroed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from common.climb.dicom import is_dicom_file, read_dicom
from common.climb.errors import MediaError
from common.climb.limits import DEFAULT_BOUNDS, Bounds
from common.climb.messages import one_line

logger = logging.getLogger(__name__)

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
QOQ_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
DEFAULT_ARRAY_FS = 500.0
TARGET_FS = 500
WINDOW_SECONDS = 5.0
MAX_RESAMPLE_DENOMINATOR = 1000
UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}
ARRAY_SUFFIXES = (".npy", ".pt")
DICOM_SUFFIXES = (".dcm", ".dicom")
_CANONICAL = {name.lower(): name for name in STANDARD_LEADS}


@dataclass(frozen=True)
class EcgSignal:
    """An ECG as read from disk.

    Attributes
    ----------
    data : np.ndarray
        float64 ``(leads, samples)``, in mV.
    leads : tuple of str
        Standard lead name of each row (``None`` for channels that are not ECG leads).
    fs : float
        Sampling rate in Hz.
    """

    data: np.ndarray
    leads: tuple[str | None, ...]
    fs: float


def load_ecg(
    path: str | os.PathLike[str],
    *,
    fs: float | None = None,
    target_fs: int = TARGET_FS,
    seconds: float = WINDOW_SECONDS,
    normalize: bool = True,
    bounds: Bounds = DEFAULT_BOUNDS,
) -> np.ndarray:
    """Load an ECG as QoQ-Med's float32 ``(8, target_fs * seconds)`` model input.

    Parameters
    ----------
    path : str or os.PathLike
        ``.npy`` / ``.pt`` array, WFDB record (``.hea`` or extensionless) or DICOM waveform.
    fs : float, optional
        Sampling rate of an array file (overrides a sidecar JSON; default 500 Hz).
    target_fs : int
        Output sampling rate.
    seconds : float
        Length of the kept window from the start of the record.
    normalize : bool
        z-score each lead (set False to get the resampled, cropped signal in mV).
    bounds : Bounds
        Where the files may be and the limit on samples per lead.

    Returns
    -------
    np.ndarray
        float32 ``(8, round(target_fs * seconds))``, rows I, II, V1..V6.

    Raises
    ------
    MediaError
        The file cannot be read or lacks one of the eight leads.
    """
    signal = read_ecg(path, fs=fs, bounds=bounds)
    eight = select_leads(signal, QOQ_LEADS, source=str(path))
    return standardize(eight, signal.fs, target_fs=target_fs, seconds=seconds, normalize=normalize)


def load_ecg_12lead(
    path: str | os.PathLike[str], *, fs: float | None = None, bounds: Bounds = DEFAULT_BOUNDS
) -> tuple[np.ndarray, float]:
    """Load all 12 standard leads in mV at the record's own sampling rate.

    When only I, II and V1-V6 exist, the limb leads are derived (Einthoven and
    Goldberger): III = II - I, aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2.

    Parameters
    ----------
    path : str or os.PathLike
        Any source :func:`load_ecg` accepts.
    fs : float, optional
        Sampling rate of an array file.
    bounds : Bounds
        Where the files may be and the limit on samples per lead.

    Returns
    -------
    signals : np.ndarray
        float32 ``(12, samples)`` in the order of :data:`STANDARD_LEADS`.
    fs : float
        Sampling rate in Hz.
    """
    signal = read_ecg(path, fs=fs, bounds=bounds)
    return twelve_leads(signal, source=str(path)).astype(np.float32), signal.fs


def standardize(
    data: np.ndarray,
    fs: float,
    *,
    target_fs: int = TARGET_FS,
    seconds: float = WINDOW_SECONDS,
    normalize: bool = True,
) -> np.ndarray:
    """Resample, crop or zero-pad, and optionally z-score a ``(leads, samples)`` array.

    Parameters
    ----------
    data : np.ndarray
        ``(leads, samples)`` signal.
    fs : float
        Its sampling rate in Hz.
    target_fs : int
        Output rate.
    seconds : float
        Output duration.
    normalize : bool
        Apply :func:`zscore` after padding (QoQ-Med's order).

    Returns
    -------
    np.ndarray
        float32 ``(leads, round(target_fs * seconds))``.
    """
    length = int(round(target_fs * seconds))
    fitted = fit_length(resample(data, fs, target_fs), length)
    return (zscore(fitted) if normalize else fitted).astype(np.float32)


def resample(data: np.ndarray, fs: float, target_fs: float) -> np.ndarray:
    """Polyphase resampling along the last axis by the rational factor ``target_fs / fs``.

    The factor is the exact ratio of the two rates written as decimals, reduced to a
    denominator of at most 1000 (e.g. 1000 -> 500 Hz is 1/2, 360 -> 500 Hz is 25/18).

    Parameters
    ----------
    data : np.ndarray
        Signal with time on the last axis.
    fs, target_fs : float
        Input and output rates in Hz (> 0).

    Returns
    -------
    np.ndarray
        float64 resampled signal (the input unchanged when the rates are equal).
    """
    if fs <= 0 or target_fs <= 0:
        raise ValueError(f"sampling rates must be > 0, got fs={fs} target_fs={target_fs}")
    from scipy.signal import resample_poly  # imported here: scipy.signal takes about 1 s to import

    ratio = (Fraction(str(target_fs)) / Fraction(str(fs))).limit_denominator(MAX_RESAMPLE_DENOMINATOR)
    data = np.asarray(data, dtype=np.float64)
    if ratio == 1:
        return data
    return resample_poly(data, ratio.numerator, ratio.denominator, axis=-1)


def fit_length(data: np.ndarray, length: int) -> np.ndarray:
    """Keep the first ``length`` samples (last axis), zero-padding at the end if shorter.

    Parameters
    ----------
    data : np.ndarray
        ``(leads, samples)``.
    length : int
        Output number of samples.

    Returns
    -------
    np.ndarray
        ``(leads, length)``.
    """
    if data.shape[-1] >= length:
        return data[..., :length]
    pad = [(0, 0)] * (data.ndim - 1) + [(0, length - data.shape[-1])]
    return np.pad(data, pad)


def zscore(data: np.ndarray, *, ddof: int = 1, flat_tolerance: float = 1e-12) -> np.ndarray:
    """z-score each row: ``(x - mean) / std``; a row with ``std <= flat_tolerance`` becomes zeros.

    Parameters
    ----------
    data : np.ndarray
        ``(leads, samples)``.
    ddof : int
        Delta degrees of freedom of the standard deviation (1, like ``torch.std``).
    flat_tolerance : float
        Rows whose standard deviation is at most this are treated as flat.

    Returns
    -------
    np.ndarray
        float64 array of the same shape, free of NaN.
    """
    x = np.nan_to_num(np.asarray(data, dtype=np.float64))
    if x.shape[-1] <= ddof:
        return np.zeros_like(x)
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, ddof=ddof, keepdims=True)
    flat = std <= flat_tolerance
    out = (x - mean) / np.where(flat, 1.0, std)
    return np.where(flat, 0.0, out)


def canonical_lead_name(label: str) -> str | None:
    """Map a channel label to a standard lead name, case-insensitively.

    Parenthesised text, spaces, underscores and a leading word "lead" are ignored, so
    ``"Lead I (Einthoven)"``, ``"lead ii"``, ``"AVR"`` and ``"v1"`` give ``"I"``, ``"II"``,
    ``"aVR"`` and ``"V1"``. Inverted leads such as ``"-aVR"`` are not standard leads.

    Parameters
    ----------
    label : str
        A channel name from a WFDB header, DICOM CodeMeaning or sidecar.

    Returns
    -------
    str or None
        One of :data:`STANDARD_LEADS`, or None when the label is not a standard lead.
    """
    text = re.sub(r"\([^)]*\)", " ", str(label)).strip().lower()
    text = re.sub(r"^lead\b", "", text)
    text = re.sub(r"[\s_]+", "", text)
    return _CANONICAL.get(text)


def select_leads(signal: EcgSignal, names: tuple[str, ...], *, source: str = "") -> np.ndarray:
    """Return the rows of ``signal`` for ``names`` (first match per name).

    Parameters
    ----------
    signal : EcgSignal
        A loaded ECG.
    names : tuple of str
        Standard lead names wanted, in output order.
    source : str
        File name for the error message.

    Returns
    -------
    np.ndarray
        ``(len(names), samples)``.

    Raises
    ------
    MediaError
        A wanted lead is missing.
    """
    index = {}
    for row, name in enumerate(signal.leads):
        if name is not None:
            index.setdefault(name, row)
    missing = [name for name in names if name not in index]
    if missing:
        present = [name for name in signal.leads if name]
        raise MediaError(f"{source}: ECG lacks lead(s) {missing} (has {present}); provide 12-lead or I, II, V1-V6 data")
    return signal.data[[index[name] for name in names]]


def twelve_leads(signal: EcgSignal, *, source: str = "") -> np.ndarray:
    """Return the 12 standard leads, deriving III, aVR, aVL, aVF from I and II if needed.

    Parameters
    ----------
    signal : EcgSignal
        A loaded ECG with either all 12 leads or at least I, II and V1-V6.
    source : str
        File name for the error message.

    Returns
    -------
    np.ndarray
        float64 ``(12, samples)`` in :data:`STANDARD_LEADS` order.
    """
    if all(name in signal.leads for name in STANDARD_LEADS):
        return select_leads(signal, STANDARD_LEADS, source=source)
    eight = select_leads(signal, QOQ_LEADS, source=source)
    return derive_limb_leads(eight)


def derive_limb_leads(eight: np.ndarray) -> np.ndarray:
    """Expand I, II, V1-V6 into the 12 standard leads.

    Parameters
    ----------
    eight : np.ndarray
        ``(8, samples)`` in :data:`QOQ_LEADS` order.

    Returns
    -------
    np.ndarray
        ``(12, samples)``: I, II, III = II - I, aVR = -(I + II)/2, aVL = I - II/2,
        aVF = II - I/2, V1..V6.
    """
    lead_i, lead_ii, chest = eight[0], eight[1], eight[2:]
    limb = np.stack(
        [lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2, lead_ii - lead_i / 2]
    )
    return np.concatenate([limb, chest], axis=0)


def read_ecg(path: str | os.PathLike[str], *, fs: float | None = None, bounds: Bounds = DEFAULT_BOUNDS) -> EcgSignal:
    """Read any supported ECG source (see the module docstring) into an :class:`EcgSignal`.

    Parameters
    ----------
    path : str or os.PathLike
        The source.
    fs : float, optional
        Sampling rate of an array file.
    bounds : Bounds
        Where the files may be and the limit on samples per lead.

    Returns
    -------
    EcgSignal
        Signals in mV with standard lead names, all finite.

    Raises
    ------
    MediaError
        The source is missing, unreadable or not a recognised ECG.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(ARRAY_SUFFIXES):
        return read_array_ecg(path, fs=fs, bounds=bounds)
    if name.endswith(".hea") or (not path.suffix and path.with_name(path.name + ".hea").is_file()):
        return read_wfdb_ecg(path, bounds=bounds)
    if name.endswith(DICOM_SUFFIXES) or is_dicom_file(path):
        return read_dicom_ecg(path, bounds=bounds)
    if not path.exists():
        raise MediaError(f"ECG file {path} does not exist; check the record's path")
    raise MediaError(f"{path}: unknown ECG format; use .npy, .pt, a WFDB record (.hea/.dat) or a DICOM waveform")


def read_array_ecg(
    path: str | os.PathLike[str], *, fs: float | None = None, bounds: Bounds = DEFAULT_BOUNDS
) -> EcgSignal:
    """Read a ``.npy`` or ``.pt`` ECG array (see the module docstring for the conventions).

    Parameters
    ----------
    path : str or os.PathLike
        The array file.
    fs : float, optional
        Sampling rate; overrides the sidecar JSON's ``fs``.
    bounds : Bounds
        Where the files may be and the limit on samples per lead (checked from the
        ``.npy`` header before its data is read).

    Returns
    -------
    EcgSignal
        ``(leads, samples)`` float64.
    """
    path = bounds.file(path, "ECG file")
    sidecar = _read_sidecar(path, bounds)
    rate = _rate(fs if fs is not None else sidecar.get("fs", DEFAULT_ARRAY_FS), str(path))
    array = _load_pt(path) if path.name.lower().endswith(".pt") else _load_npy(path)
    array = leads_first(array, source=str(path))
    bounds.samples(array.shape[1], rate, TARGET_FS, str(path))
    bounds.decoded(array.size * np.dtype(np.float64).itemsize, str(path))
    names = sidecar.get("leads")
    if names is not None:
        leads = tuple(canonical_lead_name(str(label)) for label in names)
        if len(leads) != array.shape[0]:
            raise MediaError(
                f"{path}: sidecar names {len(leads)} leads but the array has {array.shape[0]} rows; fix the JSON"
            )
    elif array.shape[0] == len(STANDARD_LEADS):
        leads = STANDARD_LEADS
    elif array.shape[0] == len(QOQ_LEADS):
        leads = QOQ_LEADS
    else:
        raise MediaError(
            f"{path}: ECG array has {array.shape[0]} leads; expected 12 (I..V6) or 8 (I, II, V1-V6), "
            "or name the rows in a sidecar JSON"
        )
    return EcgSignal(_finite(np.asarray(array, dtype=np.float64), str(path)), leads, rate)


def leads_first(array: np.ndarray, *, source: str = "") -> np.ndarray:
    """Return a 2D ECG array as ``(leads, samples)``: transposed when its first dimension is larger.

    Parameters
    ----------
    array : np.ndarray
        ``(leads, samples)`` or ``(samples, leads)``.
    source : str
        File name for the error message.

    Returns
    -------
    np.ndarray
        ``(leads, samples)``.
    """
    if array.ndim != 2:
        raise MediaError(f"{source}: ECG array has shape {array.shape}; expected 2D (leads, samples)")
    return array.T if array.shape[0] > array.shape[1] else array


def read_wfdb_ecg(path: str | os.PathLike[str], *, bounds: Bounds = DEFAULT_BOUNDS) -> EcgSignal:
    """Read a WFDB record (``rec.hea`` or ``rec``) with physical units converted to mV.

    Parameters
    ----------
    path : str or os.PathLike
        The header file or the record path without extension.
    bounds : Bounds
        The header and every signal file it names must lie inside its roots; the
        header's length and rate are checked before the signals are read.

    Returns
    -------
    EcgSignal
        Channels in header order; non-ECG channels get the lead name None.
    """
    import wfdb  # imported here: wfdb pulls in pandas, slow to import for non-WFDB callers

    path = Path(path)
    record_name = path.with_suffix("") if path.suffix.lower() == ".hea" else path
    bounds.file(record_name.with_name(record_name.name + ".hea"), "WFDB header", max_bytes=bounds.max_line_bytes)
    try:
        header = wfdb.rdheader(str(record_name))
    except Exception as exc:  # wfdb raises ValueError, struct errors, ...
        raise MediaError(f"{record_name}: WFDB header could not be read ({type(exc).__name__}: {one_line(exc)})") from exc
    if getattr(header, "seg_name", None):
        raise MediaError(f"{record_name}: multi-segment WFDB records are not supported; convert it to one segment")
    for file_name in sorted(set(header.file_name or [])):
        bounds.file(record_name.parent / file_name, "WFDB signal file")
    bounds.samples(int(header.sig_len or 0), _rate(header.fs, str(record_name)), TARGET_FS, str(record_name))
    try:
        record = wfdb.rdrecord(str(record_name))
    except Exception as exc:  # wfdb raises ValueError, FileNotFoundError, struct errors, ...
        reason = f"{type(exc).__name__}: {one_line(exc)}"
        raise MediaError(f"{record_name}: WFDB record could not be read ({reason})") from exc
    if record.p_signal is None:
        raise MediaError(f"{record_name}: WFDB record has no physical signal; check its .dat file")
    data = np.asarray(record.p_signal, dtype=np.float64).T
    scale = np.array([_unit_scale(unit, str(record_name)) for unit in (record.units or [""] * data.shape[0])])
    leads = tuple(canonical_lead_name(name) for name in record.sig_name)
    return EcgSignal(_finite(data * scale[:, None], str(record_name)), leads, float(record.fs))


def read_dicom_ecg(path: str | os.PathLike[str], *, bounds: Bounds = DEFAULT_BOUNDS) -> EcgSignal:
    """Read the longest multiplex group of a DICOM waveform file, in mV.

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM file with a WaveformSequence (e.g. 12-Lead ECG storage).
    bounds : Bounds
        Where the file may be and the limit on samples per channel (checked before decoding).

    Returns
    -------
    EcgSignal
        Channels in file order with standard lead names.
    """
    ds = read_dicom(path, bounds=bounds)
    groups = ds.get("WaveformSequence") or []
    if not groups:
        raise MediaError(f"{path} has no WaveformSequence; it is not a DICOM waveform (ECG) file")
    index = max(range(len(groups)), key=lambda i: _group_duration(groups[i]))
    group = groups[index]
    rate = _rate(group.get("SamplingFrequency"), str(path))
    try:
        count = int(group.get("NumberOfWaveformSamples") or 0)
    except (TypeError, ValueError):
        raise MediaError(f"{path}: NumberOfWaveformSamples is not a number") from None
    bounds.samples(count, rate, TARGET_FS, str(path))
    try:
        data = np.asarray(ds.waveform_array(index), dtype=np.float64).T
    except Exception as exc:  # pydicom raises ValueError/AttributeError on malformed waveforms
        reason = f"{type(exc).__name__}: {one_line(exc)}"
        raise MediaError(f"{path}: waveform group {index} could not be decoded ({reason})") from exc
    channels = list(group.get("ChannelDefinitionSequence") or [])
    leads = tuple(canonical_lead_name(_channel_label(channel)) for channel in channels)
    scale = np.array([_unit_scale(_channel_unit(channel), str(path)) for channel in channels])
    if len(leads) != data.shape[0]:
        raise MediaError(
            f"{path}: {len(leads)} channel definitions for {data.shape[0]} channels; the file is inconsistent"
        )
    return EcgSignal(_finite(data * scale[:, None], str(path)), leads, rate)


def _rate(value: object, source: str) -> float:
    """A sampling rate as a finite float > 0, else MediaError."""
    try:
        rate = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        rate = math.nan
    if isinstance(value, bool) or not math.isfinite(rate) or rate <= 0:
        raise MediaError(f"{source}: sampling rate {value!r} is not a number > 0 Hz; fix the file or its sidecar")
    return rate


def _finite(data: np.ndarray, source: str) -> np.ndarray:
    """``data`` unchanged if every sample is finite, else MediaError (NaN is never zeroed silently)."""
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise MediaError(f"{source}: ECG has {bad} NaN or infinite sample(s) of {data.size}; repair or drop the recording")
    return data


def _group_duration(group: Dataset) -> float:
    """Duration in seconds of one WaveformSequence item (0 when unknown)."""
    try:
        return float(group.NumberOfWaveformSamples) / float(group.SamplingFrequency)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return 0.0


def _channel_label(channel: Dataset) -> str:
    """CodeMeaning of the channel source, else its ChannelLabel."""
    sources = getattr(channel, "ChannelSourceSequence", None) or []
    if sources and getattr(sources[0], "CodeMeaning", ""):
        return str(sources[0].CodeMeaning)
    return str(getattr(channel, "ChannelLabel", ""))


def _channel_unit(channel: Dataset) -> str:
    """CodeValue of the channel's sensitivity units ('' when absent)."""
    units = getattr(channel, "ChannelSensitivityUnitsSequence", None) or []
    return str(getattr(units[0], "CodeValue", "")) if units else ""


def _unit_scale(unit: str, source: str) -> float:
    """Factor that converts ``unit`` to mV (1 for unknown units, logged)."""
    key = str(unit).strip().lower()
    if key in UNIT_TO_MV:
        return UNIT_TO_MV[key]
    logger.debug("%s: unknown ECG unit %r; keeping values as they are", source, unit)
    return 1.0


def _load_npy(path: Path) -> np.ndarray:
    """np.load without pickle, memory-mapped (the header's shape is known before data is read)."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise ValueError(f"dtype {array.dtype} is not a real number type")
        return array
    except Exception as exc:  # ValueError (pickled/corrupt), OSError, EOFError
        raise MediaError(f"{path} could not be read as a .npy array ({type(exc).__name__}: {one_line(exc)})") from exc


def _load_pt(path: Path) -> np.ndarray:
    """torch.load with weights_only=True (no arbitrary code), as MediaError on failure."""
    import torch  # imported here: torch is slow to import and only .pt sources need it

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe content, RuntimeError for corrupt files
        raise MediaError(f"{path} could not be read as a tensor file ({type(exc).__name__}: {one_line(exc)})") from exc
    if not isinstance(tensor, torch.Tensor):
        raise MediaError(f"{path} holds a {type(tensor).__name__}, not a tensor; save the ECG with torch.save(tensor)")
    return tensor.detach().to(torch.float64).numpy()


def _read_sidecar(path: Path, bounds: Bounds) -> dict:
    """Read ``<name>.json`` next to an array file ({} when absent; at most ``max_line_bytes``)."""
    name = path.name
    for suffix in ARRAY_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    sidecar = path.with_name(name + ".json")
    if not sidecar.exists() and not sidecar.is_symlink():
        return {}
    bounds.file(sidecar, "ECG sidecar", max_bytes=bounds.max_line_bytes)
    try:
        content = json.loads(sidecar.read_text(encoding="utf-8"))
    except RecursionError:
        raise MediaError(f"{sidecar} is not usable JSON (nested too deeply); fix or delete it") from None
    except (OSError, ValueError) as exc:
        raise MediaError(f"{sidecar} is not valid JSON ({one_line(exc)}); fix or delete it") from exc
    if not isinstance(content, dict):
        raise MediaError(f"{sidecar} must hold a JSON object like {{\"fs\": 500, \"leads\": [...]}}")
    return content
