"""The coordinator's Flower ServerApp: thin glue around server/federation.py."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.modeling.preload import preload
from common.runconfig import config_from_run_config
from server.federation import run_federation

log = logging.getLogger(__name__)

preload()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Resolve the run configuration and run (or resume) the federation."""
    cfg = config_from_run_config(context.run_config)
    run_dir = Path(cfg.server.run_dir).expanduser()
    if not run_dir.is_absolute():
        run_dir = Path.cwd() / run_dir
    log.info("fedclimb run directory: %s", run_dir)
    run_federation(grid, cfg, run_dir=run_dir)
