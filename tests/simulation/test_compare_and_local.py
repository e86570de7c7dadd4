"""`fedclimb simulate --compare` and `fedclimb train-local`, end to end on tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.site import Site
from common.climb.validate import validate_root
from common.config import HospitalConfig, load_config
from simulation.cli import main
from simulation.compare import ARMS, _pooled_site, run_compare, summarise
from simulation.partition import partition_root
from simulation.synth import generate_federation


def test_summarise_means_and_stds_by_hand() -> None:
    runs = {
        "a": [
            {"x": {"balanced_accuracy": 0.6, "mean_reward": 0.5, "records": 10.0},
             "y": {"balanced_accuracy": 0.8, "mean_reward": 0.7, "records": 30.0}},
            {"x": {"balanced_accuracy": 0.8, "mean_reward": 0.6, "records": 10.0},
             "y": {"balanced_accuracy": 0.6, "mean_reward": 0.9, "records": 30.0}},
        ]
    }
    s = summarise(runs)["a"]
    assert s["per_domain"]["x"] == pytest.approx((0.7, 0.1))  # mean (0.6, 0.8), population std 0.1
    assert s["worst"] == pytest.approx((0.6, 0.0))  # worst per run: 0.6 and 0.6
    # records-weighted reward per run: (5 + 21) / 40 = 0.65 and (6 + 27) / 40 = 0.825
    assert s["reward"][0] == pytest.approx((0.65 + 0.825) / 2)


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
    assert set(data["summary"]) == set(ARMS)
    for arm in ARMS:
        s = data["summary"][arm]
        assert 0.0 <= s["worst"][0] <= 1.0 and s["seeds"] == 1
        assert set(s["per_domain"]) <= {"synth_cxr", "synth_derm", "synth_ecg", "synth_fundus", "synth_labs"}
    # centralised pools every hospital's data: it sees every domain, fundus (one hospital) included
    assert "synth_fundus" in data["summary"]["centralised-drpo"]["per_domain"]
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert all(arm in text for arm in ARMS)
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000


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
