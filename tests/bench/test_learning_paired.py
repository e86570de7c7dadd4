"""bench/learning_paired.py: paired differences across benchmark folders (nothing trains)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "learning_paired.py"
_SPEC = importlib.util.spec_from_file_location("bench_learning_paired", _PATH)
paired = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(paired)


def _job(folder: Path, arm: str, seed: int, common: float, rare: float, low_recall: float) -> None:
    f = folder / "jobs" / "nodp" / arm / f"seed-{seed}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    final = {"common": {"balanced_accuracy": common},
             "rare": {"balanced_accuracy": rare, "recall": {"high": 2 * rare - low_recall, "low": low_recall}}}
    f.write_text(json.dumps({"setting": "nodp", "arm": arm, "seed": seed, "final": final}))


def _pool(folder: Path, seed: int) -> None:
    f = folder / "pools" / f"seed-{seed}" / "graded.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"counts": {"common": {"train": 400}, "rare": {"train": 20}}}))


def test_paired_differences_use_the_seeds_every_entry_has(tmp_path: Path) -> None:
    base, variant = tmp_path / "base", tmp_path / "variant"
    for seed in (0, 1, 2):
        _pool(base, seed)
        _job(base, "fedavg-grpo", seed, 0.9, 0.6, 0.5)
    # seed 3 only in the variant: not paired; rare 0.7, 0.8, 0.6 against 0.6 -> +0.1, +0.2, 0.0
    for seed, rare in ((0, 0.7), (1, 0.8), (2, 0.6), (3, 0.9)):
        _job(variant, "domain-drpo", seed, 0.8, rare, 0.4)
    report = paired.compare([("ref", base, "fedavg-grpo"), ("new", variant, "domain-drpo")], "nodp", "ref")
    assert report["seeds"] == [0, 1, 2] and report["rarest_domain"] == "rare"
    new = report["arms"]["new"]
    assert new["paired"]["rarest"]["mean"] == pytest.approx(0.1)
    # sample std 0.1, t(0.975, 2 df) = 4.302653 -> half-width 0.248414
    assert new["paired"]["rarest"]["low"] == pytest.approx(0.1 - 0.248414, abs=1e-5)
    # worst = min(common, rare): 0.7, 0.8, 0.6 against 0.6, 0.6, 0.6; macro (0.8 + rare) / 2 against 0.75
    assert new["paired"]["worst"]["mean"] == pytest.approx(0.1)
    assert new["paired"]["macro"]["mean"] == pytest.approx(0.75 - 0.75)
    assert new["mean"]["rarest recall low"]["mean"] == pytest.approx(0.4)
    assert "paired" not in report["arms"]["ref"]
    assert "| new |" in paired.table(report)
    paired.plot(report, tmp_path / "paired.png")
    assert (tmp_path / "paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_entries_are_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="LABEL=DIR:ARM"):
        paired.parse_entry("just-a-folder")
    with pytest.raises(SystemExit, match="no finished runs"):
        paired.compare([("a", tmp_path, "fedavg-grpo")], "nodp", "a")
