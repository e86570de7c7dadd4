"""DICOM display pipeline on pydicom's bundled real files and hand-built datasets."""

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from common.climb.dicom import (
    _display_frame,
    dicom_frames,
    frame_count,
    is_dicom_file,
    missing_decoder_message,
    modality_values,
    read_dicom,
    voi_to_uint8,
)
from common.climb.errors import MediaError
from common.climb.windowing import window_linear

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent


def tiny_dataset(pixels: np.ndarray, **elements: object) -> Dataset:
    """An uncompressed MONOCHROME2 int16 dataset holding ``pixels``."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def test_modality_lut_slope_two_intercept_minus_1024(tmp_path: Path) -> None:
    stored = np.array([[0, 512], [1000, 1100]], dtype=np.int16)
    ds = tiny_dataset(stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    assert modality_values(stored, ds).tolist() == [[-1024.0, 0.0], [976.0, 1176.0]]
    path = tmp_path / "tiny.dcm"
    ds.save_as(path, enforce_file_format=True)
    (frame,) = dicom_frames(path)
    # HU -1024 and 0 lie in / below the window [-160, 239]: 0 -> ((0 - 39.5) / 399 + 0.5) * 255 = 102.26 -> 102.
    assert frame.dtype == np.uint8
    assert frame.tolist() == [[0, 102], [255, 255]]


def test_first_window_value_is_used_and_override_wins() -> None:
    stored = np.array([[0, 100], [200, 300]], dtype=np.int16)
    ds = tiny_dataset(stored, WindowCenter=[150, 0], WindowWidth=[301, 10])
    values = modality_values(stored, ds)
    assert np.array_equal(voi_to_uint8(values, ds), window_linear(values, 150, 301))
    assert np.array_equal(voi_to_uint8(values, ds, (100, 50)), window_linear(values, 100, 50))


def test_no_window_means_min_max_of_the_frame() -> None:
    stored = np.array([[-20, 0], [30, 80]], dtype=np.int16)
    ds = tiny_dataset(stored)
    assert voi_to_uint8(modality_values(stored, ds), ds).tolist() == [[0, 51], [128, 255]]


def test_voi_lut_sequence_when_no_window() -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.int16)
    ds = tiny_dataset(stored)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]  # 4 entries, first input value 0, 8-bit output
    item.LUTData = [0, 100, 200, 255]
    ds.VOILUTSequence = [item]
    assert voi_to_uint8(modality_values(stored, ds), ds).tolist() == [[0, 100], [200, 255]]


def test_ct_small_real_slice_is_min_max_scaled_and_not_constant() -> None:
    path = get_testdata_file("CT_small.dcm")
    (frame,) = dicom_frames(path)
    assert frame.shape == (128, 128) and frame.dtype == np.uint8
    assert frame.min() == 0 and frame.max() == 255  # no window in the file: min-max
    assert len(np.unique(frame)) > 50


def test_ct_small_window_applies_to_hounsfield_units(tmp_path: Path) -> None:
    """A soft-tissue window (40/400 HU) only fits if the intercept of -1024 was applied first."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    ds.WindowCenter, ds.WindowWidth = 40, 400
    windowed = tmp_path / "ct_windowed.dcm"
    ds.save_as(windowed)
    (frame,) = dicom_frames(windowed)
    hounsfield = ds.pixel_array.astype(np.float64) - 1024.0
    assert np.array_equal(frame, window_linear(hounsfield, 40, 400))
    raw = window_linear(ds.pixel_array.astype(np.float64), 40, 400)
    assert not np.array_equal(frame, raw)  # the window on stored values gives another image


def test_mr_small_uses_its_window() -> None:
    path = get_testdata_file("MR_small.dcm")
    (frame,) = dicom_frames(path)
    ds = pydicom.dcmread(path)
    assert np.array_equal(frame, window_linear(ds.pixel_array.astype(float), 600, 1600))


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(source)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted_path = tmp_path / "mono1.dcm"
    ds.save_as(inverted_path)
    (original,) = dicom_frames(source)
    (inverted,) = dicom_frames(inverted_path)
    assert np.array_equal(inverted, 255 - original)


