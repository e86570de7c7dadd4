"""The hospital's append-only audit log: one JSON line per reply sent, written just before sending.

``<state_dir>/audit.jsonl``; each line holds the time, the message kind (train or
evaluate), the server round and run id, the reply's status, every tensor's name, dtype
and shape, every metric's name and value, the bytes of tensor payload, and whether the
reply was a re-send of one already computed (client/reply_cache.py). Tensor values are
never written here. The file is only ever appended to (``O_APPEND``, one ``write`` per
line, fsync'd); client/app_gate.py appends a line for every app it refused.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from common import keys

__all__ = ["AUDIT_FILE", "STATUS_NAMES", "append_audit", "reply_entry", "reply_bytes"]

AUDIT_FILE = "audit.jsonl"
STATUS_NAMES = {
    keys.STATUS_OK: "ok",
    keys.STATUS_BUDGET_EXHAUSTED: "budget_exhausted",
    keys.STATUS_NO_DATA: "no_data",
    keys.STATUS_ERROR: "error",
    keys.STATUS_REFUSED: "refused",
    keys.STATUS_EVAL_LIMIT: "evaluation_limit",
}


def reply_bytes(content: RecordDict) -> int:
    """Bytes of tensor payload in a reply (what dominates what leaves the hospital)."""
    return sum(record.count_bytes() for record in content.array_records.values())


def _status(content: RecordDict) -> int | None:
    metrics = content.metric_records.get(keys.METRICS)
    if metrics is None or keys.STATUS not in metrics:
        return None
    return int(metrics[keys.STATUS])  # type: ignore[arg-type]


def reply_entry(kind: str, server_round: int | None, run_id: int, content: RecordDict, *,
                resent: bool = False) -> dict[str, Any]:
    """The audit line of one reply (no tensor values)."""
    status = _status(content)
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "round": server_round,
        "run_id": run_id,
        "status": STATUS_NAMES.get(status, str(status)) if status is not None else None,
        "resent": resent,
        "tensors": [{"record": rname, "name": name, "dtype": arr.dtype, "shape": list(arr.shape)}
                    for rname, record in content.array_records.items() for name, arr in record.items()],
        "metrics": {name: value for record in content.metric_records.values() for name, value in record.items()},
        "bytes": reply_bytes(content),
    }


def append_audit(state_dir: str | Path, entry: dict[str, Any]) -> None:
    """Append one line to ``<state_dir>/audit.jsonl`` (created 0600 if missing)."""
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(Path(state_dir) / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
