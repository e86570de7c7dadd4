"""ECG loading in QoQ-Med's (8, 2500) convention and as 12 leads in mV."""

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from scipy.signal import resample_poly

from common.climb.ecg import (
    STANDARD_LEADS,
    canonical_lead_name,
    derive_limb_leads,
    fit_length,
    load_ecg,
    load_ecg_12lead,
    resample,
    zscore,
)
from common.climb.errors import MediaError

QOQ_ROWS = [0, 1, 6, 7, 8, 9, 10, 11]


def synthetic_12lead(samples: int, fs: float) -> np.ndarray:
    """(12, samples) sines of different frequencies and amplitudes, in mV."""
    t = np.arange(samples) / fs
    return np.stack([(0.2 + 0.1 * i) * np.sin(2 * np.pi * (1 + 0.5 * i) * t) for i in range(12)])


@pytest.fixture(scope="module")
def dicom_ecg() -> str:
    return get_testdata_file("waveform_ecg.dcm")


def test_dicom_ecg_shape_and_zscore(dicom_ecg: str) -> None:
    ecg = load_ecg(dicom_ecg)
    assert ecg.shape == (8, 2500) and ecg.dtype == np.float32
    assert np.abs(ecg.mean(axis=1)).max() < 1e-4
    assert ecg.std(axis=1, ddof=1) == pytest.approx(np.ones(8), abs=1e-4)


def test_dicom_lead_ii_matches_resampled_source(dicom_ecg: str) -> None:
    ds = pydicom.dcmread(dicom_ecg)
    microvolts = ds.waveform_array(0)  # (10000, 12) at 1000 Hz, in uV
    lead_ii_mv = resample_poly(microvolts[:, 1] / 1000.0, 1, 2)[:2500]
    raw = load_ecg(dicom_ecg, normalize=False)
    assert np.allclose(raw[1], lead_ii_mv, atol=1e-5)
    every = resample_poly(microvolts.T / 1000.0, 1, 2, axis=-1)[QOQ_ROWS, :2500]
    assert np.allclose(raw, every, atol=1e-5)


def test_dicom_12lead_in_millivolts(dicom_ecg: str) -> None:
    signals, fs = load_ecg_12lead(dicom_ecg)
    assert fs == 1000.0 and signals.shape == (12, 10000)
    microvolts = pydicom.dcmread(dicom_ecg).waveform_array(0).T
    assert np.allclose(signals, microvolts / 1000.0, atol=1e-6)


def test_npy_250hz_is_upsampled(tmp_path: Path) -> None:
    signals = synthetic_12lead(500, 250.0)  # 2 s at 250 Hz
    np.save(tmp_path / "ecg.npy", signals)
    assert resample(signals, 250, 500).shape == (12, 1000)
    raw = load_ecg(tmp_path / "ecg.npy", fs=250, normalize=False)
    assert raw.shape == (8, 2500)
    assert np.allclose(raw[:, :1000], resample_poly(signals, 2, 1, axis=-1)[QOQ_ROWS], atol=1e-6)
    assert not raw[:, 1000:].any()  # shorter than 5 s: zero padding at the end


def test_samples_by_leads_is_transposed(tmp_path: Path) -> None:
    signals = synthetic_12lead(3000, 500.0)
    np.save(tmp_path / "leads_first.npy", signals)
    np.save(tmp_path / "samples_first.npy", signals.T)
    assert np.array_equal(load_ecg(tmp_path / "leads_first.npy"), load_ecg(tmp_path / "samples_first.npy"))


def test_pt_and_sidecar(tmp_path: Path) -> None:
    signals = synthetic_12lead(2000, 400.0)
    np.save(tmp_path / "a.npy", signals)
    torch.save(torch.from_numpy(signals.astype(np.float32)), tmp_path / "b.pt")
    (tmp_path / "b.json").write_text(json.dumps({"fs": 400}))
    from_npy = load_ecg(tmp_path / "a.npy", fs=400)
    from_pt = load_ecg(tmp_path / "b.pt")
    assert from_pt.shape == (8, 2500)
    assert np.allclose(from_npy, from_pt, atol=1e-4)
    # A sidecar may name the rows in another order.
    order = [11, 3, 0, 7, 1, 6, 2, 4, 5, 8, 10, 9]
    np.save(tmp_path / "c.npy", signals[order])
    (tmp_path / "c.json").write_text(json.dumps({"fs": 400, "leads": [STANDARD_LEADS[i] for i in order]}))
    assert np.allclose(load_ecg(tmp_path / "c.npy"), from_npy, atol=1e-6)