def test_rgb_ultrasound() -> None:
    path = get_testdata_file("examples_rgb_color.dcm")
    (frame,) = dicom_frames(path)
    assert frame.shape == (240, 320, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, pydicom.dcmread(path).pixel_array)


def test_ybr_multiframe_ultrasound_gives_30_rgb_frames() -> None:
    path = get_testdata_file("examples_ybr_color.dcm")
    frames = dicom_frames(path)
    assert len(frames) == 30
    assert all(f.shape == (240, 320, 3) and f.dtype == np.uint8 for f in frames)
    # pydicom 3 already converts YBR_FULL_422 to RGB while decoding; both agree.
    assert np.array_equal(frames[7], pydicom.dcmread(path).pixel_array[7])


def test_ybr_is_converted_when_the_decoder_did_not() -> None:
    ds = pydicom.dcmread(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    rgb = ds.pixel_array  # pydicom's own conversion
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    frame = _display_frame(ybr, ds, "YBR_FULL_422", None, "test")
    assert np.abs(frame.astype(int) - rgb.astype(int)).max() <= 2
    assert np.array_equal(_display_frame(rgb, ds, "RGB", None, "test"), rgb)


def test_palette_colour() -> None:
    path = get_testdata_file("examples_palette.dcm")
    (frame,) = dicom_frames(path)
    assert frame.shape == (350, 800, 3) and frame.dtype == np.uint8
    ds = pydicom.dcmread(path)
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)  # 16-bit LUT entries
    assert np.array_equal(frame, expected)
    assert frame.max() > 200


def test_nm_jpeg2000_decodes_with_pillow() -> None:
    (frame,) = dicom_frames(get_testdata_file("JPEG2000.dcm"))
    assert frame.shape == (1024, 256) and len(np.unique(frame)) > 10


def test_seg_mask() -> None:
    (frame,) = dicom_frames(get_testdata_file("liver_1frame.dcm"))
    assert frame.shape == (512, 512)
    assert set(np.unique(frame).tolist()) == {0, 255}


def test_cr_from_dicomdir_tests() -> None:
    path = TEST_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"
    assert is_dicom_file(path)
    (frame,) = dicom_frames(path)
    assert frame.dtype == np.uint8 and frame.ndim == 2 and frame.max() > frame.min()


def test_chosen_frames_only() -> None:
    path = get_testdata_file("examples_ybr_color.dcm")
    ds = read_dicom(path)
    assert frame_count(ds) == 30
    picked = dicom_frames(path, [0, 29])
    assert len(picked) == 2
    with pytest.raises(MediaError, match="outside 0..29"):
        dicom_frames(path, [30])


