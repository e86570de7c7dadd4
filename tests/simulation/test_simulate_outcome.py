"""When `fedclimb simulate` counts a run as failed: Flower failed, or no round aggregated (exit 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from common.config import ConfigError, FedClimbConfig, load_config
from simulation.cli import main
from simulation.simulate import SimulationResult, check_fits_federation, run_inprocess


def _round(rnd: int, *, aggregated: bool, **train: Any) -> dict[str, Any]:
    """A metrics.json entry as server/federation.py writes it."""
    report = {"nodes": {}, "rejected": {}, "budget_exhausted": [], "no_data": [], "aggregated": aggregated, **train}
    return {"server_round": rnd, "train": report, "evaluate": {}, "bytes_sent": 0, "bytes_received": 0, "seconds": 1.0}


def _result(history: list[dict[str, Any]], *, rounds: int = 2, returncode: int = 0) -> SimulationResult:
    cfg = FedClimbConfig()
    cfg.federation.rounds = rounds
    return SimulationResult(Path("/runs/x"), cfg, ["hospital-0"], 1.0, returncode, history)


def test_a_run_with_one_aggregated_round_succeeds() -> None:
    result = _result([_round(0, aggregated=False), _round(1, aggregated=False), _round(2, aggregated=True)])
    assert result.aggregated_rounds == [2]
    assert result.failure() is None


def test_a_finished_run_without_an_aggregated_round_fails_and_says_why() -> None:
    history = [
        {"server_round": 0, "train": {}, "evaluate": {}},  # the initial evaluation has no train report
        _round(1, aggregated=False, nodes={"hospital-0": {}}, budget_exhausted=["hospital-0"]),
        _round(2, aggregated=False, nodes={"hospital-0": {}, "hospital-1": {}}, budget_exhausted=["hospital-0"],
               rejected={"hospital-1": "update norm 2e3 > federation.max_update_norm"}),
    ]
    result = _result(history)
    assert result.ok and result.aggregated_rounds == []
    message = result.failure()
    assert message is not None and message.startswith("no round aggregated")
    assert "federation.min_replies=1" in message
    assert "round 2: budget exhausted: hospital-0; rejected hospital-1 (update norm" in message
    assert "/runs/x/metrics.json" in message


def test_a_round_without_replies_is_reported_as_such() -> None:
    message = _result([_round(1, aggregated=False)], rounds=1).failure()
    assert message is not None and "round 1: no replies" in message


def test_a_flower_failure_is_reported_before_aggregation() -> None:
    message = _result([_round(1, aggregated=True)], rounds=2, returncode=0).failure()  # stopped after round 1
    assert message is not None and message.startswith("simulation failed (flwr exit code 0)")
    assert "flower.log" in _result([], returncode=3).failure()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("hospitals", "overrides", "key"),
    [
        (3, ["federation.min_replies=4"], "federation.min_replies"),
        (4, ["federation.fraction_train=0.5", "federation.min_replies=3"], "federation.min_replies"),
        (1, ["federation.fraction_train=0.1", "federation.min_replies=2"], "federation.min_replies"),
        (2, ["federation.min_hospitals=3"], "federation.min_hospitals"),
    ],
)
def test_settings_the_simulated_hospitals_cannot_meet_are_refused(hospitals: int, overrides: list[str], key: str) -> None:
    cfg = load_config(overrides=[f"simulation.hospitals={hospitals}", *overrides])
    with pytest.raises(ConfigError, match=rf"^{key}: must be <= "):
        check_fits_federation(cfg)


@pytest.mark.parametrize(("hospitals", "fraction", "min_replies"), [(3, 1.0, 3), (4, 0.5, 2), (5, 0.3, 2), (1, 0.1, 1)])
def test_settings_at_the_boundary_are_accepted(hospitals: int, fraction: float, min_replies: int) -> None:
    cfg = load_config(overrides=[f"simulation.hospitals={hospitals}", f"federation.fraction_train={fraction}",
                                 f"federation.min_replies={min_replies}", f"federation.min_hospitals={hospitals}"])
    check_fits_federation(cfg)


def test_a_real_run_that_never_aggregates_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """One hospital whose whole budget is too small to train: the round log says so and the CLI exits 1."""
    torch.set_num_threads(1)
    cfg = load_config(overrides=[
        "simulation.hospitals=1", "federation.rounds=1", "train.steps=1", "simulation.synth_scale=0.1",
        "federation.evaluate=false", "rollout.batch_prompts=2", "rollout.num_rollouts=2",
        "privacy.target_epsilon=0.001", f"model.cache_dir={tmp_path / 'cache'}",
    ])
    result = run_inprocess(cfg, tmp_path / "run")  # the same ServerApp loop and ClientApp, no Ray
    assert result.ok and result.aggregated_rounds == []

    from simulation import simulate

    monkeypatch.setattr(simulate, "run_simulation", lambda *a, **k: result)
    capsys.readouterr()  # drop the run's own progress output
    assert main(["simulate", "--out", str(tmp_path / "unused"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedclimb: no round aggregated") and "budget exhausted: hospital-0" in err
    assert not (tmp_path / "run" / "report.md").exists()