def test_pt_must_hold_a_plain_tensor(tmp_path: Path) -> None:
    torch.save({"signal": torch.zeros(12, 100)}, tmp_path / "dict.pt")
    with pytest.raises(MediaError, match="not a tensor"):
        load_ecg(tmp_path / "dict.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(MediaError, match="junk.pt"):
        load_ecg(tmp_path / "junk.pt")


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # wfdb calls a deprecated pandas API
def test_wfdb_record(tmp_path: Path) -> None:
    import wfdb  # imported here so that the mark above covers wfdb's import-time warnings

    signals = synthetic_12lead(3000, 1000.0)
    names = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "v6"]
    units = ["mV"] * 11 + ["uV"]
    stored = signals.copy()
    stored[11] *= 1000.0  # V6 written in microvolts
    wfdb.wrsamp(
        "rec", fs=1000, units=units, sig_name=names, p_signal=stored.T, fmt=["16"] * 12, write_dir=str(tmp_path)
    )
    expected = fit_length(resample_poly(signals, 1, 2, axis=-1)[QOQ_ROWS], 2500)
    for path in (tmp_path / "rec.hea", tmp_path / "rec"):
        assert np.allclose(load_ecg(path, normalize=False), expected, atol=2e-3)
    twelve, fs = load_ecg_12lead(tmp_path / "rec.hea")
    assert fs == 1000.0 and np.allclose(twelve, signals, atol=2e-3)


def test_flat_lead_becomes_zeros(tmp_path: Path) -> None:
    signals = synthetic_12lead(3000, 500.0)
    signals[6] = 0.7  # V1 is a constant
    signals[7] = 0.0  # V2 flat at zero
    np.save(tmp_path / "flat.npy", signals)
    ecg = load_ecg(tmp_path / "flat.npy")
    assert not np.isnan(ecg).any()
    assert not ecg[2].any() and not ecg[3].any()
    assert ecg[0].std(ddof=1) == pytest.approx(1.0, abs=1e-4)


def test_eight_leads_and_derived_limb_leads(tmp_path: Path) -> None:
    twelve = synthetic_12lead(1000, 500.0)
    eight = twelve[QOQ_ROWS]
    np.save(tmp_path / "eight.npy", eight)
    assert np.allclose(load_ecg(tmp_path / "eight.npy", normalize=False)[:, :1000], eight, atol=1e-6)
    signals, fs = load_ecg_12lead(tmp_path / "eight.npy")
    lead_i, lead_ii = eight[0], eight[1]
    assert fs == 500.0 and signals.shape == (12, 1000)
    assert np.allclose(signals[2], lead_ii - lead_i, atol=1e-6)
    assert np.allclose(signals[3], -(lead_i + lead_ii) / 2, atol=1e-6)
    assert np.allclose(signals[4], lead_i - lead_ii / 2, atol=1e-6)
    assert np.allclose(signals[5], lead_ii - lead_i / 2, atol=1e-6)
    assert np.allclose(signals[6:], eight[2:], atol=1e-6)
    assert derive_limb_leads(eight).shape == (12, 1000)


def test_wrong_shapes_are_media_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "five.npy", np.zeros((5, 1000)))
    with pytest.raises(MediaError, match="5 leads"):
        load_ecg(tmp_path / "five.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 12, 100)))
    with pytest.raises(MediaError, match="2D"):
        load_ecg(tmp_path / "cube.npy")
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(MediaError, match="bad.npy"):
        load_ecg(tmp_path / "bad.npy")
    with pytest.raises(MediaError, match="does not exist"):
        load_ecg(tmp_path / "absent.npy")
    with pytest.raises(MediaError, match="WaveformSequence"):
        load_ecg(get_testdata_file("CT_small.dcm"))


def test_pure_helpers_hand_values() -> None:
    assert zscore(np.array([[1.0, 2.0, 3.0]])).tolist() == [[-1.0, 0.0, 1.0]]
    assert zscore(np.array([[4.0, 4.0, 4.0]])).tolist() == [[0.0, 0.0, 0.0]]
    assert fit_length(np.array([[1.0, 2.0]]), 4).tolist() == [[1.0, 2.0, 0.0, 0.0]]
    assert fit_length(np.array([[1.0, 2.0, 3.0]]), 2).tolist() == [[1.0, 2.0]]
    assert resample(np.zeros((1, 3600)), 360, 500).shape == (1, 5000)  # factor 25/18
    assert resample(np.ones((1, 10)), 500, 500).shape == (1, 10)


@pytest.mark.parametrize(
    ("label", "name"),
    [("Lead I (Einthoven)", "I"), ("Lead II", "II"), ("lead aVR", "aVR"), ("AVF", "aVF"), ("v1", "V1"),
     ("V6 ", "V6"), ("Lead III (Einthoven)", "III"), ("-aVR", None), ("MLII", None), ("Resp", None)],
)
def test_lead_names(label: str, name: str | None) -> None:
    assert canonical_lead_name(label) == name
