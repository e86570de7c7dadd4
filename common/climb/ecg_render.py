"""Render a 12-lead ECG as a clinical paper printout so image-only models can read it.

Layout (the common 3 x 4 + rhythm format): three rows of four 2.5 s panels

    I    aVR  V1  V4
    II   aVL  V2  V5
    III  aVF  V3  V6

where column ``c`` shows seconds ``[2.5 c, 2.5 (c + 1))`` of the record, plus a 10 s
lead II rhythm strip at the bottom. Paper speed 25 mm/s, gain 10 mm/mV, a pink
1 mm minor grid and a red 5 mm major grid, a 1 mV calibration pulse at the start
of each row and lead labels. Drawing uses PIL only, so the output is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.climb.ecg import STANDARD_LEADS

SPEED_MM_PER_S = 25.0
GAIN_MM_PER_MV = 10.0
SEGMENT_SECONDS = 2.5
RHYTHM_SECONDS = 10.0
GRID_LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
ROW_HEIGHT_MM = 30
LEFT_MARGIN_MM = 10
RIGHT_MARGIN_MM = 5
TOP_MARGIN_MM = 5
BOTTOM_MARGIN_MM = 5
MINOR_MM = 1
MAJOR_MM = 5
CALIBRATION_MV = 1.0
CALIBRATION_SECONDS = 0.2
CALIBRATION_OFFSET_MM = 2
LABEL_SIZE_MM = 3.5
LABEL_INSET_MM = 1.0
SEPARATOR_MM = 4.0
TRACE_WIDTH_MM = 0.3
MAJOR_LINE_WIDTH_MM = 0.25
MIN_LABEL_PX = 8
PAPER_COLOUR = (255, 255, 255)
MINOR_COLOUR = (252, 208, 208)
MAJOR_COLOUR = (236, 120, 120)
TRACE_COLOUR = (0, 0, 0)


@dataclass(frozen=True)
class Panel:
    """One drawn strip of the printout.

    Attributes
    ----------
    lead : str
        Standard lead name.
    start_s : float
        Record time at the panel's left edge.
    duration_s : float
        Seconds shown.
    box : tuple of int
        ``(x0, y0, x1, y1)`` in pixels; the baseline (0 mV) is the vertical centre.
    """

    lead: str
    start_s: float
    duration_s: float
    box: tuple[int, int, int, int]


def ecg_layout(px_per_mm: float = 4.0, rhythm_lead: str = "II") -> tuple[tuple[int, int], list[Panel]]:
    """Return the image size and the 13 panels of the printout.

    Parameters
    ----------
    px_per_mm : float
        Resolution; 4 gives a 1060 x 520 image.
    rhythm_lead : str
        Lead of the bottom 10 s strip.

    Returns
    -------
    size : (int, int)
        ``(width, height)`` in pixels.
    panels : list of Panel
        The 12 grid panels row by row, then the rhythm strip.
    """
    segment_mm = SEGMENT_SECONDS * SPEED_MM_PER_S
    width_mm = LEFT_MARGIN_MM + len(GRID_LAYOUT[0]) * segment_mm + RIGHT_MARGIN_MM
    height_mm = TOP_MARGIN_MM + (len(GRID_LAYOUT) + 1) * ROW_HEIGHT_MM + BOTTOM_MARGIN_MM
    panels = []
    for row, leads in enumerate(GRID_LAYOUT):
        for column, lead in enumerate(leads):
            x0 = LEFT_MARGIN_MM + column * segment_mm
            panels.append(_panel(lead, column * SEGMENT_SECONDS, SEGMENT_SECONDS, x0, row, segment_mm, px_per_mm))
    rhythm_mm = RHYTHM_SECONDS * SPEED_MM_PER_S
    panels.append(_panel(rhythm_lead, 0.0, RHYTHM_SECONDS, LEFT_MARGIN_MM, len(GRID_LAYOUT), rhythm_mm, px_per_mm))
    size = (int(round(width_mm * px_per_mm)), int(round(height_mm * px_per_mm)))
    return size, panels


def render_ecg(
    signals: np.ndarray,
    fs: float,
    *,
    px_per_mm: float = 4.0,
    rhythm_lead: str = "II",
    labels: bool = True,
    center_baseline: bool = True,
) -> Image.Image:
    """Draw a 12-lead ECG on paper-style grid (layout in the module docstring).

    Parameters
    ----------
    signals : np.ndarray
        ``(12, samples)`` in mV, rows in :data:`common.climb.ecg.STANDARD_LEADS` order
        (see :func:`common.climb.ecg.load_ecg_12lead`).
    fs : float
        Sampling rate in Hz.
    px_per_mm : float
        Resolution in pixels per millimetre of paper.
    rhythm_lead : str
        Lead of the 10 s strip at the bottom.
    labels : bool
        Write lead names in each panel.
    center_baseline : bool
        Subtract each lead's median so that a DC offset does not push the trace off its row.

    Returns
    -------
    PIL.Image.Image
        RGB image of size :func:`ecg_layout` ``(px_per_mm)[0]``. A record shorter than
        10 s leaves the later panels blank.
    """
    data = np.nan_to_num(np.asarray(signals, dtype=np.float64))
    if data.ndim != 2 or data.shape[0] != len(STANDARD_LEADS):
        raise ValueError(f"render_ecg needs a (12, samples) array in I..V6 order, got shape {data.shape}")
    if fs <= 0 or px_per_mm <= 0:
        raise ValueError(f"fs ({fs}) and px_per_mm ({px_per_mm}) must be > 0")
    if rhythm_lead not in STANDARD_LEADS:
        raise ValueError(f"rhythm lead {rhythm_lead!r} is not one of {STANDARD_LEADS}")
    if center_baseline and data.shape[1]:
        data = data - np.median(data, axis=1, keepdims=True)
    size, panels = ecg_layout(px_per_mm, rhythm_lead)
    image = Image.new("RGB", size, PAPER_COLOUR)
    draw = ImageDraw.Draw(image)
    draw_grid(draw, size, px_per_mm)
    font = _font(px_per_mm) if labels else None
    for row in range(len(GRID_LAYOUT) + 1):
        _draw_calibration(draw, row, px_per_mm)
    for panel in panels:
        trace = data[STANDARD_LEADS.index(panel.lead)]
        _draw_trace(draw, trace, fs, panel, px_per_mm, size)
        if panel.start_s > 0:
            _draw_separator(draw, panel, px_per_mm)
        if font is not None:
            inset = LABEL_INSET_MM * px_per_mm
            draw.text((panel.box[0] + inset, panel.box[1] + inset), panel.lead, fill=TRACE_COLOUR, font=font)
    return image


def draw_grid(draw: ImageDraw.ImageDraw, size: tuple[int, int], px_per_mm: float) -> None:
    """Draw the 1 mm minor and 5 mm major grid over the whole sheet.

    Parameters
    ----------
    draw : PIL.ImageDraw.ImageDraw
        Target.
    size : (int, int)
        Image width and height in pixels.
    px_per_mm : float
        Resolution.
    """
    width, height = size
    major_width = max(1, int(round(px_per_mm * MAJOR_LINE_WIDTH_MM)))
    for major in (False, True):
        step = MAJOR_MM if major else MINOR_MM
        colour, line_width = (MAJOR_COLOUR, major_width) if major else (MINOR_COLOUR, 1)
        for mm in range(0, int(width / px_per_mm) + 1, step):
            x = int(round(mm * px_per_mm))
            draw.line([(x, 0), (x, height - 1)], fill=colour, width=line_width)
        for mm in range(0, int(height / px_per_mm) + 1, step):
            y = int(round(mm * px_per_mm))
            draw.line([(0, y), (width - 1, y)], fill=colour, width=line_width)


def trace_points(
    trace: np.ndarray, fs: float, panel: Panel, px_per_mm: float, height: int
) -> list[tuple[float, float]]:
    """Pixel coordinates of the samples of ``trace`` that fall inside ``panel``'s time span.

    Parameters
    ----------
    trace : np.ndarray
        One lead in mV.
    fs : float
        Sampling rate.
    panel : Panel
        Where and which seconds to draw.
    px_per_mm : float
        Resolution.
    height : int
        Image height; y is clipped to ``[0, height - 1]``.

    Returns
    -------
    list of (x, y)
        Empty when the record ends before the panel starts.
    """
    first = int(round(panel.start_s * fs))
    last = min(trace.shape[0], int(round((panel.start_s + panel.duration_s) * fs)))
    if last - first < 1:
        return []
    times = np.arange(first, last) / fs - panel.start_s
    x = panel.box[0] + times * SPEED_MM_PER_S * px_per_mm
    baseline = (panel.box[1] + panel.box[3]) / 2
    y = np.clip(baseline - trace[first:last] * GAIN_MM_PER_MV * px_per_mm, 0, height - 1)
    return list(zip(x.tolist(), y.tolist()))


def _draw_trace(
    draw: ImageDraw.ImageDraw, trace: np.ndarray, fs: float, panel: Panel, px_per_mm: float, size: tuple[int, int]
) -> None:
    """Draw one lead's polyline inside its panel."""
    points = trace_points(trace, fs, panel, px_per_mm, size[1])
    if len(points) == 1:
        points = points * 2
    if points:
        draw.line(points, fill=TRACE_COLOUR, width=_trace_width(px_per_mm))


