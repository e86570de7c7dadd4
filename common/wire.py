"""Adapter tensors over Flower: encode to and decode from an ``ArrayRecord``.

Flower serialises a tensor through NumPy (``stype`` ``"numpy.ndarray"``, written with
``np.save(..., allow_pickle=False)``). NumPy has no bfloat16, so ``flwr.app.Array``
rejects a bfloat16 tensor; this module sends bfloat16 as its raw little-endian 16-bit
payload instead (``stype`` ``"raw"``, ``dtype`` ``"bfloat16"``) and reads it back
bit-exactly. fp32 and fp16 use Flower's ordinary NumPy path. Nothing is pickled.

Tensor names and their order survive the round trip. Decoded tensors keep the wire
dtype; the caller upcasts (e.g. to the global adapter's dtype) where it needs to.
Decoding is a trust boundary on the server, so every array's declared dtype, shape
and byte length are checked against its payload.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

WirePrecision = Literal["fp32", "fp16", "bf16"]

#: Serialisation type of Flower's own NumPy path (``flwr.common.constant.SType``).
STYPE_NUMPY = "numpy.ndarray"
#: Serialisation type used here for bfloat16: raw little-endian 16-bit words.
STYPE_RAW = "raw"

#: The torch dtype each wire precision sends.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

# dtype strings accepted in a record, per serialisation type.
_NUMPY_DTYPES = ("float32", "float16")
_RAW_DTYPES = ("bfloat16",)
_BF16_BYTES = 2


class WireError(ValueError):
    """An ``ArrayRecord`` does not hold a well-formed adapter payload."""


def encode_adapter(
    tensors: dict[str, torch.Tensor],
    precision: WirePrecision = "fp32",
    *,
    exact: Collection[str] = (),
) -> ArrayRecord:
    """Encode named adapter tensors into a Flower ``ArrayRecord``.

    Parameters
    ----------
    tensors : dict[str, torch.Tensor]
        Floating-point tensors keyed by their PEFT state-dict names, on any device.
        The record keeps the same names in the same order.
    precision : {"fp32", "fp16", "bf16"}
        Wire precision. Each tensor is cast to ``WIRE_DTYPES[precision]`` first
        (round to nearest); fp32 and fp16 travel as NumPy arrays, bf16 as raw
        little-endian 16-bit words.
    exact : collection of str
        Names that always travel in fp32 (e.g. ``ffa``'s frozen lora_A, which every
        party must hold bit for bit).

    Returns
    -------
    ArrayRecord
        One ``Array`` per tensor.

    Raises
    ------
    ValueError
        If ``precision`` is not one of the supported values.
    TypeError
        If a value is not a floating-point ``torch.Tensor``.
    """
    if precision not in WIRE_DTYPES:
        raise ValueError(
            f"`precision` must be one of {sorted(WIRE_DTYPES)}, got {precision!r}."
        )
    wire_dtype = WIRE_DTYPES[precision]
    record = ArrayRecord()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor)
            raise TypeError(
                f"adapter tensor {name!r} must be a floating-point torch.Tensor, "
                f"got {kind}."
            )
        dtype = torch.float32 if name in exact else wire_dtype
        cast = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if cast.dtype == torch.bfloat16:
            record[name] = _bf16_to_array(cast)
        else:
            record[name] = Array(cast.numpy())
    return record


def decode_adapter(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` written by :func:`encode_adapter`.

    Parameters
    ----------
    record : ArrayRecord
        Arrays with ``stype`` ``"numpy.ndarray"`` (dtype float32 or float16) or
        ``"raw"`` (dtype bfloat16).

    Returns
    -------
    dict[str, torch.Tensor]
        CPU tensors in the wire dtype, keyed and ordered as in ``record``.

    Raises
    ------
    WireError
        If an array has an unsupported serialisation type or dtype, or its payload
        does not match its declared dtype and shape.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, array in record.items():
        if array.stype == STYPE_RAW and array.dtype in _RAW_DTYPES:
            tensors[name] = _array_to_bf16(name, array)
        elif array.stype == STYPE_NUMPY and array.dtype in _NUMPY_DTYPES:
            tensors[name] = _numpy_array_to_tensor(name, array)
        else:
            supported = [f"{STYPE_NUMPY}/{d}" for d in _NUMPY_DTYPES] + [
                f"{STYPE_RAW}/{d}" for d in _RAW_DTYPES
            ]
            raise WireError(
                f"array {name!r} has stype {array.stype!r} and dtype {array.dtype!r}; "
                f"supported are {supported}."
            )
    return tensors


def _bf16_to_array(tensor: torch.Tensor) -> Array:
    """Wrap a contiguous CPU bfloat16 tensor as a raw little-endian ``Array``."""
    words = tensor.view(torch.int16).numpy()  # same bits, reinterpreted
    data = words.astype("<i2", copy=False).tobytes()
    shape = tuple(int(d) for d in tensor.shape)
    return Array(dtype="bfloat16", shape=shape, stype=STYPE_RAW, data=data)


def _array_to_bf16(name: str, array: Array) -> torch.Tensor:
    """Rebuild a bfloat16 tensor from a raw little-endian ``Array``."""
    shape = _declared_shape(name, array)
    expected_bytes = math.prod(shape) * _BF16_BYTES
    if len(array.data) != expected_bytes:
        raise WireError(
            f"array {name!r} holds {len(array.data)} bytes, expected {expected_bytes} "
            f"for bfloat16 of shape {shape}."
        )
    words = np.frombuffer(array.data, dtype="<i2").astype(np.int16)  # native order copy
    return torch.from_numpy(words).view(torch.bfloat16).reshape(shape)


def _numpy_array_to_tensor(name: str, array: Array) -> torch.Tensor:
    """Load a NumPy-serialised ``Array`` and check it against its declaration."""
    shape = _declared_shape(name, array)
    try:
        ndarray = array.numpy()  # np.load(..., allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        message = f"array {name!r} is not a readable .npy payload ({err})."
        raise WireError(message) from err
    if not isinstance(ndarray, np.ndarray):  # np.load returns an NpzFile for a zip
        raise WireError(f"array {name!r} is not a single .npy array.")
    if str(ndarray.dtype) != array.dtype or tuple(ndarray.shape) != shape:
        raise WireError(
            f"array {name!r} declares {array.dtype} {shape} but its payload is "
            f"{ndarray.dtype} {tuple(ndarray.shape)}."
        )
    return torch.from_numpy(np.ascontiguousarray(ndarray))


def _declared_shape(name: str, array: Array) -> tuple[int, ...]:
    """Return the declared shape of ``array`` after checking it is non-negative."""
    shape = tuple(int(d) for d in array.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"array {name!r} declares a negative dimension in {shape}.")
    return shape
