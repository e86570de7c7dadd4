"""The Flower run configuration (``[tool.flwr.app.config]``) -> a fedclimb config.

A run names a fedclimb YAML (``config-file``, default configs/base.yaml) and
``overrides`` (the same ``key=value`` words as the command line). Both the ServerApp and
the ClientApp resolve it the same way, so every party agrees on model and hyper-parameters.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.config import FedClimbConfig, config_dir, load_config

__all__ = ["config_from_run_config", "auto_run_dir", "RUN_CONFIG_FILE", "RUN_OVERRIDES", "RUN_SIM_ROOT", "SIM_AUTO"]

RUN_CONFIG_FILE = "config-file"
RUN_OVERRIDES = "overrides"
RUN_SIM_ROOT = "sim-root"
# `flwr run .` on the simulation engine: the ServerApp prepares the embedded synthetic
# federation for however many virtual SuperNodes there are, in auto_run_dir().
SIM_AUTO = "auto"


def auto_run_dir(cache: Path, run_id: int) -> Path:
    """Run directory (checkpoints, hospitals/) of a `flwr run .` simulation."""
    return cache / "flwr-runs" / str(run_id)


def config_from_run_config(run_config: Mapping[str, Any]) -> FedClimbConfig:
    """Resolve the run's configuration (relative paths are relative to the app folder)."""
    raw = str(run_config.get(RUN_CONFIG_FILE, "") or "")
    path: Path | None = None
    if raw:
        path = Path(raw)
        if not path.is_absolute():
            path = config_dir().parent / path
    overrides = shlex.split(str(run_config.get(RUN_OVERRIDES, "") or ""))
    return load_config(path, overrides)
