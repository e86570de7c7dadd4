"""The coordinator's Flower ServerApp: thin glue around server/federation.py."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.modeling.preload import preload
from common.config import FedClimbConfig
from common.modeling.loader import cache_root
from common.runconfig import RUN_SIM_ROOT, SIM_AUTO, auto_run_dir, config_from_run_config
from server.federation import run_federation, wait_for_nodes

log = logging.getLogger(__name__)

preload()

app = ServerApp()


def _prepare_auto_simulation(grid: Grid, cfg: FedClimbConfig, run_id: int) -> tuple[FedClimbConfig, Path]:
    """`flwr run .`: give each virtual SuperNode a synthetic hospital (data, budget, state)."""
    from simulation.simulate import prepare_run  # the simulation layer, only for this path

    nodes = wait_for_nodes(grid, 1, cfg.federation.connect_timeout_s)
    cfg.simulation.hospitals = len(nodes)
    run = prepare_run(cfg, auto_run_dir(cache_root(cfg.model), run_id))
    log.info("flwr run simulation: %d synthetic hospitals prepared in %s", len(nodes), run.run_dir)
    return run.cfg, run.run_dir


def on_simulation_engine(grid: Grid) -> bool:
    """True when the ServerApp runs on Flower's simulation engine (in-memory grid)."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # a Flower without the simulation engine
        return False
    return isinstance(grid, InMemoryGrid)


def resolve_run(grid: Grid, context: Context) -> tuple[FedClimbConfig, Path]:
    """The configuration and run directory for this run.

    ``sim-root = "auto"`` (the pyproject default, for `flwr run .` on a laptop) prepares
    synthetic hospitals only on Flower's simulation engine. In a deployment (a real
    SuperLink with hospitals' SuperNodes) it is ignored: the coordinator's configuration
    (``federation.domains``, ``server.run_dir``) is used as written.
    """
    cfg = config_from_run_config(context.run_config)
    if str(context.run_config.get(RUN_SIM_ROOT, "")) == SIM_AUTO:
        if on_simulation_engine(grid):
            return _prepare_auto_simulation(grid, cfg, context.run_id)
        log.info("sim-root=auto applies only to Flower's simulation engine; this is a "
                 "deployment, so the configuration's federation.domains and server.run_dir are used")
    run_dir = Path(cfg.server.run_dir).expanduser()
    if not run_dir.is_absolute():
        run_dir = Path.cwd() / run_dir
    return cfg, run_dir


def log_to_run_dir(run_dir: Path) -> None:
    """A deployment's server log, ``RUN_DIR/server.log`` (INFO and up, hospitals by name).

    Flower uploads only its own logger's lines; fedclimb's would otherwise show WARNING
    and up on the SuperLink's console only.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "server.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("server", "common"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Resolve the run configuration and run (or resume) the federation."""
    cfg, run_dir = resolve_run(grid, context)
    if not on_simulation_engine(grid):
        log_to_run_dir(run_dir)
    log.info("fedclimb run directory: %s", run_dir)
    run_federation(grid, cfg, run_dir=run_dir)
