"""Tests for common.wire: adapter tensors through Flower ArrayRecords."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.wire import WireError, check_declared, decode_adapter, encode_adapter

# Names deliberately out of sorted order, to check that order survives.
NAMES = [
    "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight",
    "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight",
]


def make_adapter() -> dict[str, torch.Tensor]:
    """Three fp32 tensors with values in [-4, 4], away from fp16 subnormals."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 2), (2, 5), (6, 2)]
    tensors = {}
    for name, shape in zip(NAMES, shapes, strict=True):
        value = torch.rand(shape, generator=gen) * 3.5 + 0.5  # [0.5, 4)
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        tensors[name] = value * sign
    return tensors


def through_flower(record: ArrayRecord) -> ArrayRecord:
    """Deflate and inflate a record the way Flower's object store moves it."""
    arrays = {}
    for array in record.values():
        chunks = dict(array.slice_array())
        inflated = Array.inflate(array.deflate(), children=chunks)
        arrays[array.object_id] = inflated
    return ArrayRecord.inflate(record.deflate(), children=arrays)


def test_fp32_round_trip_is_exact_and_ordered() -> None:
    """fp32 comes back bit-exact, with the same names in the same order."""
    tensors = make_adapter()
    decoded = decode_adapter(through_flower(encode_adapter(tensors, "fp32")))
    assert list(decoded) == NAMES
    for name in NAMES:
        assert decoded[name].dtype == torch.float32
        assert torch.equal(decoded[name], tensors[name])


def test_fp16_round_trip_within_half_precision() -> None:
    """fp16 rounding to nearest: |error| <= 2**-11 * |x| for normal values."""
    tensors = make_adapter()
    record = encode_adapter(tensors, "fp16")
    for array in record.values():
        assert (array.stype, array.dtype) == ("numpy.ndarray", "float16")
    decoded = decode_adapter(through_flower(record))
    assert list(decoded) == NAMES
    for name in NAMES:
        assert decoded[name].dtype == torch.float16
        error = (decoded[name].float() - tensors[name]).abs()
        assert bool((error <= tensors[name].abs() * 2.0**-11).all())


def test_bf16_round_trip_within_bfloat16_precision() -> None:
    """bf16 (8 significant bits): |error| <= 2**-8 * |x|, bit-equal to a bf16 cast."""
    tensors = make_adapter()
    record = encode_adapter(tensors, "bf16")
    decoded = decode_adapter(through_flower(record))
    assert list(decoded) == NAMES
    for name in NAMES:
        assert decoded[name].dtype == torch.bfloat16
        assert tuple(decoded[name].shape) == tuple(tensors[name].shape)
        assert torch.equal(decoded[name], tensors[name].to(torch.bfloat16))
        error = (decoded[name].float() - tensors[name]).abs()
        assert bool((error <= tensors[name].abs() * 2.0**-8).all())


def test_bf16_array_is_raw_little_endian() -> None:
    """bf16(1.0) = 0x3F80 and bf16(-2.0) = 0xC000, low byte first."""
    record = encode_adapter({"w": torch.tensor([[1.0, -2.0]])}, "bf16")
    array = record["w"]
    assert (array.stype, array.dtype, array.shape) == ("raw", "bfloat16", (1, 2))
    assert array.data == b"\x80\x3f\x00\xc0"


def test_encode_and_decode_never_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pickle call happens; NumPy payloads are plain .npy files."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was used")

    for attr in ("dumps", "dump", "loads", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, attr, forbidden)
    tensors = make_adapter()
    for precision in ("fp32", "fp16", "bf16"):
        record = encode_adapter(tensors, precision)
        decode_adapter(record)
        if precision != "bf16":
            assert all(a.data.startswith(b"\x93NUMPY") for a in record.values())


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (Array(np.zeros((2, 2), dtype=np.float64)), "'float64'"),
        (Array(np.zeros((2, 2), dtype=np.int32)), "'int32'"),
        (Array(dtype="float8_e4m3", shape=(2,), stype="raw", data=b"\0\0"), "'float8"),
        (Array(dtype="bfloat16", shape=(1,), stype="pickle", data=b"\0\0"), "'pickle'"),
    ],
)
def test_unknown_dtype_or_stype_raises(array: Array, fragment: str) -> None:
    """The error names the array and the unsupported dtype or stype."""
    record = ArrayRecord({"bad.lora_B.weight": array})
    with pytest.raises(WireError, match=f"'bad.lora_B.weight'.*{fragment}"):
        decode_adapter(record)


def test_bf16_payload_of_wrong_length_raises() -> None:
    """Declared shape (3,) needs 6 bytes."""
    array = Array(dtype="bfloat16", shape=(3,), stype="raw", data=b"\x80\x3f\x80\x3f")
    with pytest.raises(WireError, match="holds 4 bytes, expected 6"):
        decode_adapter(ArrayRecord({"w": array}))


def test_numpy_payload_disagreeing_with_declaration_raises() -> None:
    """A record whose declared shape lies about its payload is refused."""
    good = Array(np.zeros((2, 3), dtype=np.float32))
    lying = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=good.data)
    with pytest.raises(WireError, match="declares float32 \\(3, 2\\)"):
        decode_adapter(ArrayRecord({"w": lying}))


def test_encode_rejects_integer_tensor_and_unknown_precision() -> None:
    """Only floating tensors and the three precisions are accepted."""
    with pytest.raises(TypeError, match="'steps'"):
        encode_adapter({"steps": torch.tensor([1, 2])})
    with pytest.raises(ValueError, match="'fp8'"):
        encode_adapter(make_adapter(), "fp8")  # type: ignore[arg-type]


