"""Paper-style 12-lead ECG rendering of pydicom's real ECG."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from common.climb.ecg import load_ecg_12lead
from common.climb.ecg_render import MAJOR_COLOUR, MINOR_COLOUR, ecg_layout, render_ecg

EDGE = 3  # pixels kept clear of a panel's left edge (lead-change tick)


@pytest.fixture(scope="module")
def ecg() -> tuple[np.ndarray, float]:
    return load_ecg_12lead(get_testdata_file("waveform_ecg.dcm"))


def dark_pixels(pixels: np.ndarray, box: tuple[int, int, int, int]) -> int:
    x0, y0, x1, y1 = box
    region = pixels[y0:y1, x0 + EDGE : x1]
    return int((region.max(axis=2) < 80).sum())


def test_render_real_ecg(ecg: tuple[np.ndarray, float], tmp_path: Path) -> None:
    signals, fs = ecg
    path = tmp_path / "ecg.png"
    render_ecg(signals, fs, labels=False).save(path)
    with Image.open(path) as saved:
        image = saved.convert("RGB")
    size, panels = ecg_layout()
    assert image.size == size == (1060, 520)
    pixels = np.asarray(image)
    colours = pixels.reshape(-1, 3)
    assert (colours == MINOR_COLOUR).all(axis=1).sum() > 10_000
    assert (colours == MAJOR_COLOUR).all(axis=1).sum() > 5_000
    assert len(panels) == 13
    assert [p.lead for p in panels] == ["I", "aVR", "V1", "V4", "II", "aVL", "V2", "V5", "III", "aVF", "V3", "V6", "II"]
    for panel in panels:
        assert dark_pixels(pixels, panel.box) > 100, panel.lead


def test_labels_and_determinism(ecg: tuple[np.ndarray, float]) -> None:
    signals, fs = ecg
    first, second = render_ecg(signals, fs), render_ecg(signals, fs)
    assert first.tobytes() == second.tobytes()
    plain = np.asarray(render_ecg(signals, fs, labels=False))
    assert (np.asarray(first).max(axis=2) < 80).sum() > (plain.max(axis=2) < 80).sum()


def test_resolution_scales_the_sheet(ecg: tuple[np.ndarray, float]) -> None:
    signals, fs = ecg
    assert render_ecg(signals, fs, px_per_mm=2).size == (530, 260)


def test_short_record_draws_what_exists(ecg: tuple[np.ndarray, float]) -> None:
    signals, fs = ecg
    three_seconds = signals[:, : int(3 * fs)]
    pixels = np.asarray(render_ecg(three_seconds, fs, labels=False))
    _, panels = ecg_layout()
    for panel in panels[:12]:
        drawn = dark_pixels(pixels, panel.box)
        assert (drawn > 0) == (panel.start_s < 3.0), (panel.lead, panel.start_s)
    x0, y0, x1, y1 = panels[12].box
    second_half = dark_pixels(pixels, ((x0 + x1) // 2, y0, x1, y1))
    assert dark_pixels(pixels, panels[12].box) > 100 and second_half == 0


def test_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="12, samples"):
        render_ecg(np.zeros((8, 100)), 500)
    with pytest.raises(ValueError, match="rhythm lead"):
        render_ecg(np.zeros((12, 100)), 500, rhythm_lead="X")
