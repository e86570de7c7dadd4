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


# --------------------------------------------------------------------------- hostile inputs


def _given(limits: dict) -> dict:
    """Loader keywords: lowered limits as ``bounds``, or nothing (the defaults)."""
    if not limits:
        return {}
    from common.climb.limits import Bounds

    return {"bounds": Bounds(**limits)}


def _npy(path: Path, signals: np.ndarray, sidecar: object = None) -> Path:
    np.save(path, signals)
    if sidecar is not None:
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        path.with_suffix(".json").write_text(text, encoding="utf-8")
    return path


def _with_nan(rows: list[int]) -> np.ndarray:
    signals = synthetic_12lead(1000, 500.0)
    signals[rows, 10:20] = np.nan
    return signals


def _dev_zero_sidecar(path: Path) -> Path:
    _npy(path, synthetic_12lead(1000, 500.0))
    path.with_suffix(".json").symlink_to("/dev/zero")
    return path


# (what, build the .npy in a folder, limits, words of the reason)
HOSTILE_ECGS = [
    ("sidecar fs=0.01 (a 15 GiB resampling)", lambda p: _npy(p, synthetic_12lead(30, 500.0), {"fs": 0.01}), {},
     "exceeds data.max_ecg_samples=1000000"),
    ("sidecar fs=0", lambda p: _npy(p, synthetic_12lead(100, 500.0), {"fs": 0}), {}, "sampling rate 0"),
    ("sidecar fs=-500", lambda p: _npy(p, synthetic_12lead(100, 500.0), {"fs": -500}), {}, "sampling rate -500"),
    ("sidecar fs=NaN", lambda p: _npy(p, synthetic_12lead(100, 500.0), '{"fs": NaN}'), {}, "sampling rate nan"),
    ("sidecar fs=true", lambda p: _npy(p, synthetic_12lead(100, 500.0), {"fs": True}), {}, "sampling rate True"),
    ("sidecar fs='fast'", lambda p: _npy(p, synthetic_12lead(100, 500.0), {"fs": "fast"}), {}, "sampling rate 'fast'"),
    ("sidecar nested 200000 deep", lambda p: _npy(p, synthetic_12lead(100, 500.0), "[" * 200_000 + "]" * 200_000), {},
     "nested too deeply"),
    ("sidecar symlinked to /dev/zero", _dev_zero_sidecar, {}, "not a regular file"),
    ("ECG symlinked to /dev/zero", lambda p: (p.symlink_to("/dev/zero"), p)[1], {}, "not a regular file"),
    ("more samples than max_ecg_samples", lambda p: _npy(p, synthetic_12lead(5000, 500.0)), {"max_ecg_samples": 4000},
     "exceeds data.max_ecg_samples=4000"),
    ("NaN in one lead", lambda p: _npy(p, _with_nan([6])), {}, "10 NaN or infinite sample(s)"),
    ("an all-NaN ECG", lambda p: _npy(p, np.full((12, 1000), np.nan)), {}, "12000 NaN or infinite sample(s)"),
    ("infinite samples", lambda p: _npy(p, np.where(np.eye(12, 1000) > 0, np.inf, 0.1)), {},
     "12 NaN or infinite sample(s)"),
]


@pytest.mark.parametrize(("what", "build", "limits", "reason"), HOSTILE_ECGS, ids=[h[0] for h in HOSTILE_ECGS])
def test_hostile_ecgs_are_refused_before_resampling(tmp_path: Path, what, build, limits, reason) -> None:
    """Each hostile ECG is a one-line MediaError, through both loaders (QoQ input and the rendered 12 leads)."""
    path = build(tmp_path / "e.npy")
    for load in (load_ecg, load_ecg_12lead):
        with pytest.raises(MediaError) as caught:
            load(path, **_given(limits))
        assert reason in str(caught.value) and "\n" not in str(caught.value)


def _wfdb(folder: Path, fs: float = 500.0) -> Path:
    import wfdb

    wfdb.wrsamp("rec", fs=fs, units=["mV"] * 12, sig_name=list(STANDARD_LEADS),
                p_signal=synthetic_12lead(1000, 500.0).T, fmt=["16"] * 12, write_dir=str(folder))
    return folder / "rec.hea"


@pytest.mark.filterwarnings("ignore:The inplace keyword")
@pytest.mark.parametrize("target_exists", [True, False])
def test_a_wfdb_signal_file_linked_out_of_the_root_is_refused(tmp_path: Path, target_exists: bool) -> None:
    """The header is inside the root, its .dat a symlink out of it (WFDB's own syntax forbids '/')."""
    from common.climb.limits import Bounds, outside_root_message

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    header = _wfdb(root)
    if target_exists:
        (root / "rec.dat").rename(outside / "rec.dat")
    else:
        (root / "rec.dat").unlink()
    (root / "rec.dat").symlink_to(outside / "rec.dat")
    with pytest.raises(MediaError) as caught:
        load_ecg(header, bounds=Bounds().within([root]))
    assert str(caught.value) == outside_root_message(str(root / "rec.dat"), "WFDB signal file")


@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_a_wfdb_header_with_a_tiny_sampling_rate_is_refused_before_reading(tmp_path: Path) -> None:
    header = _wfdb(tmp_path)
    text = header.read_text().splitlines()
    first = text[0].split()
    first[2] = "0.01"
    header.write_text("\n".join([" ".join(first), *text[1:]]) + "\n")
    with pytest.raises(MediaError, match="data.max_ecg_samples"):
        load_ecg(header)
