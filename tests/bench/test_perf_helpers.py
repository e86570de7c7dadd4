"""Pure helpers of bench/perf.py: summaries, ratios, targets and shapes (nothing is timed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "perf.py"
_SPEC = importlib.util.spec_from_file_location("bench_perf", _PATH)
perf = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(perf)


def test_summary_median_spread_and_quartiles() -> None:
    s = perf.summary([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s == {"median": 3.0, "min": 1.0, "max": 5.0, "q1": 2.0, "q3": 4.0, "n": 5}
    one = perf.summary([2.5])
    assert one["median"] == one["q1"] == one["q3"] == 2.5
    with pytest.raises(ValueError):
        perf.summary([])


def test_pair_ratios_are_per_pair() -> None:
    assert perf.pair_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError):
        perf.pair_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        perf.pair_ratios([], [])


def test_met_and_entry_follow_the_target_direction() -> None:
    assert perf.met(1.3, ("<=", 1.3)) and not perf.met(1.31, ("<=", 1.3))
    assert perf.met(0.5, (">=", 0.5)) and not perf.met(0.49, (">=", 0.5))
    with pytest.raises(ValueError):
        perf.met(1.0, ("<", 1.0))
    e = perf.entry("dp_time/tiny", 1.1, "dp_time", preset="tiny")
    assert e["met"] is True and e["target"] == "<= 1.3" and e["preset"] == "tiny"
    assert perf.entry("rollout/x", 0.9, "rollout")["met"] is False


def test_qwen7b_shapes_and_parameter_count() -> None:
    shapes = perf.lora_shapes(perf.QWEN7B, 16)
    assert len(shapes) == 28 * 7 * 2
    layer = "base_model.model.model.layers.0."
    assert shapes[layer + "self_attn.k_proj.lora_A.weight"] == (16, 3584)
    assert shapes[layer + "self_attn.k_proj.lora_B.weight"] == (512, 16)
    assert shapes[layer + "mlp.down_proj.lora_A.weight"] == (16, 18944)
    assert sum(a * b for a, b in shapes.values()) == 40_370_176
    # Qwen2.5-7B's published size: 7.61 B parameters.
    assert perf.qwen_text_params(perf.QWEN7B) == 7_615_616_512
