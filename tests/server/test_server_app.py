"""How the ServerApp resolves its configuration and run directory."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.superlink.grid import InMemoryGrid

import server.server_app as server_app


class DeploymentGrid:
    """Stands in for the grid of a real SuperLink (anything but the simulation engine's)."""


def _context(run_config: dict) -> Context:
    return Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_sim_root_auto_is_ignored_in_a_deployment(tmp_path, monkeypatch):
    """A coordinator's `flwr run . <federation>` keeps its own domains and run directory."""
    monkeypatch.chdir(tmp_path)
    prepared = []
    monkeypatch.setattr(server_app, "_prepare_auto_simulation", lambda *a: prepared.append(a))
    ctx = _context({"config-file": "", "overrides": "federation.domains=[cxr,ecg] server.run_dir=runs/fed",
                    "sim-root": "auto"})
    cfg, run_dir = server_app.resolve_run(DeploymentGrid(), ctx)
    assert prepared == []
    assert list(cfg.federation.domains) == ["cxr", "ecg"]
    assert run_dir == tmp_path / "runs" / "fed"


def test_sim_root_auto_prepares_hospitals_on_the_simulation_engine(tmp_path, monkeypatch):
    """On Flower's simulation engine sim-root=auto gives the virtual SuperNodes synthetic data."""
    calls = []

    def fake_prepare(grid, cfg, run_id):
        calls.append(run_id)
        return cfg, tmp_path / "auto-run"

    monkeypatch.setattr(server_app, "_prepare_auto_simulation", fake_prepare)
    engine_grid = InMemoryGrid.__new__(InMemoryGrid)  # the type is what matters, not its state
    assert server_app.on_simulation_engine(engine_grid)
    assert not server_app.on_simulation_engine(DeploymentGrid())
    _, run_dir = server_app.resolve_run(engine_grid, _context({"sim-root": "auto", "overrides": ""}))
    assert calls == [7]
    assert run_dir == tmp_path / "auto-run"


def test_an_absolute_run_dir_is_kept(tmp_path):
    target = tmp_path / "elsewhere"
    _, run_dir = server_app.resolve_run(
        DeploymentGrid(), _context({"sim-root": "", "overrides": f"server.run_dir={target}"}))
    assert run_dir == Path(target)
