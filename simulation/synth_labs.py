"""Synthetic laboratory reports for the diabetes text domain.

A report lists the two glycaemic analytes (fasting glucose, HbA1c) and a few
distractor analytes in random order, each with a value and, when the printed value
falls outside the reference range, an ``(H)`` or ``(L)`` flag as real reports carry.
Diabetes always shows two high glycaemic values; no-diabetes shows normal ones;
distractors are abnormal now and then regardless of the class, so "any flag" is a
strong but imperfect cue and "a flag on a glycaemic line" a perfect one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Analyte:
    """One line of a lab report.

    Attributes
    ----------
    name, unit : str
        Printed name and unit.
    low, high : float
        Reference range; a printed value below ``low`` is flagged (L), above
        ``high`` (H).
    decimals : int
        Printed decimals.
    """

    name: str
    unit: str
    low: float
    high: float
    decimals: int

    def line(self, value: float) -> str:
        """The printed line for ``value``, flagged against the reference range."""
        printed = round(value, self.decimals)
        text = f"{self.name}: {printed:.{self.decimals}f} {self.unit}"
        if printed > self.high:
            return f"{text} (H)"
        if printed < self.low:
            return f"{text} (L)"
        return text


GLUCOSE = Analyte("Fasting glucose", "mg/dL", 70.0, 99.0, 0)
HBA1C = Analyte("HbA1c", "%", 4.0, 5.6, 1)
DISTRACTORS: tuple[Analyte, ...] = (
    Analyte("Creatinine", "mg/dL", 0.6, 1.2, 1),
    Analyte("Sodium", "mmol/L", 135.0, 145.0, 0),
    Analyte("Potassium", "mmol/L", 3.5, 5.1, 1),
    Analyte("ALT", "U/L", 7.0, 56.0, 0),
    Analyte("Hemoglobin", "g/dL", 12.0, 17.5, 1),
    Analyte("LDL cholesterol", "mg/dL", 40.0, 129.0, 0),
    Analyte("TSH", "mIU/L", 0.4, 4.0, 2),
    Analyte("WBC", "10^9/L", 4.0, 11.0, 1),
)
REPORT_HEADER = "Laboratory report of a patient:"


@dataclass(frozen=True)
class LabStyle:
    """Class-conditional value ranges of the lab reports.

    Attributes
    ----------
    diabetic_glucose, diabetic_hba1c : tuple of float
        Value ranges of a clear diabetic.
    borderline_glucose, borderline_hba1c : tuple of float
        Ranges used for one of the two analytes of a borderline diabetic (still
        above the reference range).
    borderline_share : float
        Share of diabetics drawn as borderline.
    normal_glucose, normal_hba1c : tuple of float
        Value ranges without diabetes (inside the reference range).
    distractor_count : tuple of int
        Range (inclusive) of distractor analytes per report.
    distractor_abnormal : float
        Probability that a distractor value is abnormal (half high, half low).
    abnormal_reach : float
        An abnormal value lies up to this fraction of the range width outside it.
    """

    diabetic_glucose: tuple[float, float] = (126.0, 280.0)
    diabetic_hba1c: tuple[float, float] = (6.5, 11.5)
    borderline_glucose: tuple[float, float] = (101.0, 125.0)
    borderline_hba1c: tuple[float, float] = (5.8, 6.4)
    borderline_share: float = 0.15
    normal_glucose: tuple[float, float] = (72.0, 98.0)
    normal_hba1c: tuple[float, float] = (4.4, 5.5)
    distractor_count: tuple[int, int] = (3, 5)
    distractor_abnormal: float = 0.04
    abnormal_reach: float = 0.4


LAB_STYLE = LabStyle()


def _glycaemic_values(
    rng: np.random.Generator, *, label: int, style: LabStyle
) -> tuple[float, float]:
    """(glucose, HbA1c) for one patient."""
    if label == 0:
        return rng.uniform(*style.normal_glucose), rng.uniform(*style.normal_hba1c)
    glucose = rng.uniform(*style.diabetic_glucose)
    hba1c = rng.uniform(*style.diabetic_hba1c)
    if rng.uniform() < style.borderline_share:
        if rng.uniform() < 0.5:
            glucose = rng.uniform(*style.borderline_glucose)
        else:
            hba1c = rng.uniform(*style.borderline_hba1c)
    return glucose, hba1c


def _distractor_value(
    rng: np.random.Generator, analyte: Analyte, *, style: LabStyle
) -> float:
    """A value inside the reference range, or outside it with small probability."""
    span = analyte.high - analyte.low
    margin = 10.0 ** (-analyte.decimals)  # keep normal values off the flag boundary
    if rng.uniform() >= style.distractor_abnormal:
        return rng.uniform(analyte.low + margin, analyte.high - margin)
    excess = rng.uniform(0.05, style.abnormal_reach) * span
    if rng.uniform() < 0.5:
        return analyte.high + excess
    return max(analyte.low - excess, 0.1 * analyte.low)  # lab values stay positive


def render_lab_report(
    rng: np.random.Generator, *, label: int, style: LabStyle = LAB_STYLE
) -> str:
    """A lab report for one patient, header plus one line per analyte.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness of this report.
    label : int
        0 = No diabetes, 1 = Diabetes.
    style : LabStyle
        Class-conditional ranges and distractor settings.

    Returns
    -------
    str
        Newline-separated report, without a trailing newline.
    """
    glucose, hba1c = _glycaemic_values(rng, label=label, style=style)
    lines = [GLUCOSE.line(glucose), HBA1C.line(hba1c)]
    count = int(rng.integers(style.distractor_count[0], style.distractor_count[1] + 1))
    for index in rng.choice(len(DISTRACTORS), size=count, replace=False):
        analyte = DISTRACTORS[int(index)]
        lines.append(analyte.line(_distractor_value(rng, analyte, style=style)))
    order = rng.permutation(len(lines))
    return "\n".join([REPORT_HEADER, *(lines[int(i)] for i in order)])
