"""`fedclimb simulate --compare` and `fedclimb train-local`, end to end on tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.site import Site
from common.climb.validate import validate_root
from common.config import HospitalConfig, load_config
from simulation.cli import main
from simulation.compare import DEFAULT_ARMS, _pooled_site, arm_config, mean_ci, run_arm, run_compare, summarise
from simulation.partition import partition_root
from simulation.synth import generate_federation


def test_mean_ci_by_hand() -> None:
    # [1, 2, 3]: mean 2, sample std 1, t(0.975, 2 df) = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["std"] == pytest.approx(1.0) and ci["n"] == 3
    assert (ci["low"], ci["high"]) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    # 90%: t(0.95, 2 df) = 2.919986 -> 1.685854
    assert mean_ci([1.0, 2.0, 3.0], 0.9)["high"] == pytest.approx(2 + 1.685854, abs=1e-6)
    one = mean_ci([0.7])
    assert one["low"] == one["high"] == one["mean"] == 0.7 and one["std"] == 0.0
    with pytest.raises(ValueError):
        mean_ci([])


def test_summarise_by_hand_with_paired_differences() -> None:
    def run(x: float, y: float, rx: float = 0.5, ry: float = 0.5) -> dict:
        return {"x": {"balanced_accuracy": x, "mean_reward": rx, "records": 10.0},
                "y": {"balanced_accuracy": y, "mean_reward": ry, "records": 30.0}}

    runs = {
        "fedavg-grpo": [run(0.6, 0.8, 0.5, 0.7), run(0.8, 0.6, 0.6, 0.9)],
        "a": [run(0.7, 0.9), run(0.9, 0.5)],
    }
    summary = summarise(runs)
    ref = summary["fedavg-grpo"]
    assert ref["per_domain"]["x"]["mean"] == pytest.approx(0.7)
    assert ref["per_domain"]["x"]["std"] == pytest.approx(0.1414214, abs=1e-6)  # sample std of 0.6, 0.8
    assert ref["worst"]["mean"] == pytest.approx(0.6) and ref["worst"]["std"] == pytest.approx(0.0)
    assert ref["macro"]["mean"] == pytest.approx(0.7)  # (0.6 + 0.8) / 2 in both runs
    # records-weighted reward per run: (5 + 21) / 40 = 0.65 and (6 + 27) / 40 = 0.825
    assert ref["reward"]["mean"] == pytest.approx((0.65 + 0.825) / 2)
    assert "paired" not in ref
    # arm a: worst 0.7 and 0.5 against 0.6 and 0.6 -> differences +0.1, -0.1; macro 0.8, 0.7 vs 0.7, 0.7
    paired = summary["a"]["paired"]
    assert paired["worst_minus_fedavg-grpo"]["mean"] == pytest.approx(0.0)
    assert paired["worst_minus_fedavg-grpo"]["std"] == pytest.approx(0.1414214, abs=1e-6)
    assert paired["macro_minus_fedavg-grpo"]["mean"] == pytest.approx(0.05)
    # t(0.975, 1 df) = 12.706205: half-width 12.706205 * 0.0707107 / sqrt(2) = 0.635310
    assert paired["macro_minus_fedavg-grpo"]["high"] == pytest.approx(0.05 + 0.635310, abs=1e-5)


def test_arm_config_changes_exactly_one_thing_per_single_change_arm() -> None:
    cfg = load_config()
    base = arm_config(cfg, "fedavg-grpo", 7)
    assert (base.aggregation.mode, base.aggregation.weighting, base.advantage.estimator) == ("fedit", "examples", "grpo")
    assert base.seed == 7
    for arm, field in (("fedavg-grpo+ffa", "mode"), ("fedavg-grpo+domain", "weighting"), ("fedavg-grpo+drpo", "estimator")):
        c = arm_config(cfg, arm, 7)
        got = {"mode": c.aggregation.mode, "weighting": c.aggregation.weighting, "estimator": c.advantage.estimator}
        ref = {"mode": "fedit", "weighting": "examples", "estimator": "grpo"}
        assert [k for k in got if got[k] != ref[k]] == [field], arm
    # the default less exact aggregation: fedit, with the other two changes
    minus_ffa = arm_config(cfg, "fedavg-grpo+domain+drpo", 7)
    assert (minus_ffa.aggregation.mode, minus_ffa.aggregation.weighting, minus_ffa.advantage.estimator) == (
        "fedit", "domain", "drpo")
    full = arm_config(cfg, "domain-drpo", 7)
    assert (full.aggregation.mode, full.aggregation.weighting, full.advantage.estimator) == ("ffa", "domain", "drpo")
    assert arm_config(cfg, "centralised-grpo", 7).advantage.estimator == "grpo"
    with pytest.raises(ValueError, match="unknown arm"):
        arm_config(cfg, "fedprox", 7)


def test_local_rounds_hand_drpo_the_statistics_a_server_would_broadcast(tmp_path: Path, monkeypatch) -> None:
    """N_d = the site's training records per domain, mu_d = the current adapter's held-out mean reward."""
    import torch

    import simulation.compare as compare
    from client.rounds import EvalOutcome, TrainOutcome
    from client.trainer import DomainEval
    from simulation.synth_graded import generate_graded

    counts = generate_graded(tmp_path / "pool", train_records=60, eval_records=4, seed=0)
    seen: list = []

    def fake_train(runtime, site, cfg, ins, adapter):
        seen.append(ins)
        return TrainOutcome(0, {k: v + 1 for k, v in adapter.items()}, {})

    def fake_eval(runtime, site, cfg, ins, adapter):
        step = float(next(iter(adapter.values())).flatten()[0])  # grows by 1 per round
        return EvalOutcome(0, {}, per_domain={d: DomainEval(4, 0.5, 0.5, 0.0, 1.0, step / 10, 0.5) for d in counts})

    monkeypatch.setattr(compare, "train_round", fake_train)
    monkeypatch.setattr(compare, "evaluate_round", fake_eval)
    site = Site("pooled", HospitalConfig(name="pooled", data_root=str(tmp_path / "pool"), state_dir=str(tmp_path)), True)
    cfg = load_config(overrides=["privacy=off"])
    adapters = compare._local_rounds(None, site, cfg, 2)
    assert len(adapters) == 2 and [ins.server_round for ins in seen] == [1, 2]
    start = float(next(iter(adapters[0].values())).flatten()[0]) - 1
    for r, ins in enumerate(seen):
        assert set(ins.domain_stats) == set(counts)
        for d, (n, mu) in ins.domain_stats.items():
            assert n == counts[d]["train"]
            assert mu == pytest.approx((start + r) / 10, abs=1e-6)  # the adapter the round starts from
    assert isinstance(adapters[-1][next(iter(adapters[-1]))], torch.Tensor)


def test_pooled_data_holds_every_hospitals_records_and_media(tmp_path: Path) -> None:
    """Every hospital has its own media folders (signals/, images/): all of them reach the pool."""
    fed = generate_federation(tmp_path / "fed", hospitals=3, seed=0, scale=0.25)
    sites = [Site(f"hospital-{i}", HospitalConfig(name=f"hospital-{i}", data_root=str(root), state_dir=str(tmp_path)),
                  True) for i, root in enumerate(fed.hospital_roots)]
    pooled = _pooled_site(tmp_path / "run", sites, load_config())
    report = validate_root(pooled.hospital.data_root)
    assert report.ok, report.invalid[:3]
    separate = [validate_root(root) for root in fed.hospital_roots]
    assert report.valid == sum(r.valid for r in separate) > 0
    ecg = [r.counts.get("train", {}).get("synth_ecg", 0) for r in separate]
    assert sum(n > 0 for n in ecg) >= 2  # the case that used to lose a hospital's signals
    assert report.counts["train"]["synth_ecg"] == sum(ecg)


def test_pooled_data_from_a_partitioned_root_keeps_its_linked_media(tmp_path: Path) -> None:
    """Hospitals cut from one real root link its media folders; the pool must keep them."""
    fed = generate_federation(tmp_path / "fed", hospitals=1, seed=0, scale=0.25)
    roots = partition_root(fed.hospital_roots[0], tmp_path / "parts", hospitals=2, mode="domain", seed=0)
    assert any(p.is_symlink() and p.is_dir() for root in roots for p in root.rglob("*"))  # the case at stake
    sites = [Site(f"hospital-{i}", HospitalConfig(name=f"hospital-{i}", data_root=str(root), state_dir=str(tmp_path)),
                  True) for i, root in enumerate(roots)]
    report = validate_root(_pooled_site(tmp_path / "run", sites, load_config()).hospital.data_root)
    assert report.ok, report.invalid[:3]
    assert report.valid == sum(validate_root(root).valid for root in roots) > 0


@pytest.mark.slow
def test_compare_runs_all_four_arms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(overrides=[
        "federation.rounds=1", "train.steps=1", "rollout.batch_prompts=4", "rollout.num_rollouts=2",
        "simulation.synth_scale=0.25", f"model.cache_dir={tmp_path / 'cache'}",
    ])
    assert run_compare(cfg, tmp_path / "cmp", seeds=1, quiet=True) == 0
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert set(data["summary"]) == set(DEFAULT_ARMS)
    domains = {"synth_cxr", "synth_derm", "synth_ecg", "synth_fundus", "synth_labs"}
    for arm in DEFAULT_ARMS:
        s = data["summary"][arm]
        assert 0.0 <= s["worst"]["mean"] <= s["macro"]["mean"] <= 1.0 and s["seeds"] == 1
        # every arm is scored on the same records: every hospital's test split, every domain
        assert set(s["per_domain"]) == domains
        assert len(data["curves"][arm][0]) == 1  # one round
    records = {d: m["records"] for d, m in data["runs"]["local-only"][0].items()}
    assert records == {d: m["records"] for d, m in data["runs"]["centralised-drpo"][0].items()}
    assert "paired" in data["summary"]["domain-drpo"] and "paired" not in data["summary"]["fedavg-grpo"]
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert all(arm in text for arm in DEFAULT_ARMS)
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["fedavg-grpo+ffa", "local-only", "centralised-grpo"])
def test_run_arm_scores_every_round_on_the_pooled_test_records(tmp_path: Path, arm: str) -> None:
    from simulation.synth_graded import PANELS, generate_graded

    counts = generate_graded(tmp_path / "pool", train_records=60, eval_records=4, seed=0)
    cfg = load_config(overrides=[
        "federation=benchmark", f"simulation.data_root={tmp_path / 'pool'}", "simulation.hospitals=2",
        "federation.rounds=2", "train.steps=1", "rollout.batch_prompts=4", "rollout.num_rollouts=2",
        f"model.cache_dir={tmp_path / 'cache'}",
    ])
    out = run_arm(arm_config(cfg, arm, 0), arm, tmp_path / "run")
    assert len(out["curve"]) == 2 and out["final"] == out["curve"][-1]
    for scores in out["curve"]:
        assert {d: m["records"] for d, m in scores.items()} == {d: float(c["test"]) for d, c in counts.items()}
        assert all(0.0 <= m["balanced_accuracy"] <= 1.0 for m in scores.values())
        for panel in PANELS:  # balanced accuracy is the mean recall of the domain's two classes
            recall = scores[panel.key]["recall"]
            assert set(recall) == {o.lower() for o in panel.options}  # labels are read case-blind
            assert sum(recall.values()) / 2 == pytest.approx(scores[panel.key]["balanced_accuracy"])


def test_train_local_prints_a_per_domain_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_federation(tmp_path / "fed", hospitals=1, seed=0, scale=0.25)
    out = tmp_path / "adapter"
    code = main(["train-local", "--data", str(tmp_path / "fed" / "hospital-0"), "--steps", "2", "--out", str(out),
                 "rollout.batch_prompts=4", "rollout.num_rollouts=2", f"model.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    text = capsys.readouterr().out
    for domain in ("synth_cxr", "synth_derm", "synth_ecg", "synth_labs"):
        assert domain in text
    assert "2 steps: rollout" in text and "test bal-acc before -> after" in text
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert main(["train-local", "--data", str(tmp_path / "missing"), "--steps", "1"]) == 2


def test_the_pool_reaches_hospital_media_only_through_its_linked_roots(tmp_path: Path) -> None:
    """The pool's links are allowed by its linked_roots.txt (every hospital root), and by nothing else."""
    fed = generate_federation(tmp_path / "fed", hospitals=2, seed=0, scale=0.1)
    sites = [Site(f"hospital-{i}", HospitalConfig(name=f"hospital-{i}", data_root=str(root), state_dir=str(tmp_path)),
                  True) for i, root in enumerate(fed.hospital_roots)]
    pool = Path(_pooled_site(tmp_path / "run", sites, load_config()).hospital.data_root)
    listed = (pool / "linked_roots.txt").read_text(encoding="utf-8").splitlines()
    assert listed == [str(root.resolve()) for root in fed.hospital_roots]
    (pool / "linked_roots.txt").unlink()
    report = validate_root(pool)
    assert report.invalid and all("outside the data root" in p.reason for p in report.invalid)