def test_jpeg_ls_without_decoder_names_syntax_and_packages() -> None:
    with pytest.raises(MediaError) as caught:
        dicom_frames(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    message = str(caught.value)
    assert "JPEG-LS" in message and "1.2.840.10008.1.2.4.80" in message
    assert "pylibjpeg" in message and "python-gdcm" in message
    assert "\n" not in message


def test_missing_decoder_message_maps_pip_names() -> None:
    uid = pydicom.uid.JPEG2000Lossless
    lines = ["gdcm - requires gdcm>=3.0.10", "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]
    message = missing_decoder_message(uid, lines, "x.dcm")
    assert "JPEG 2000 Image Compression (Lossless Only)" in message
    assert "'python-gdcm>=3.0.10' or 'pylibjpeg>=2.0 pylibjpeg-openjpeg>=2.0'" in message


@pytest.mark.parametrize("content", [b"", b"not a dicom file at all" * 20, bytes(range(256)) * 4])
def test_garbage_is_media_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(content)
    with pytest.raises(MediaError, match="garbage.dcm"):
        dicom_frames(path)


def test_truncated_files_are_media_errors(tmp_path: Path) -> None:
    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    # The file ends with 138 bytes of Data Set Trailing Padding after the pixels.
    for size in (200, 1000, len(raw) // 2, len(raw) - 200):
        path = tmp_path / f"cut{size}.dcm"
        path.write_bytes(raw[:size])
        with pytest.raises(MediaError):
            dicom_frames(path)
    with pytest.raises(MediaError, match="could not be decoded"):
        dicom_frames(get_testdata_file("MR_truncated.dcm"))


def test_no_pixel_data_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="no Pixel Data"):
        dicom_frames(get_testdata_file("waveform_ecg.dcm"))
    with pytest.raises(MediaError, match="does not exist"):
        dicom_frames(tmp_path / "absent.dcm")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the deliberately broken files
def test_every_bundled_file_either_decodes_or_raises_media_error() -> None:
    """No other exception type escapes, whatever pydicom's test corpus throws at it."""
    for path in sorted(TEST_FILES.glob("*.dcm")):
        if os.path.getsize(path) > 400_000:
            continue
        try:
            frames = dicom_frames(path, [0])
        except MediaError as exc:
            assert "\n" not in str(exc)
        else:
            assert frames[0].dtype == np.uint8


# --------------------------------------------------------------------------- hostile inputs


def _given(limits: dict) -> dict:
    """Loader keywords: lowered limits as ``bounds``, or nothing (the defaults)."""
    if not limits:
        return {}
    from common.climb.limits import Bounds

    return {"bounds": Bounds(**limits)}


def _claiming(path: Path, *, deflated: bool, pixel_bytes: int = 200, **header: object) -> Path:
    """A DICOM whose header claims ``header`` (Rows, Columns, NumberOfFrames) over ``pixel_bytes`` of zeros."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = tiny_dataset(np.zeros((2, 2), np.int16))
    ds.PixelData = bytes(pixel_bytes)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    if deflated:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


# (what, file, limits, words of the reason)
HOSTILE_DICOM = [
    ("deflated, header claims 16000x16000",
     lambda p: _claiming(p, deflated=True, Rows=16000, Columns=16000), {}, "data.max_pixels=50000000"),
    ("uncompressed, header claims 16000x16000",
     lambda p: _claiming(p, deflated=False, Rows=16000, Columns=16000), {}, "data.max_pixels=50000000"),
    ("header claims 100000 frames",
     lambda p: _claiming(p, deflated=False, NumberOfFrames=100000), {}, "data.max_frames=2048"),
    ("frames x pixels beyond max_file_bytes",
     lambda p: _claiming(p, deflated=False, Rows=4000, Columns=4000, NumberOfFrames=2000), {},
     "data.max_file_bytes"),
    ("deflated data inflating past max_file_bytes",
     lambda p: _claiming(p, deflated=True, pixel_bytes=5_000_000), {"max_file_bytes": 1_000_000},
     "more than data.max_file_bytes=1000000"),
    ("a symlink to /dev/zero", lambda p: (p.symlink_to("/dev/zero"), p)[1], {}, "not a regular file"),
]


@pytest.mark.parametrize(("what", "build", "limits", "reason"), HOSTILE_DICOM, ids=[h[0] for h in HOSTILE_DICOM])
def test_hostile_dicom_is_refused_from_its_header(tmp_path: Path, what, build, limits, reason) -> None:
    """The declared size is checked before pixel data is inflated or decoded (also through load_image)."""
    from common.climb.images import load_image

    path = build(tmp_path / "x.dcm")
    given = _given(limits)
    for load in (lambda: dicom_frames(path, [0], **given), lambda: load_image(path, **given)):
        with pytest.raises(MediaError) as caught:
            load()
        assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_deflated_dicom_within_the_limits_still_decodes(tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stored = np.arange(12, dtype=np.int16).reshape(3, 4)
    ds = tiny_dataset(stored)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "d.dcm", enforce_file_format=True)
    (frame,) = dicom_frames(tmp_path / "d.dcm")
    assert frame.shape == (3, 4) and frame[0, 0] == 0 and frame[2, 3] == 255
    assert "Rows" in read_dicom(tmp_path / "d.dcm", stop_before_pixels=True)