def _draw_calibration(draw: ImageDraw.ImageDraw, row: int, px_per_mm: float) -> None:
    """Draw a 1 mV x 0.2 s calibration pulse in the left margin of ``row``."""
    baseline = (TOP_MARGIN_MM + (row + 0.5) * ROW_HEIGHT_MM) * px_per_mm
    left = CALIBRATION_OFFSET_MM * px_per_mm
    right = left + CALIBRATION_SECONDS * SPEED_MM_PER_S * px_per_mm
    top = baseline - CALIBRATION_MV * GAIN_MM_PER_MV * px_per_mm
    end = LEFT_MARGIN_MM * px_per_mm
    points = [(0, baseline), (left, baseline), (left, top), (right, top), (right, baseline), (end, baseline)]
    draw.line(points, fill=TRACE_COLOUR, width=_trace_width(px_per_mm))


def _draw_separator(draw: ImageDraw.ImageDraw, panel: Panel, px_per_mm: float) -> None:
    """Draw the short vertical tick that marks a lead change at a panel's left edge."""
    baseline = (panel.box[1] + panel.box[3]) / 2
    half = SEPARATOR_MM * px_per_mm / 2
    x = panel.box[0]
    draw.line([(x, baseline - half), (x, baseline + half)], fill=TRACE_COLOUR, width=_trace_width(px_per_mm))


def _panel(
    lead: str, start_s: float, duration_s: float, x0_mm: float, row: int, width_mm: float, px_per_mm: float
) -> Panel:
    """Build a Panel from millimetre coordinates."""
    y0_mm = TOP_MARGIN_MM + row * ROW_HEIGHT_MM

    def px(mm: float) -> int:
        return int(round(mm * px_per_mm))

    box = (px(x0_mm), px(y0_mm), px(x0_mm + width_mm), px(y0_mm + ROW_HEIGHT_MM))
    return Panel(lead, start_s, duration_s, box)


def _trace_width(px_per_mm: float) -> int:
    """Trace line width in pixels (about 0.3 mm, at least 1)."""
    return max(1, int(round(px_per_mm * TRACE_WIDTH_MM)))


def _font(px_per_mm: float) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at about 3.5 mm (the bitmap font when FreeType is absent)."""
    size = max(MIN_LABEL_PX, int(round(LABEL_SIZE_MM * px_per_mm)))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()
