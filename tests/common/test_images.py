"""load_image on raster files and DICOM."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

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
