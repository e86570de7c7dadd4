"""Intensity transforms against hand-computed values."""

import numpy as np
import pytest

from common.climb.windowing import (
    invert_uint8,
    minmax_to_uint8,
    reduce_bit_depth,
    rescale,
    window,
    window_linear,
    window_linear_exact,
    window_sigmoid,
)


def test_rescale_slope_two_intercept_minus_1024() -> None:
    stored = np.array([0, 1, 512, 1024], dtype=np.int16)
    assert rescale(stored, 2.0, -1024.0).tolist() == [-1024.0, -1022.0, 0.0, 1024.0]


def test_window_linear_hand_values() -> None:
    # c = 40, w = 400: lower edge c - 0.5 - 199.5 = -160, upper edge c - 0.5 + 199.5 = 239.
    values = np.array([-1000.0, -160.0, 39.5, 239.0, 239.5, 3000.0])
    # 39.5 -> ((39.5 - 39.5) / 399 + 0.5) * 255 = 127.5 -> 128 (rint rounds half to even: 128).
    assert window_linear(values, 40, 400).tolist() == [0, 0, 128, 255, 255, 255]


def test_window_linear_width_one_is_a_threshold() -> None:
    assert window_linear(np.array([9.0, 9.5, 9.6, 12.0]), 10, 1).tolist() == [0, 0, 255, 255]


def test_linear_exact_and_sigmoid_centre_is_mid_grey() -> None:
    assert window_linear_exact(np.array([100.0, 0.0, 200.0]), 100, 200).tolist() == [128, 0, 255]
    assert window_sigmoid(np.array([100.0]), 100, 200).tolist() == [128]
    assert window_sigmoid(np.array([-1e9, 1e9]), 100, 200).tolist() == [0, 255]


def test_window_dispatch_and_unknown_function() -> None:
    values = np.linspace(-500, 500, 11)
    assert np.array_equal(window(values, 0, 400, "linear"), window_linear(values, 0, 400))
    with pytest.raises(ValueError, match="CUBIC"):
        window(values, 0, 400, "CUBIC")


def test_minmax_constant_and_range() -> None:
    assert minmax_to_uint8(np.array([3.0, 3.0])).tolist() == [0, 0]
    assert minmax_to_uint8(np.array([0.0, 5.0, 10.0])).tolist() == [0, 128, 255]
    assert minmax_to_uint8(np.array([-5.0, 5.0, 20.0]), 0.0, 10.0).tolist() == [0, 128, 255]


def test_invert_and_bit_depth() -> None:
    assert invert_uint8(np.array([0, 1, 255], dtype=np.uint8)).tolist() == [255, 254, 0]
    assert reduce_bit_depth(np.array([0, 0xFF00, 0xFFFF], dtype=np.uint16), 16).tolist() == [0, 255, 255]
    assert reduce_bit_depth(np.array([4095], dtype=np.uint16), 12).tolist() == [255]
    assert reduce_bit_depth(np.array([7, 200], dtype=np.uint8), 8).tolist() == [7, 200]
