"""Frame sampling from DICOM series, multi-frame DICOM and NIfTI volumes."""

from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from common.climb.dicom import dicom_frames
from common.climb.errors import MediaError
from common.climb.volumes import load_frames, series_sort_key, slice_distance
from common.climb.windowing import minmax_to_uint8, window_linear

SLICES = 6
FILE_ORDER = [3, 0, 5, 1, 4, 2]  # file name index of slice k; name order != slice order
WINDOW = (250.0, 500.0)


def write_series(directory: Path, *, with_instance_numbers: bool) -> None:
    """Six MR_small copies whose slice k is filled with 100 * k, saved under shuffled names."""
    directory.mkdir()
    for k in range(SLICES):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.PixelData = np.full((ds.Rows, ds.Columns), 100 * k, dtype="<i2").tobytes()
        ds.SOPInstanceUID = generate_uid()
        if with_instance_numbers:
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        else:
            del ds.InstanceNumber
            # Axial orientation: the normal is +z; slice k sits at z = 10 k - 25.
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-83.9, -91.2, 10.0 * k - 25.0]
        ds.save_as(directory / f"img_{FILE_ORDER[k]}.dcm")
    (directory / "README.txt").write_text("not an image")


def slice_values(frames: list[Image.Image]) -> list[int]:
    """The single grey value of each (constant) frame."""
    values = []
    for frame in frames:
        pixels = np.asarray(frame)
        assert pixels.min() == pixels.max()
        values.append(int(pixels[0, 0, 0]))
    return values


def expected_values(slices: list[int]) -> list[int]:
    return [int(window_linear(np.array([100.0 * k]), *WINDOW)[0]) for k in slices]


@pytest.mark.parametrize("with_instance_numbers", [True, False])
def test_series_sorted_and_sampled(tmp_path: Path, with_instance_numbers: bool) -> None:
    series = tmp_path / "series"
    write_series(series, with_instance_numbers=with_instance_numbers)
    frames = load_frames(series, 4, window=WINDOW)
    assert [f.size for f in frames] == [(64, 64)] * 4 and all(f.mode == "RGB" for f in frames)
    # uniform_indices(6, 4) == [0, 2, 3, 5]
    assert slice_values(frames) == expected_values([0, 2, 3, 5])
    assert slice_values(load_frames(series, 10, window=WINDOW)) == expected_values(list(range(SLICES)))


def test_series_mixing_two_series_is_refused(tmp_path: Path) -> None:
    series = tmp_path / "series"
    write_series(series, with_instance_numbers=True)
    ds = pydicom.dcmread(series / "img_0.dcm")
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(series / "img_0.dcm")
    with pytest.raises(MediaError, match="mixes 2 DICOM series"):
        load_frames(series)


def test_empty_series_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MediaError, match="no DICOM image files"):
        load_frames(tmp_path)


def test_sort_key_order_and_slice_distance() -> None:
    keys = [
        series_sort_key(None, None, None, "a"),
        series_sort_key(2, [0, 0, 5], None, "b"),
        series_sort_key(2, [0, 0, -5], None, "c"),
        series_sort_key(1, None, None, "z"),
    ]
    assert [k[2] for k in sorted(keys)] == ["z", "c", "b", "a"]
    # Sagittal: rows along y, columns along -z, so the normal is y x (-z) = -x.
    assert slice_distance([7.0, 1.0, 2.0], [0, 1, 0, 0, 0, -1]) == pytest.approx(-7.0)
    assert slice_distance([1.0, 2.0, 3.0], None) == 3.0


def test_multiframe_dicom_is_sampled_uniformly() -> None:
    path = get_testdata_file("examples_ybr_color.dcm")
    frames = load_frames(path)
    expected = dicom_frames(path, [0, 10, 19, 29])
    assert len(frames) == 4
    assert all(np.array_equal(np.asarray(f), e) for f, e in zip(frames, expected))
    single = load_frames(get_testdata_file("CT_small.dcm"))
    assert len(single) == 1 and single[0].size == (128, 128)


def nifti_volume() -> np.ndarray:
    """(x=8, y=6, z=10) with slice k equal to 10 k and one marker voxel at the anterior left of slice 0."""
    volume = np.zeros((8, 6, 10), dtype=np.float32)
    volume += 10.0 * np.arange(10, dtype=np.float32)
    volume[0, 5, 0] = 90.0
    return volume


