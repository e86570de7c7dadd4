"""Adapter tensors over Flower: encode to and decode from an ``ArrayRecord``.

Flower serialises a tensor through NumPy (``stype`` ``"numpy.ndarray"``, written with
``np.save(..., allow_pickle=False)``). NumPy has no bfloat16, so ``flwr.app.Array``
rejects a bfloat16 tensor; this module sends bfloat16 as its raw little-endian 16-bit
payload instead (``stype`` ``"raw"``, ``dtype`` ``"bfloat16"``) and reads it back
bit-exactly. fp32 and fp16 use Flower's ordinary NumPy path. Nothing is pickled.

Tensor names and their order survive the round trip. Decoded tensors keep the wire
dtype; the caller upcasts (e.g. to the global adapter's dtype) where it needs to.
Decoding is a trust boundary on both sides, so every array's declared dtype, shape
and byte length are checked against its payload, and the byte length (and the .npy
header) before anything is decoded. :func:`check_declared` goes further for a
receiver that knows which tensors to expect (a hospital receiving the global
adapter): names, shapes, dtypes and sizes are checked from the arrays' declarations
alone, so an oversized or unexpected payload is refused without decoding a byte.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.modeling.lora import is_lora_a

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

#: (stype, dtype) of an array sent at each wire precision.
WIRE_ARRAYS: dict[str, tuple[str, str]] = {
    "fp32": (STYPE_NUMPY, "float32"),
    "fp16": (STYPE_NUMPY, "float16"),
    "bf16": (STYPE_RAW, "bfloat16"),
}

# dtype strings accepted in a record, per serialisation type.
_NUMPY_DTYPES = ("float32", "float16")
_RAW_DTYPES = ("bfloat16",)

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Longest .npy header read (format 1.0: 10 bytes of magic, version and a 16-bit length).
NPY_HEADER_MAX_BYTES = 10 + 0xFFFF


class WireError(ValueError):
    """An ``ArrayRecord`` does not hold a well-formed adapter payload."""


def fp32_names(names: Collection[str], only_b: bool) -> list[str]:
    """The tensors that travel in fp32 whatever the wire precision: in ``ffa`` (only B
    trained) the frozen ``lora_A`` must reach every hospital exactly. One rule for the
    server that sends and the hospital that checks."""
    return [n for n in names if is_lora_a(n)] if only_b else []


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


def check_declared(
    record: ArrayRecord,
    expected: Mapping[str, tuple[int, ...]],
    precision: str,
    *,
    exact: Collection[str] = (),
) -> None:
    """Check an adapter record against the tensors the receiver expects, decoding nothing.

    Only each ``Array``'s declaration (stype, dtype, shape), its payload's length and,
    for NumPy payloads, the .npy header are read, so a record with a huge or unexpected
    tensor is refused at the cost of a few comparisons.

    Parameters
    ----------
    record : ArrayRecord
        The received record (e.g. the global adapter sent by the server).
    expected : Mapping[str, tuple[int, ...]]
        Name to shape of every tensor the record must hold, and no others.
    precision : str
        The wire precision the sender announced; each array must be encoded at it
        (``WIRE_ARRAYS``).
    exact : collection of str
        Names that travel in fp32 whatever the precision (:func:`encode_adapter`).

    Raises
    ------
    WireError
        The first problem: an unknown precision, more bytes than the expected tensors
        can take, missing or unexpected names, a malformed declaration, or a dtype,
        shape or payload length other than expected.
    """
    if precision not in WIRE_ARRAYS:
        raise WireError(f"unknown wire precision {precision!r}; supported are {sorted(WIRE_ARRAYS)}.")
    limit = sum(math.prod(shape) * 4 + NPY_HEADER_MAX_BYTES for shape in expected.values())
    size = sum(_payload_length(name, array) for name, array in record.items())
    if size > limit:
        raise WireError(f"the record holds {size} bytes; the expected tensors take at most {limit}.")
    missing = [n for n in expected if n not in record]
    unexpected = [n for n in record if n not in expected]
    if missing or unexpected:
        raise WireError(
            f"tensor names differ from the expected ones: {len(missing)} missing {missing[:2]}, "
            f"{len(unexpected)} unexpected {unexpected[:2]}."
        )
    for name, shape in expected.items():
        array = record[name]
        want = WIRE_ARRAYS["fp32" if name in exact else precision]
        got = (array.stype, array.dtype)
        if got != want:
            raise WireError(f"array {name!r} is {got}, expected {want} at wire precision {precision}.")
        declared = _declared_shape(name, array)
        if declared != tuple(shape):
            raise WireError(f"array {name!r} declares shape {declared}, expected {tuple(shape)}.")
        _check_payload_length(name, array, declared)


def _payload_length(name: str, array: Array) -> int:
    data = getattr(array, "data", None)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"array {name!r} carries no byte payload.")
    return len(data)


def _check_payload_length(name: str, array: Array, shape: tuple[int, ...]) -> None:
    """Refuse a payload whose length (and .npy header) disagree with its declaration."""
    body = math.prod(shape) * _ITEMSIZE[array.dtype]
    header = 0
    if array.stype == STYPE_NUMPY:
        header = _npy_header_length(name, array, shape)
    if _payload_length(name, array) != header + body:
        raise WireError(
            f"array {name!r} holds {len(array.data)} bytes, expected {header + body} "
            f"for {array.dtype} of shape {shape}."
        )


def _npy_header_length(name: str, array: Array, shape: tuple[int, ...]) -> int:
    """Length of the .npy header of ``array``, after checking it matches the declaration."""
    head = io.BytesIO(bytes(memoryview(array.data)[:NPY_HEADER_MAX_BYTES]))
    try:
        version = np.lib.format.read_magic(head)
        if version != (1, 0):
            raise ValueError(f".npy format {version}, expected (1, 0)")
        npy_shape, _, npy_dtype = np.lib.format.read_array_header_1_0(head, max_header_size=NPY_HEADER_MAX_BYTES)
    except (ValueError, EOFError, SyntaxError) as err:
        raise WireError(f"array {name!r} has no readable .npy header ({err}).") from err
    if str(npy_dtype) != array.dtype or tuple(npy_shape) != shape:
        raise WireError(
            f"array {name!r} declares {array.dtype} {shape} but its .npy header says "
            f"{npy_dtype} {tuple(npy_shape)}."
        )
    return head.tell()


def _bf16_to_array(tensor: torch.Tensor) -> Array:
    """Wrap a contiguous CPU bfloat16 tensor as a raw little-endian ``Array``."""
    words = tensor.view(torch.int16).numpy()  # same bits, reinterpreted
    data = words.astype("<i2", copy=False).tobytes()
    shape = tuple(int(d) for d in tensor.shape)
    return Array(dtype="bfloat16", shape=shape, stype=STYPE_RAW, data=data)


def _array_to_bf16(name: str, array: Array) -> torch.Tensor:
    """Rebuild a bfloat16 tensor from a raw little-endian ``Array``."""
    shape = _declared_shape(name, array)
    _check_payload_length(name, array, shape)
    words = np.frombuffer(array.data, dtype="<i2").astype(np.int16)  # native order copy
    return torch.from_numpy(words).view(torch.bfloat16).reshape(shape)


def _numpy_array_to_tensor(name: str, array: Array) -> torch.Tensor:
    """Load a NumPy-serialised ``Array`` and check it against its declaration."""
    shape = _declared_shape(name, array)
    _check_payload_length(name, array, shape)  # before np.load reads the payload
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
    try:
        shape = tuple(_dimension(d) for d in array.shape)
    except (TypeError, ValueError) as err:
        raise WireError(f"array {name!r} declares a malformed shape {array.shape!r:.80}.") from err
    if any(d < 0 for d in shape):
        raise WireError(f"array {name!r} declares a negative dimension in {shape}.")
    return shape


def _dimension(value: object) -> int:
    """One declared dimension: an int (bools, floats and strings are malformed)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"dimension {value!r:.20} is not an int")
    return value
