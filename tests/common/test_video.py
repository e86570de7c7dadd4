"""Uniform frame sampling from mp4 video."""

import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from common.climb.errors import MediaError
from common.climb.video import video_frames
from common.climb.volumes import load_frames

STEP = 20


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten 64x64 grey frames whose brightness is 20 * index."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = [np.full((64, 64, 3), STEP * i, dtype=np.uint8) for i in range(10)]
    imageio.mimwrite(path, frames, fps=10, format="FFMPEG", codec="libx264", macro_block_size=16)
    return path


def test_mp4_sampled_uniformly(clip: Path) -> None:
    frames = load_frames(clip, 4)
    assert [f.size for f in frames] == [(64, 64)] * 4 and all(f.mode == "RGB" for f in frames)
    brightness = [float(np.asarray(f).mean()) for f in frames]
    # uniform_indices(10, 4) == [0, 3, 6, 9]; lossy coding moves grey levels a little.
    assert brightness == pytest.approx([0, 60, 120, 180], abs=4)


def test_all_frames_when_fewer_than_asked(clip: Path) -> None:
    assert len(video_frames(clip, 25)) == 10


def test_missing_ffmpeg_plugin_names_the_package(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(MediaError, match="imageio-ffmpeg"):
        video_frames(clip)


def test_garbage_video(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    with pytest.raises(MediaError, match="bad.mp4"):
        load_frames(bad)
    with pytest.raises(MediaError, match="does not exist"):
        video_frames(tmp_path / "absent.mp4")


# (what, limits, words of the reason); the clip is 10 frames of 64x64
HOSTILE_VIDEO_LIMITS = [
    ("frames larger than max_pixels", {"max_pixels": 1000}, "64x64 = 4096 pixels is larger than data.max_pixels=1000"),
    ("more frames than max_frames", {"max_frames": 5}, "10 frames/slices, more than data.max_frames=5"),
    ("a file over max_file_bytes", {"max_file_bytes": 100}, "more than data.max_file_bytes=100"),
]


@pytest.mark.parametrize(("what", "limits", "reason"), HOSTILE_VIDEO_LIMITS, ids=[h[0] for h in HOSTILE_VIDEO_LIMITS])
def test_video_over_a_limit_is_refused_before_its_frames_are_kept(clip: Path, what, limits, reason) -> None:
    from common.climb.limits import Bounds

    with pytest.raises(MediaError) as caught:
        load_frames(clip, 4, bounds=Bounds(**limits))
    assert reason in str(caught.value)


def test_video_symlinked_to_dev_zero_is_refused(tmp_path: Path) -> None:
    (tmp_path / "v.mp4").symlink_to("/dev/zero")
    with pytest.raises(MediaError, match="not a regular file"):
        video_frames(tmp_path / "v.mp4")
