"""load_image on raster files and DICOM."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import png_header
from common.climb.dicom import dicom_frames
from common.climb.errors import MediaError
from common.climb.images import array_to_rgb, load_image


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
def test_raster_formats_load_as_rgb(tmp_path: Path, suffix: str) -> None:
    pixels = np.zeros((12, 20, 3), dtype=np.uint8)
    pixels[:, :10] = (200, 30, 30)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 12)
    assert np.abs(np.asarray(image)[6, 2].astype(int) - [200, 30, 30]).max() < 12


def test_grey_alpha_and_16_bit_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (5, 4), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (5, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.fromarray(np.arange(20, dtype=np.uint16).reshape(4, 5) * 1000).save(tmp_path / "deep.png")
    assert np.asarray(load_image(tmp_path / "grey.png"))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [0, 0, 0]
    deep = np.asarray(load_image(tmp_path / "deep.png"))
    assert deep[0, 0, 0] == 0 and deep[-1, -1, 0] == 255


def test_dicom_first_frame_with_or_without_suffix(tmp_path: Path) -> None:
    source = get_testdata_file("examples_ybr_color.dcm")
    image = load_image(source)
    assert image.mode == "RGB" and image.size == (320, 240)
    assert np.array_equal(np.asarray(image), dicom_frames(source, [0])[0])
    bare = tmp_path / "IM0001"
    shutil.copy(get_testdata_file("CT_small.dcm"), bare)
    ct = load_image(bare)
    assert ct.size == (128, 128)
    grey = np.asarray(ct)
    assert np.array_equal(grey[..., 0], grey[..., 2])


def test_undecodable_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(MediaError, match="broken.png"):
        load_image(broken)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(MediaError, match="notes.jpg"):
        load_image(text)
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(MediaError, match="JPEG-LS"):
        load_image(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))


def test_array_to_rgb_checks_input() -> None:
    assert array_to_rgb(np.zeros((3, 4), dtype=np.uint8)).size == (4, 3)
    with pytest.raises(ValueError, match="uint8"):
        array_to_rgb(np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        array_to_rgb(np.zeros((3, 4, 2), dtype=np.uint8))


# --------------------------------------------------------------------------- hostile inputs


def _given(limits: dict) -> dict:
    """Loader keywords: lowered limits as ``bounds``, or nothing (the defaults)."""
    if not limits:
        return {}
    from common.climb.limits import Bounds

    return {"bounds": Bounds(**limits)}


def _small_png(path: Path) -> Path:
    Image.new("L", (100, 100), 9).save(path)
    return path


def _dev_zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


# (what, how to build the file, limits, words the one-line reason must hold)
HOSTILE_IMAGES = [
    ("30000x30000 PNG header (Pillow's bomb error)", lambda p: png_header(p, 30000, 30000), {}, "data.max_pixels"),
    ("12000x12000 PNG header (under Pillow's limit)", lambda p: png_header(p, 12000, 12000), {}, "data.max_pixels=50000000"),
    ("100x100 PNG over a lowered max_pixels", _small_png, {"max_pixels": 5000}, "10000 pixels is larger than data.max_pixels=5000"),
    ("a file over max_file_bytes", _small_png, {"max_file_bytes": 10}, "more than data.max_file_bytes=10"),
    ("a symlink to /dev/zero", _dev_zero, {}, "not a regular file"),
    ("a folder named like an image", _folder, {}, "not a regular file"),
]


@pytest.mark.parametrize("loader", ["image", "mask"])
@pytest.mark.parametrize(("what", "build", "limits", "reason"), HOSTILE_IMAGES, ids=[h[0] for h in HOSTILE_IMAGES])
def test_hostile_images_are_refused_before_decoding(tmp_path: Path, what, build, limits, reason, loader) -> None:
    """Every hostile image is a one-line MediaError naming the limit; nothing is decoded first."""
    path = build(tmp_path / "x.png")
    load = load_image
    if loader == "mask":
        from common.climb.images import load_mask as load
    with pytest.raises(MediaError) as caught:
        load(path, **_given(limits))
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_mask_loads_as_booleans_of_its_size(tmp_path: Path) -> None:
    from common.climb.images import load_mask

    pixels = np.zeros((4, 6), np.uint8)
    pixels[1:3, 2:5] = 255
    Image.fromarray(pixels).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.shape == (4, 6) and mask.sum() == 6


@pytest.mark.parametrize("target_exists", [True, False])
def test_an_image_linked_out_of_the_root_is_refused_alike_whether_or_not_it_exists(tmp_path: Path,
                                                                                 target_exists: bool) -> None:
    from common.climb.limits import Bounds, outside_root_message

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    if target_exists:
        _small_png(outside / "secret.png")
    (root / "x.png").symlink_to(outside / "secret.png")
    with pytest.raises(MediaError) as caught:
        load_image(root / "x.png", bounds=Bounds().within([root]))
    assert str(caught.value) == outside_root_message(str(root / "x.png"), "image file")
