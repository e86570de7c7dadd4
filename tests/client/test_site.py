"""What a hospital's own settings fix, whatever the server's run configuration says."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site import Site, effective_config
from common.config import ConfigError, HospitalConfig, PrivacyConfig, load_config, load_hospital_config


def _site(tmp_path: Path, **fields) -> Site:
    hospital = HospitalConfig(name="h", data_root=str(tmp_path / "data"), state_dir=str(tmp_path / "state"), **fields)
    return Site("h", hospital, simulated=False)


def test_the_server_cannot_choose_which_records_are_trained_or_evaluated(tmp_path):
    """A run config that evaluates on the training split, on one record, is overruled."""
    hostile = load_config(overrides=["data.train_split=test", "data.eval_split=train", "data.max_records=1",
                                     "federation.eval_max_records=1"])
    cfg = effective_config(hostile, _site(tmp_path), {})
    assert (cfg.data.train_split, cfg.data.eval_split) == ("train", "test")
    assert cfg.data.max_records == 0 and cfg.federation.eval_max_records == 0


def test_the_hospital_sets_its_splits_and_caps(tmp_path):
    site = _site(tmp_path, eval_split="valid", max_eval_records=50, privacy=PrivacyConfig(enabled=False),
                 max_train_records=200)
    cfg = effective_config(load_config(), site, {})
    assert (cfg.data.train_split, cfg.data.eval_split) == ("train", "valid")
    assert cfg.data.max_records == 200 and cfg.federation.eval_max_records == 50


def test_evaluating_on_the_training_split_is_refused(tmp_path):
    path = tmp_path / "hospital.yaml"
    path.write_text("name: h\ndata_root: d\nstate_dir: s\neval_split: train\n")
    with pytest.raises(ConfigError, match="eval_split.*must differ from train_split"):
        load_hospital_config(path)


def test_a_positional_training_subsample_is_refused_under_dp(tmp_path):
    path = tmp_path / "hospital.yaml"
    path.write_text("name: h\ndata_root: d\nstate_dir: s\nmax_train_records: 100\n")
    with pytest.raises(ConfigError, match="max_train_records.*privacy.enabled"):
        load_hospital_config(path)
    path.write_text("name: h\ndata_root: d\nstate_dir: s\nmax_train_records: 100\nprivacy:\n  enabled: false\n")
    assert load_hospital_config(path).max_train_records == 100