@pytest.mark.parametrize("name", ["volume.nii", "volume.nii.gz"])
def test_nifti_slices_along_last_axis(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    nibabel.save(nibabel.Nifti1Image(nifti_volume(), np.eye(4)), path)
    frames = load_frames(path, 4)
    assert [f.size for f in frames] == [(8, 6)] * 4  # (width = x, height = y)
    first = np.asarray(frames[0])[..., 0]
    assert first[0, 0] == 255 and first.sum() == 255  # anterior-left marker lands top-left
    means = [int(np.asarray(f)[-1, -1, 0]) for f in frames]
    assert means == minmax_to_uint8(np.array([0.0, 30.0, 60.0, 90.0]), 0.0, 90.0).tolist()


def test_nifti_reoriented_and_windowed(tmp_path: Path) -> None:
    flipped = tmp_path / "flipped.nii.gz"
    nibabel.save(nibabel.Nifti1Image(nifti_volume(), np.diag([1.0, 1.0, -1.0, 1.0])), flipped)
    corners = [int(np.asarray(f)[-1, -1, 0]) for f in load_frames(flipped, 4)]
    assert corners == [255, 170, 85, 0]  # inferior to superior after reorientation
    windowed = load_frames(tmp_path / "flipped.nii.gz", 4, window=(45.0, 20.0))
    assert [int(np.asarray(f)[-1, -1, 0]) for f in windowed] == [255, 255, 0, 0]


def test_nifti_4d_uses_first_volume(tmp_path: Path) -> None:
    path = tmp_path / "series4d.nii"
    volume = np.stack([nifti_volume(), np.zeros((8, 6, 10), np.float32)], axis=-1)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    assert np.asarray(load_frames(path, 1)[0]).max() > 0


def test_bad_sources(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(MediaError, match="broken.nii.gz"):
        load_frames(broken)
    with pytest.raises(MediaError, match="does not exist"):
        load_frames(tmp_path / "absent.nii")
    png = tmp_path / "plain.png"
    Image.new("RGB", (3, 2)).save(png)
    assert [f.size for f in load_frames(png)] == [(3, 2)]


# --------------------------------------------------------------------------- hostile inputs


def _given(limits: dict) -> dict:
    """Loader keywords: lowered limits as ``bounds``, or nothing (the defaults)."""
    if not limits:
        return {}
    from common.climb.limits import Bounds

    return {"bounds": Bounds(**limits)}


def nifti_claiming(path: Path, shape: tuple[int, ...], data_bytes: int = 64) -> Path:
    """A .nii whose header claims ``shape`` (uint8) followed by only ``data_bytes`` bytes."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + bytes(4) + bytes(data_bytes))
    return path


def series_of(directory: Path, count: int) -> Path:
    directory.mkdir(parents=True)
    for k in range(count):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k
        ds.save_as(directory / f"s{k}.dcm")
    return directory


# (what, source to build, limits, words of the reason)
HOSTILE_VOLUMES = [
    ("NIfTI slice of 20000x20000", lambda p: nifti_claiming(p / "v.nii", (20000, 20000, 1)), {}, "data.max_pixels"),
    ("NIfTI of 5000 slices", lambda p: nifti_claiming(p / "v.nii", (4, 4, 5000)), {}, "data.max_frames=2048"),
    ("NIfTI volume past max_file_bytes", lambda p: nifti_claiming(p / "v.nii", (2000, 2000, 1000)), {},
     "data.max_file_bytes"),
    ("NIfTI symlinked to /dev/zero", lambda p: ((p / "v.nii").symlink_to("/dev/zero"), p / "v.nii")[1], {},
     "not a regular file"),
    ("DICOM series of more slices than max_frames", lambda p: series_of(p / "series", 3), {"max_frames": 2},
     "data.max_frames=2"),
]


@pytest.mark.parametrize(("what", "build", "limits", "reason"), HOSTILE_VOLUMES, ids=[h[0] for h in HOSTILE_VOLUMES])
def test_hostile_volumes_are_refused_from_their_headers(tmp_path: Path, what, build, limits, reason) -> None:
    source = build(tmp_path)
    with pytest.raises(MediaError) as caught:
        load_frames(source, 4, **_given(limits))
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_4d_nifti_reads_only_its_first_volume(tmp_path: Path) -> None:
    from common.climb.volumes import load_nifti_volume

    data = np.zeros((4, 5, 3, 2), np.float32)
    data[..., 0] = 1.0
    data[..., 1] = 7.0
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / "v4.nii.gz")
    volume = load_nifti_volume(tmp_path / "v4.nii.gz")
    assert volume.shape == (4, 5, 3) and np.all(volume == 1.0)


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_series_slice_linked_out_of_the_root_is_refused(tmp_path: Path, target_exists: bool) -> None:
    from common.climb.limits import Bounds, outside_root_message

    root = tmp_path / "root"
    series = series_of(root / "series", 2)
    outside = tmp_path / "outside.dcm"
    if target_exists:
        outside.write_bytes((series / "s0.dcm").read_bytes())
    (series / "s9.dcm").symlink_to(outside)
    with pytest.raises(MediaError) as caught:
        load_frames(series, 4, bounds=Bounds().within([root]))
    assert str(caught.value) == outside_root_message(str(series / "s9.dcm"), "DICOM slice")
