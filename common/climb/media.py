"""One import point for the media loaders.

- :func:`load_image`: PNG / JPEG / BMP / DICOM (first frame) -> RGB PIL image.
- :func:`load_mask`: a segmentation mask (any raster image) -> boolean HxW array.
- :func:`load_frames`: DICOM series folder, multi-frame DICOM, NIfTI or video ->
  N uniformly sampled RGB PIL images.
- :func:`dicom_frames`: DICOM pixels -> uint8 display arrays (all or chosen frames).
- :func:`load_ecg`: ECG -> QoQ-Med's float32 (8, 2500) model input.
- :func:`load_ecg_12lead`: ECG -> (12, samples) mV and its sampling rate.
- :func:`render_ecg`: 12-lead signals -> a paper-style ECG image.
- :func:`uniform_indices`: which frames to keep.

Every loader takes ``bounds`` (:class:`common.climb.limits.Bounds`: data roots and size
limits, checked from headers before decoding) and raises
:class:`common.climb.errors.MediaError` (one line) for a missing, out-of-root, oversized
or undecodable file.
"""

from common.climb.dicom import dicom_frames
from common.climb.ecg import load_ecg, load_ecg_12lead
from common.climb.ecg_render import render_ecg
from common.climb.images import load_image, load_mask
from common.climb.sampling import DEFAULT_FRAMES, uniform_indices
from common.climb.volumes import load_frames

__all__ = [
    "DEFAULT_FRAMES",
    "dicom_frames",
    "load_ecg",
    "load_ecg_12lead",
    "load_frames",
    "load_image",
    "load_mask",
    "render_ecg",
    "uniform_indices",
]
