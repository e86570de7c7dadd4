"""Synthetic 12-lead ECG: a PQRST beat template per lead placed at jittered R peaks.

Leads are ordered I, II, III, aVR, aVL, aVF, V1-V6, sampled at 500 Hz for 10 s, in
millivolts. Only leads I, II and V1-V6 are drawn independently; III, aVR, aVL and aVF
are derived from the (noisy) I and II with Einthoven's and Goldberger's relations,
so they hold exactly up to float32 rounding. The class signal is the heart rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LIMB_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF")
PRECORDIAL_LEADS: tuple[str, ...] = ("V1", "V2", "V3", "V4", "V5", "V6")
LEADS: tuple[str, ...] = LIMB_LEADS + PRECORDIAL_LEADS
WAVES: tuple[str, ...] = ("P", "Q", "R", "S", "T")


def _default_amplitudes() -> tuple[tuple[float, ...], ...]:
    # Rows: I, II, V1..V6; columns: P, Q, R, S, T (mV). R grows and S shrinks across
    # the precordial leads, as in a normal R-wave progression.
    return (
        (0.08, -0.05, 0.80, -0.15, 0.20),
        (0.15, -0.08, 1.20, -0.25, 0.30),
        (0.08, 0.00, 0.20, -1.00, -0.10),
        (0.08, 0.00, 0.40, -1.20, 0.30),
        (0.08, 0.00, 0.70, -0.80, 0.40),
        (0.08, -0.05, 1.10, -0.50, 0.40),
        (0.08, -0.08, 1.30, -0.25, 0.35),
        (0.08, -0.08, 1.10, -0.15, 0.30),
    )


@dataclass(frozen=True)
class EcgStyle:
    """Morphology, rhythm and noise of the synthetic ECG.

    Attributes
    ----------
    fs : int
        Sampling rate (Hz).
    seconds : float
        Record length (s).
    amplitudes : tuple of tuple of float
        Wave amplitudes (mV) for leads I, II, V1-V6 (rows) and waves P, Q, R, S, T.
    offsets : tuple of float
        Wave centres relative to the R peak (s); the T offset is scaled by
        ``sqrt(RR)`` (Bazett-like shortening at high rates).
    widths : tuple of float
        Gaussian standard deviations of the waves (s).
    amplitude_jitter : float
        Per-lead multiplicative jitter of the template (uniform +/-).
    normal_bpm, tachycardia_bpm : tuple of float
        Heart-rate ranges of the two classes.
    rr_jitter : float
        Relative standard deviation of beat-to-beat R-R intervals.
    noise_mv : float
        Standard deviation of the white noise (mV).
    wander_mv : tuple of float
        Amplitude range of the baseline wander (mV).
    wander_hz : tuple of float
        Frequency range of the baseline wander (Hz).
    """

    fs: int = 500
    seconds: float = 10.0
    amplitudes: tuple[tuple[float, ...], ...] = _default_amplitudes()
    offsets: tuple[float, ...] = (-0.15, -0.03, 0.0, 0.03, 0.26)
    widths: tuple[float, ...] = (0.022, 0.010, 0.011, 0.012, 0.045)
    amplitude_jitter: float = 0.2
    normal_bpm: tuple[float, float] = (55.0, 95.0)
    tachycardia_bpm: tuple[float, float] = (125.0, 175.0)
    rr_jitter: float = 0.03
    noise_mv: float = 0.02
    wander_mv: tuple[float, float] = (0.03, 0.12)
    wander_hz: tuple[float, float] = (0.15, 0.4)


ECG_STYLE = EcgStyle()


def beat_template(
    amplitudes: np.ndarray, *, rr: float, style: EcgStyle = ECG_STYLE
) -> tuple[np.ndarray, int]:
    """One PQRST complex per lead.

    Parameters
    ----------
    amplitudes : numpy.ndarray
        Wave amplitudes (mV), shape (L, 5) for L leads and waves P, Q, R, S, T.
    rr : float
        R-R interval (s); sets the T-wave offset.
    style : EcgStyle
        Wave offsets and widths.

    Returns
    -------
    template : numpy.ndarray
        Shape (L, W) in mV.
    r_index : int
        Column of the R peak within the template.
    """
    offsets = np.asarray(style.offsets, dtype=np.float64)
    offsets[-1] *= np.sqrt(rr)
    widths = np.asarray(style.widths, dtype=np.float64)
    start = float(np.min(offsets - 4.0 * widths))
    stop = float(np.max(offsets + 4.0 * widths))
    samples = np.arange(round(start * style.fs), round(stop * style.fs) + 1)
    t = samples / style.fs  # (W,)
    z = (t[None, :] - offsets[:, None]) / widths[:, None]  # (5, W)
    waves = np.exp(-0.5 * z**2)  # (5, W)
    return amplitudes @ waves, int(round(-start * style.fs))  # (L, W)


def beat_times(
    rng: np.random.Generator, *, bpm: float, style: EcgStyle = ECG_STYLE
) -> np.ndarray:
    """R-peak times (s) over the record, with a random phase and mild R-R jitter."""
    rr = 60.0 / bpm
    count = int(np.ceil(style.seconds / rr)) + 2
    intervals = rr * (1.0 + style.rr_jitter * rng.standard_normal(count))
    times = rng.uniform(0.0, rr) + np.concatenate([[0.0], np.cumsum(intervals[:-1])])
    return times[times < style.seconds]


def derive_limb_leads(lead_i: np.ndarray, lead_ii: np.ndarray) -> np.ndarray:
    """Leads I, II, III, aVR, aVL, aVF from I and II, shape (6, T).

    III = II - I, aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2.
    """
    return np.stack(
        [
            lead_i,
            lead_ii,
            lead_ii - lead_i,
            -(lead_i + lead_ii) / 2.0,
            lead_i - lead_ii / 2.0,
            lead_ii - lead_i / 2.0,
        ]
    )


def render_ecg(
    rng: np.random.Generator, *, label: int, style: EcgStyle = ECG_STYLE
) -> np.ndarray:
    """A 12-lead ECG in millivolts.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness of this record.
    label : int
        0 = Normal sinus rhythm, 1 = Tachycardia.
    style : EcgStyle
        Morphology, rhythm ranges and noise.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape (12, fs * seconds), leads in ``LEADS`` order.
    """
    n = int(round(style.fs * style.seconds))
    bpm = rng.uniform(*(style.tachycardia_bpm if label == 1 else style.normal_bpm))
    amplitudes = np.asarray(style.amplitudes, dtype=np.float64)  # (8, 5): I, II, V1-V6
    spread = style.amplitude_jitter
    jitter = rng.uniform(-spread, spread, size=(len(amplitudes), 1))
    template, r_index = beat_template(
        amplitudes * (1.0 + jitter), rr=60.0 / bpm, style=style
    )
    width = template.shape[1]
    padded = np.zeros((len(amplitudes), n + 2 * width))  # room for beats at the edges
    for t in beat_times(rng, bpm=bpm, style=style):
        start = width + int(round(t * style.fs)) - r_index
        padded[:, start : start + width] += template
    signal = padded[:, width : width + n]  # (8, T)
    t_axis = np.arange(n) / style.fs
    amp = rng.uniform(*style.wander_mv, size=(len(amplitudes), 1))
    freq = rng.uniform(*style.wander_hz, size=(len(amplitudes), 1))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(len(amplitudes), 1))
    signal = signal + amp * np.sin(2.0 * np.pi * freq * t_axis[None, :] + phase)
    signal = signal + style.noise_mv * rng.standard_normal(signal.shape)
    limb = derive_limb_leads(signal[0], signal[1])  # (6, T)
    return np.concatenate([limb, signal[2:]]).astype(np.float32)  # (12, T)