def test_encode_detaches_trainable_tensors() -> None:
    """Parameters that require grad are encoded without error."""
    weight = torch.nn.Parameter(torch.ones(2, 2))
    for precision in ("fp32", "fp16", "bf16"):
        decoded = decode_adapter(encode_adapter({"w": weight}, precision))
        assert torch.equal(decoded["w"].float(), torch.ones(2, 2))


# ---------------------------------------------------------------- check_declared

A_NAME, B_NAME = NAMES[1], NAMES[2]
EXPECTED = {NAMES[0]: (6, 2), A_NAME: (2, 5), B_NAME: (6, 2)}
HUGE = 500_000_000  # bytes a hostile record claims to carry


class _HugePayload(bytes):
    """A payload that reports 500 MB without allocating it."""

    def __len__(self) -> int:
        return HUGE


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any payload is decoded."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a payload was decoded")

    monkeypatch.setattr(np, "load", forbidden)
    monkeypatch.setattr(np, "frombuffer", forbidden)


def test_check_declared_accepts_each_precision_and_ffa_exact_names(no_decoding: None) -> None:
    """The server's own records pass; in ffa lora_A travels in fp32 whatever the precision."""
    for precision in ("fp32", "fp16", "bf16"):
        check_declared(encode_adapter(make_adapter(), precision), EXPECTED, precision)
        check_declared(encode_adapter(make_adapter(), precision, exact=[A_NAME]), EXPECTED, precision, exact=[A_NAME])


def _replace(name: str, array: Array, precision: str = "fp32") -> ArrayRecord:
    record = encode_adapter(make_adapter(), precision)  # type: ignore[arg-type]
    record[name] = array
    return record


@pytest.mark.parametrize(
    ("make_record", "precision", "fragment"),
    [
        (lambda: encode_adapter(make_adapter(), "fp32"), "fp8", "unknown wire precision 'fp8'"),
        # an extra tensor declaring 500 MB: refused by its size before any name is looked at
        (lambda: _replace("extra", Array(dtype="float32", shape=(HUGE // 4,), stype="numpy.ndarray",
                                         data=_HugePayload(b""))), "fp32", "holds 50000.* bytes"),
        # an expected name whose payload claims 500 MB
        (lambda: _replace(B_NAME, Array(dtype="float32", shape=(6, 2), stype="numpy.ndarray",
                                        data=_HugePayload(b""))), "fp32", "holds 50000.* bytes"),
        (lambda: _replace("extra", Array(np.zeros(2, np.float32))), "fp32", "1 unexpected \\['extra'\\]"),
        (lambda: ArrayRecord({k: v for k, v in encode_adapter(make_adapter()).items() if k != B_NAME}),
         "fp32", "1 missing"),
        (lambda: _replace(B_NAME, Array(np.zeros((2, 6), np.float32))), "fp32", "declares shape \\(2, 6\\)"),
        (lambda: _replace(B_NAME, Array(np.zeros((6, 2), np.float16))), "fp32", "'float16'.*expected"),
        (lambda: encode_adapter(make_adapter(), "fp16"), "fp32", "'float16'.*expected"),
        (lambda: encode_adapter(make_adapter(), "fp32", exact=[A_NAME]), "bf16", "'float32'.*expected"),
        (lambda: _replace(B_NAME, Array(dtype="float32", shape=(6, 2), stype="numpy.ndarray",
                                        data=Array(np.zeros((6, 3), np.float32)).data)), "fp32", "header says"),
        (lambda: _replace(B_NAME, Array(dtype="bfloat16", shape=(6, 2), stype="raw", data=b"\0" * 26), "bf16"),
         "bf16", "holds 26 bytes, expected 24"),
        (lambda: _replace(B_NAME, Array(dtype="float32", shape=(6, 2), stype="numpy.ndarray", data=b"\0" * 60)),
         "fp32", "no readable .npy header"),
    ],
    ids=["unknown-precision", "extra-500MB", "expected-name-500MB", "extra-name", "missing", "shape",
         "dtype", "precision-mismatch", "exact-at-bf16", "npy-header-lies", "raw-length", "not-npy"],
)
def test_check_declared_refuses_without_decoding(make_record, precision: str, fragment: str,
                                                 no_decoding: None) -> None:
    """Every bad record is refused from its declarations alone (decoding would fail the test)."""
    record = make_record()
    with pytest.raises(WireError, match=fragment):
        check_declared(record, EXPECTED, precision)


def test_malformed_declared_shape_is_a_wire_error() -> None:
    """A shape of non-integers (possible after a hostile inflate) is refused, not a crash."""
    array = Array(np.zeros((6, 2), np.float32))
    array.shape = ("6", 2.0)  # type: ignore[assignment]
    record = _replace(B_NAME, array)
    with pytest.raises(WireError, match="malformed shape"):
        check_declared(record, EXPECTED, "fp32")
    with pytest.raises(WireError, match="malformed shape"):
        decode_adapter(record)


def test_decode_refuses_a_lying_payload_length_before_loading_it(no_decoding: None) -> None:
    """decode_adapter (the server's path too) checks byte lengths before np.load."""
    lying = Array(dtype="float32", shape=(6, 2), stype="numpy.ndarray", data=_HugePayload(b""))
    with pytest.raises(WireError, match="no readable .npy header|holds 500000000 bytes"):
        decode_adapter(ArrayRecord({"w": lying}))
