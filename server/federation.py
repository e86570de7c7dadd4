"""The round loop: train, aggregate, evaluate, checkpoint — resumable.

Flower's ``Strategy.start`` always starts at round 1 and knows nothing of checkpoints,
so the loop is written out here (same steps, same Grid calls). Each finished round is
checkpointed before the next starts; ``server.resume=true`` continues after the last
complete round with the same adapter, domain statistics and seeds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.config import FedClimbConfig, to_yaml
from common.modeling.loader import base_model_source
from common.modeling.lora import init_adapter, read_peft_folder
from common.modeling.shapes import adapter_shapes_for
from common.wire import encode_adapter, fp32_names
from server.checkpoint import load_latest, save_round
from server.strategy import FedClimbStrategy, RoundLog

log = logging.getLogger(__name__)

__all__ = ["base_for_adapters", "initial_adapter", "run_federation", "wait_for_nodes", "EVENTS_FILE"]

EVENTS_FILE = "events.jsonl"


def initial_adapter(cfg: FedClimbConfig) -> dict[str, torch.Tensor]:
    """A given PEFT folder, or the deterministic seeded init (server and hospitals agree)."""
    if cfg.server.init_adapter:
        return read_peft_folder(cfg.server.init_adapter)
    shapes = adapter_shapes_for(cfg.model, cfg.lora)
    return init_adapter(shapes, seed=cfg.lora.init_seed, b_std=cfg.lora.init_b_std)


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, *, poll_s: float = 1.0) -> list[int]:
    """Block until ``minimum`` hospitals are connected (or the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < minimum and time.monotonic() < deadline:
        time.sleep(poll_s)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < minimum:
        log.warning("only %d of the expected %d hospitals connected within %.0f s; going on", len(nodes), minimum, timeout_s)
    else:
        log.info("%d hospital(s) connected", len(nodes))
    return nodes


def _append_event(run_dir: Path, event: dict[str, Any]) -> None:
    with open(run_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, sort_keys=True) + "\n")
        f.flush()


def _encode_global(strategy: FedClimbStrategy) -> ArrayRecord:
    """The global adapter at wire precision; in ffa the frozen A always travels in fp32."""
    exact = fp32_names(strategy.global_adapter, strategy.only_b)
    return encode_adapter(strategy.global_adapter, strategy.cfg.federation.wire_precision, exact=exact)


def _evaluate(strategy: FedClimbStrategy, grid: Grid, rnd: int, timeout: float) -> None:
    arrays = _encode_global(strategy)
    replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid), timeout=timeout)
    strategy.aggregate_evaluate(rnd, replies)


def run_federation(
    grid: Grid,
    cfg: FedClimbConfig,
    *,
    run_dir: str | Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> FedClimbStrategy:
    """Run (or resume) ``cfg.federation.rounds`` rounds; checkpoints go to ``run_dir``."""
    run_dir = Path(run_dir)
    if not cfg.federation.domains:
        if cfg.aggregation.weighting == "domain":
            raise ValueError(
                "federation.domains is empty, but aggregation.weighting=domain needs the federation's domain "
                "names: set federation.domains=[...] (dataset names; modality folders with data.domain_key=modality)"
            )
        log.warning("federation.domains is empty: no federation-wide DRPO statistics will be broadcast")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    history: list[dict[str, Any]] = []
    start = 1
    ckpt = load_latest(run_dir) if cfg.server.resume else None
    if ckpt is not None:
        strategy = FedClimbStrategy(cfg, ckpt.adapter)
        strategy.load_state_dict(ckpt.state["strategy"])
        metrics_file = run_dir / "metrics.json"
        history = json.loads(metrics_file.read_text()) if metrics_file.is_file() else []
        history = [h for h in history if h["server_round"] <= ckpt.server_round]
        # The event stream restarts from the checkpointed history (a crash may have cut it
        # short, or left rounds after the checkpoint that will now run again).
        with open(run_dir / EVENTS_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(h, sort_keys=True) + "\n" for h in history)
        start = ckpt.server_round + 1
        log.info("resuming after round %d from %s", ckpt.server_round, run_dir)
    else:
        if cfg.server.resume:
            log.info("server.resume=true but %s holds no complete round; starting fresh", run_dir)
        elif (run_dir / "latest").exists():
            raise FileExistsError(
                f"{run_dir} already holds checkpoints; pass server.resume=true to continue it or choose another server.run_dir"
            )
        if (run_dir / EVENTS_FILE).exists():
            (run_dir / EVENTS_FILE).unlink()
        strategy = FedClimbStrategy(cfg, initial_adapter(cfg))
    strategy.summary()
    base_name = base_for_adapters(cfg, run_dir)
    fed = cfg.federation
    nodes = wait_for_nodes(grid, fed.min_hospitals, fed.connect_timeout_s)
    log.info("connected: %s", ", ".join(sorted(strategy.label(n) for n in nodes)) or "none")

    def finish(rlog: RoundLog) -> None:
        entry = asdict(rlog)
        history.append(entry)
        save_round(
            run_dir, rlog.server_round, strategy.global_adapter, {"strategy": strategy.state_dict()},
            lora=cfg.lora, base_model_name=base_name, metrics_history=history,
        )
        _append_event(run_dir, entry)
        if on_round:
            on_round(entry)

    if start == 1 and fed.evaluate and fed.evaluate_initial:
        rlog = RoundLog(server_round=0)
        strategy.current = rlog
        t0 = time.perf_counter()
        _evaluate(strategy, grid, 0, fed.round_timeout_s)
        rlog.seconds = time.perf_counter() - t0
        finish(rlog)

    for rnd in range(start, fed.rounds + 1):
        rlog = RoundLog(server_round=rnd)
        strategy.current = rlog
        t0 = time.perf_counter()
        arrays = _encode_global(strategy)
        messages = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=fed.round_timeout_s)
        strategy.aggregate_train(rnd, replies)
        if fed.evaluate:
            _evaluate(strategy, grid, rnd, fed.round_timeout_s)
        rlog.seconds = time.perf_counter() - t0
        finish(rlog)
    strategy.current = None
    return strategy


def base_for_adapters(cfg: FedClimbConfig, run_dir: Path) -> str:
    """The ``base_model_name_or_path`` every checkpointed adapter names.

    A hub id or path for Hugging Face presets; the dequantised safetensors folder for
    GGUF presets; for the tiny preset (which exists only as a seeded build) a copy kept
    once in ``RUN_DIR/base``, so the run directory alone holds everything plain
    ``transformers`` + ``peft`` need.
    """
    source = base_model_source(cfg.model)
    if cfg.model.source != "tiny":
        return source
    target = run_dir / "base"
    if not (target / "config.json").is_file():
        tmp = run_dir / "base.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("done"))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return str(target.resolve())
