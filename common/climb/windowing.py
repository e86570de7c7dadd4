"""Pure intensity transforms that turn stored pixel values into 8-bit display values.

These follow DICOM PS3.3 C.11: the Modality LUT (rescale slope/intercept) maps
stored values to modality units (e.g. Hounsfield units), then a VOI window maps a
range of those units onto the display range. Every function takes arrays and
returns arrays; none reads files.
"""

from __future__ import annotations

import numpy as np

UINT8_MAX = 255


def rescale(values: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Apply the linear Modality LUT ``out = values * slope + intercept``.

    Parameters
    ----------
    values : np.ndarray
        Stored pixel values.
    slope, intercept : float
        RescaleSlope and RescaleIntercept.

    Returns
    -------
    np.ndarray
        float64 values in modality units.
    """
    return values.astype(np.float64) * float(slope) + float(intercept)


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map values to uint8 with the DICOM LINEAR VOI function.

    ``x <= c - 0.5 - (w - 1) / 2`` gives 0, ``x > c - 0.5 + (w - 1) / 2`` gives 255,
    and values in between follow ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``.
    A width of 1 or less is a threshold at ``c - 0.5``.

    Parameters
    ----------
    values : np.ndarray
        Values in modality units.
    center, width : float
        WindowCenter and WindowWidth.

    Returns
    -------
    np.ndarray
        uint8 array of the same shape.
    """
    x = values.astype(np.float64)
    c = float(center) - 0.5
    w = float(width) - 1.0
    if w <= 0.0:
        return np.where(x > c, UINT8_MAX, 0).astype(np.uint8)
    scaled = ((x - c) / w + 0.5) * UINT8_MAX
    return _to_uint8(scaled)


def window_linear_exact(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map values to uint8 with the DICOM LINEAR_EXACT VOI function.

    ``out = ((x - c) / w + 0.5) * 255``, clipped to [0, 255].

    Parameters
    ----------
    values : np.ndarray
        Values in modality units.
    center, width : float
        WindowCenter and WindowWidth (width must be > 0).

    Returns
    -------
    np.ndarray
        uint8 array of the same shape.
    """
    if width <= 0:
        raise ValueError(f"window width {width} must be > 0 for LINEAR_EXACT; fix WindowWidth")
    scaled = ((values.astype(np.float64) - float(center)) / float(width) + 0.5) * UINT8_MAX
    return _to_uint8(scaled)


def window_sigmoid(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map values to uint8 with the DICOM SIGMOID VOI function.

    ``out = 255 / (1 + exp(-4 (x - c) / w))``.

    Parameters
    ----------
    values : np.ndarray
        Values in modality units.
    center, width : float
        WindowCenter and WindowWidth (width must be > 0).

    Returns
    -------
    np.ndarray
        uint8 array of the same shape.
    """
    if width <= 0:
        raise ValueError(f"window width {width} must be > 0 for SIGMOID; fix WindowWidth")
    z = -4.0 * (values.astype(np.float64) - float(center)) / float(width)
    with np.errstate(over="ignore"):
        scaled = UINT8_MAX / (1.0 + np.exp(z))
    return _to_uint8(scaled)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply the VOI function named by a DICOM VOILUTFunction value.

    Parameters
    ----------
    values : np.ndarray
        Values in modality units.
    center, width : float
        WindowCenter and WindowWidth.
    function : str
        ``"LINEAR"`` (the DICOM default), ``"LINEAR_EXACT"`` or ``"SIGMOID"``.

    Returns
    -------
    np.ndarray
        uint8 array of the same shape.
    """
    name = (function or "LINEAR").strip().upper()
    if name == "LINEAR":
        return window_linear(values, center, width)
    if name == "LINEAR_EXACT":
        return window_linear_exact(values, center, width)
    if name == "SIGMOID":
        return window_sigmoid(values, center, width)
    raise ValueError(f"unknown VOI LUT function {function!r}; expected LINEAR, LINEAR_EXACT or SIGMOID")


def minmax_to_uint8(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scale ``[lo, hi]`` linearly onto ``[0, 255]`` (defaults: the array's min and max).

    A constant array (``hi == lo``) maps to zeros. NaNs map to 0.

    Parameters
    ----------
    values : np.ndarray
        Any numeric array.
    lo, hi : float, optional
        The value range to stretch; values outside it are clipped.

    Returns
    -------
    np.ndarray
        uint8 array of the same shape.
    """
    x = np.nan_to_num(values.astype(np.float64), nan=0.0)
    lo = float(np.min(x)) if lo is None else float(lo)
    hi = float(np.max(x)) if hi is None else float(hi)
    if x.size == 0 or hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return _to_uint8((x - lo) / (hi - lo) * UINT8_MAX)


def invert_uint8(values: np.ndarray) -> np.ndarray:
    """Return ``255 - values`` (MONOCHROME1 shows low values as white).

    Parameters
    ----------
    values : np.ndarray
        uint8 array.

    Returns
    -------
    np.ndarray
        uint8 array.
    """
    return (UINT8_MAX - values.astype(np.int16)).astype(np.uint8)


def reduce_bit_depth(values: np.ndarray, bits: int) -> np.ndarray:
    """Scale unsigned ``bits``-bit colour samples to 8 bits by dropping low bits.

    Parameters
    ----------
    values : np.ndarray
        Unsigned integer samples in ``[0, 2**bits)``.
    bits : int
        Bits per sample of the input (8 returns the values unchanged as uint8).

    Returns
    -------
    np.ndarray
        uint8 array.
    """
    if bits <= 8:
        return np.clip(values, 0, UINT8_MAX).astype(np.uint8)
    shifted = values.astype(np.uint64) >> np.uint64(bits - 8)
    return np.clip(shifted, 0, UINT8_MAX).astype(np.uint8)


def _to_uint8(scaled: np.ndarray) -> np.ndarray:
    """Round and clip float values to uint8."""
    return np.clip(np.rint(scaled), 0, UINT8_MAX).astype(np.uint8)
