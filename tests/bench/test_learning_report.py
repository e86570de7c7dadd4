"""bench/learning.py's report from cached runs: pairing, targets, sweep and figures (nothing trains)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "learning.py"
_SPEC = importlib.util.spec_from_file_location("bench_learning", _PATH)
learning = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(learning)

DOMAINS = ("common", "rare")


def _scores(common: float, rare: float) -> dict:
    # recall of each class: the positives' recall is 2v - 1 when the negatives' is 1 (mean v)
    return {d: {"records": 40.0, "balanced_accuracy": v, "macro_f1": v, "mean_reward": v,
                "recall": {"neg": 1.0, "pos": 2 * v - 1}}
            for d, v in zip(DOMAINS, (common, rare), strict=True)}


def _write_job(out: Path, setting: str, arm: str, seed: int, common: float, rare: float) -> None:
    f = out / "jobs" / setting / arm / f"seed-{seed}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    final = _scores(common, rare)
    f.write_text(json.dumps({"setting": setting, "arm": arm, "seed": seed, "final": final,
                             "curve": [_scores(0.5, 0.5), final], "seconds": 60.0}))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    # rare-domain accuracy per seed: fedavg 0.5, 0.6, 0.5; fedclimb 0.7, 0.7, 0.8 -> +0.2, +0.1, +0.3
    for seed, (ref, ours) in enumerate(((0.5, 0.7), (0.6, 0.7), (0.5, 0.8))):
        for setting in ("dp8", "nodp"):
            _write_job(tmp_path, setting, "fedavg-grpo", seed, 0.9, ref)
            _write_job(tmp_path, setting, "domain-drpo", seed, 0.9, ours)
            _write_job(tmp_path, setting, "centralised-drpo", seed, 0.95, 0.9)
        _write_job(tmp_path, "eps3", "domain-drpo", seed, 0.8, 0.6)
    _write_job(tmp_path, "dp8", "local-only", 0, 0.7, 0.5)  # one seed only: not paired, left out
    return tmp_path


def test_report_pairs_seeds_and_checks_both_targets(out: Path) -> None:
    manifest = {"counts": {"common": {"train": 400, "test": 40}, "rare": {"train": 20, "test": 40}}}
    report = learning.write_report(out, learning.load_results(out), manifest, argparse.Namespace())
    assert report["rare_domain"] == "rare"
    dp = report["settings"]["dp8"]
    assert dp["seeds"] == [0, 1, 2] and "local-only" not in dp["summary"]  # an arm short of seeds is left out
    diff = dp["summary"]["domain-drpo"]["paired"]["worst_minus_fedavg-grpo"]
    assert diff["mean"] == pytest.approx(0.2)  # (0.2 + 0.1 + 0.3) / 3
    # sample std 0.1, t(0.975, 2 df) = 4.302653 -> half-width 0.248414: [-0.048, 0.448] is not above 0
    assert diff["low"] == pytest.approx(0.2 - 0.248414, abs=1e-5)
    lines = learning.targets(report)
    assert any("dp8: worst-domain" in x and "**not met**" in x for x in lines)
    # macro: (0.9 + 0.733) / 2 = 0.8167 vs centralised (0.95 + 0.9) / 2 = 0.925 -> 0.88 < 0.90
    assert any("dp8: macro" in x and "= 0.883 " in x and "**not met**" in x for x in lines)
    # centralised worst domain 0.9 in every seed: the precondition holds
    assert any("dp8: precondition" in x and "**holds**" in x for x in lines)
    sweep = report["sweep"]
    assert list(sweep) == ["3", "8", "inf"]  # no DP sorts last
    assert sweep["3"]["worst"] == [0.6, 0.6, 0.6] and sweep["8"]["worst"] == pytest.approx([0.7, 0.7, 0.8])
    for name in ("comparison.json", "learning.md", "learning.png", "learning_rare_curve.png", "learning_epsilon.png"):
        assert (out / name).stat().st_size > 500, name
    text = (out / "learning.md").read_text()
    assert "| domain-drpo |" in text and "## Epsilon sweep" in text
    # rare recall of the positives, mean over seeds: fedavg 2*(0.5, 0.6, 0.5) - 1 -> 0.07; ours -> 0.47
    assert "| fedavg-grpo | 1.00 | 0.07 |" in text and "| domain-drpo | 1.00 | 0.47 |" in text
    saved = json.loads((out / "comparison.json").read_text())
    assert [r["seed"] for r in saved["settings"]["nodp"]["runs"]["domain-drpo"]] == [0, 1, 2]


def test_plan_runs_each_seed_whole_before_the_next_and_skips_sweep_duplicates(tmp_path: Path) -> None:
    args = argparse.Namespace(seed=0, seeds=2, settings=["dp8", "nodp"], arms=["fedavg-grpo", "domain-drpo"],
                              sweep=[1.0, 8.0, float("inf")], sweep_seeds=1, overrides=[], keep_runs=False)
    jobs = learning.plan(args, tmp_path)
    assert [(j["seed"], j["setting"], j["arm"]) for j in jobs] == [
        (0, "dp8", "fedavg-grpo"), (0, "dp8", "domain-drpo"), (0, "nodp", "fedavg-grpo"), (0, "nodp", "domain-drpo"),
        (1, "dp8", "fedavg-grpo"), (1, "dp8", "domain-drpo"), (1, "nodp", "fedavg-grpo"), (1, "nodp", "domain-drpo"),
        (0, "eps1", "domain-drpo"),  # epsilon 8 and no DP are the dp8 and nodp runs
    ]
    assert learning.job_overrides("eps1") == ["privacy.target_epsilon=1.0"]
    assert learning.job_overrides("nodp") == ["privacy=off"]


def test_a_pool_from_another_generator_is_refused_not_mixed_in(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Cached runs were measured on the pool beside them: an --out whose pool another
    generator version (or other shares) wrote must be refused, naming what differs."""
    from simulation.synth_graded import GENERATOR

    pool = tmp_path / "pools" / "seed-0"
    pool.mkdir(parents=True)
    old = {"generator": "fedclimb-graded/1", "shares": [40.0, 25.0, 15.0, 8.0, 2.0], "train_records": 1000}
    (pool / "graded.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit):
        learning.main(["--out", str(tmp_path), "--seeds", "1", "--sweep-seeds", "0", "--report-only"])
    err = capsys.readouterr().err
    assert "fedclimb-graded/1" in err and GENERATOR in err and "new --out" in err
