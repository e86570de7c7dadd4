"""What the simulation tells its hospitals (hospital.yaml) and its reader (report.md) about privacy."""

from __future__ import annotations

from pathlib import Path

from common import keys
from common.config import load_config, load_hospital_config
from simulation.report import write_report
from simulation.simulate import _write_hospitals


def test_simulated_hospitals_plan_for_the_runs_rounds_and_opt_in_to_exact_evaluation(tmp_path: Path) -> None:
    cfg = load_config(overrides=["federation.rounds=7"])  # the laptop preset, DP on
    roots = [tmp_path / "data-0", tmp_path / "data-1"]
    for root in roots:
        root.mkdir()
    sim_root = _write_hospitals(cfg, roots, tmp_path / "run")
    for i in range(2):
        hospital = load_hospital_config(sim_root / f"hospital-{i}" / "hospital.yaml")
        assert hospital.privacy.enabled and hospital.privacy.planned_rounds == 7
        assert hospital.privacy.eval_release == "exact"  # explicit opt-in, said in the report
    own = load_config(overrides=["federation.rounds=7", "privacy.planned_rounds=3"])
    sim_root = _write_hospitals(own, roots, tmp_path / "own")
    assert load_hospital_config(sim_root / "hospital-0" / "hospital.yaml").privacy.planned_rounds == 3


def _history(domains: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    rows = [{"server_round": r, "train": {"nodes": {"hospital-0": {keys.EPSILON: 0.5 * r}}} if r else {},
             "evaluate": {"nodes": {}, "domains": domains}, "bytes_sent": 0, "bytes_received": 0, "seconds": 1.0}
            for r in (0, 1)]
    return rows


def test_the_report_says_how_evaluation_left_the_hospitals(tmp_path: Path) -> None:
    exact = {"cxr": {"records": 10.0, "balanced_accuracy": 0.5, "macro_f1": 0.4, "mean_reward": 0.3,
                     "accuracy": 0.5, "format_rate": 1.0, "mean_iou": 0.0}}
    cfg = load_config(overrides=["federation.domains=[cxr]"])
    text = write_report(tmp_path, cfg, _history(exact), seconds=1.0, command="c").read_text()
    assert "evaluation release: exact metrics: every hospital opted in" in text
    assert "outside the DP guarantee" in text
    assert "| cxr | 10 | 0.500 -> **0.500** |" in text
    # DP-released evaluation: no balanced accuracy or macro-F1 reach the server; the table says "-".
    (tmp_path / "dp").mkdir()
    released = {"cxr": {"records": 9.6, "mean_reward": 0.35, "accuracy": 0.5, "format_rate": 0.9}}
    cfg = load_config(overrides=["federation.domains=[cxr]", "privacy.eval_release=dp"])
    text = write_report(tmp_path / "dp", cfg, _history(released), seconds=1.0, command="c").read_text()
    assert "evaluation release: noisy per-domain sums" in text
    assert "| cxr | 9 | - -> **-** | - -> - | 0.350 -> 0.350 |" in text
