"""Re-send a reply already computed and paid for, instead of charging the privacy budget again.

When the SuperLink dies mid-round and the coordinator resumes, it asks again for the
round it lost, with the same global adapter and the same instruction. Re-sending the
reply this hospital already computed (and charged to its ledger) releases nothing new,
so it costs no privacy; running the mechanism on the data again would cost it again.

A reply is keyed by :func:`reply_key`: the kind (train or evaluate), the instruction's
values, the received global adapter's tensors (names, dtypes, shapes, values) and the
effective configuration of the round (the hospital's own settings included). Nothing
run-specific (run id, node id, message id) goes in, so a resumed run finds it.

Replies live in ``<state_dir>/replies/<key>/`` (``reply.json`` + ``arrays.bin``, written
to a temporary folder and renamed into place); the newest :data:`KEEP` are kept. While a
process computes a key it holds ``<key>.lock`` (``flock``): a second process asking for
the same key (the redo arriving while the first ClientApp still trains) waits for it,
then re-sends its reply.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from common.config import FedClimbConfig, to_yaml
from common.files import fsync_path

__all__ = ["CACHE_DIR", "KEEP", "ReplySlot", "reply_key", "reserved"]

CACHE_DIR = "replies"
#: Replies kept (the last few rounds: a resume only ever asks again for the latest).
KEEP = 4
_META = "reply.json"
_DATA = "arrays.bin"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def reply_key(kind: str, values: Mapping[str, Any], adapter: Mapping[str, torch.Tensor],
              cfg: FedClimbConfig) -> str:
    """The hex digest that names one reply (see the module docstring)."""
    h = hashlib.sha256()
    h.update(kind.encode() + b"\0")
    h.update(json.dumps(dict(values), sort_keys=True, default=repr).encode() + b"\0")
    h.update(to_yaml(cfg).encode() + b"\0")
    for name in sorted(adapter):
        t = adapter[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _encode(content: RecordDict) -> tuple[dict[str, Any], bytes]:
    meta: dict[str, Any] = {"metrics": {}, "arrays": {}}
    data = bytearray()
    for rname, record in content.metric_records.items():
        meta["metrics"][rname] = dict(record)
    for rname, record in content.array_records.items():
        arrays = []
        for name, arr in record.items():
            arrays.append({"name": name, "dtype": arr.dtype, "shape": list(arr.shape), "stype": arr.stype,
                           "offset": len(data), "length": len(arr.data)})
            data += arr.data
        meta["arrays"][rname] = arrays
    return meta, bytes(data)


def _decode(meta: Mapping[str, Any], data: bytes) -> RecordDict:
    content = RecordDict()
    for rname, values in meta["metrics"].items():
        content[rname] = MetricRecord(values)
    for rname, arrays in meta["arrays"].items():
        content[rname] = ArrayRecord({
            a["name"]: Array(dtype=a["dtype"], shape=tuple(a["shape"]), stype=a["stype"],
                             data=data[a["offset"]:a["offset"] + a["length"]])
            for a in arrays
        })
    return content


class ReplySlot:
    """The cached reply of one key, read and written while its lock is held."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        self.key = key
        self.path = folder / key

    def load(self) -> RecordDict | None:
        """The stored reply, or None (none stored, or unreadable: computed again)."""
        try:
            meta = json.loads((self.path / _META).read_text(encoding="utf-8"))
            data = (self.path / _DATA).read_bytes()
            return _decode(meta, data)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, content: RecordDict) -> None:
        """Write ``content`` whole (temporary folder, then rename), then drop old replies."""
        meta, data = _encode(content)
        tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{self.key[:16]}."))
        try:
            (tmp / _DATA).write_bytes(data)
            (tmp / _META).write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
            for name in (_DATA, _META):
                fsync_path(tmp / name)
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
            fsync_path(self.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(self.folder, keep=self.key)


def _prune(folder: Path, keep: str) -> None:
    entries = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        if old.name == keep:
            continue
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            (folder / f"{old.name}.lock").unlink()


@contextlib.contextmanager
def reserved(state_dir: Path, key: str) -> Iterator[ReplySlot]:
    """Hold ``key``'s lock (waiting while another process computes it) and yield its slot."""
    folder = Path(state_dir) / CACHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield ReplySlot(folder, key)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

