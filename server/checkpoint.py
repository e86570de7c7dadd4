"""Per-round checkpoints of the global adapter and the strategy (safetensors + JSON only).

Layout::

    RUN_DIR/round-0003/adapter/adapter_config.json       standard PEFT adapter folder
    RUN_DIR/round-0003/adapter/adapter_model.safetensors
    RUN_DIR/round-0003/state.json                        strategy state after round 3
    RUN_DIR/latest -> round-0003                         the last *complete* round
    RUN_DIR/metrics.json                                 metrics history (all rounds)

A round folder is written under a temporary name, its files and folders fsynced, and
renamed into place; ``metrics.json`` is written next, and ``latest`` is swapped last. A
crash (or a power loss) leaves ``latest`` at either the previous or the new round, both
complete, and ``metrics.json`` holding at least every round up to ``latest`` (a resume
drops any round after it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import LoraSettings
from common.files import fsync_path, write_text_atomic
from common.modeling.lora import read_peft_folder, save_peft_folder

__all__ = ["Checkpoint", "save_round", "load_latest", "write_json_atomic", "round_dir"]

_ROUND = re.compile(r"^round-(\d{4,})$")


def round_dir(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / f"round-{server_round:04d}"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON crash-safely (``common.files.write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@dataclass
class Checkpoint:
    server_round: int
    adapter: dict[str, torch.Tensor]
    state: dict[str, Any]


def save_round(
    run_dir: str | Path,
    server_round: int,
    adapter: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    *,
    lora: LoraSettings,
    base_model_name: str,
    metrics_history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write round ``server_round`` and point ``latest`` at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = round_dir(run_dir, server_round)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter_dir = save_peft_folder(tmp / "adapter", adapter, lora, base_model_name=base_model_name)
    for path in (*adapter_dir.iterdir(), adapter_dir):
        fsync_path(path)
    write_json_atomic(tmp / "state.json", {"server_round": server_round, **state})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(run_dir)
    if metrics_history is not None:
        write_json_atomic(run_dir / "metrics.json", metrics_history)
    link_tmp = run_dir / "latest.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, run_dir / "latest")
    fsync_path(run_dir)
    return final


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The last complete round, or None if the run directory has none."""
    run_dir = Path(run_dir)
    latest = run_dir / "latest"
    if not latest.exists():
        rounds = sorted(int(m.group(1)) for p in run_dir.glob("round-*") if (m := _ROUND.match(p.name)))
        if not rounds:
            return None
        latest = round_dir(run_dir, rounds[-1])
    state = json.loads((latest / "state.json").read_text(encoding="utf-8"))
    adapter = read_peft_folder(latest / "adapter")
    return Checkpoint(int(state["server_round"]), adapter, state)
