"""What a hospital's own settings fix, whatever the server's run configuration says."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from client.site import Site, SiteError, effective_config, in_process_engine, on_simulation_engine, resolve_site
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


# ------------------------------------------------------------------ who chooses the settings


def _simulated_hospital(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """A sim-root whose hospital-0 has DP off, and the node config of a virtual node 0."""
    folder = tmp_path / "sim" / "hospital-0"
    (folder / "data").mkdir(parents=True)
    (folder / "hospital.yaml").write_text(
        f"name: lured\ndata_root: {folder / 'data'}\nstate_dir: {folder / 'state'}\nprivacy:\n  enabled: false\n")
    return tmp_path / "sim", {"partition-id": 0, "num-partitions": 3}


def test_sim_root_cannot_choose_a_hospitals_settings_outside_a_simulation_engine(tmp_path):
    """A SuperNode without hospital-config (partition-id set, as Flower's examples do) refuses to start."""
    sim_root, node_config = _simulated_hospital(tmp_path)
    assert not on_simulation_engine()
    with pytest.raises(SiteError, match="hospital-config.*never chooses"):
        resolve_site(node_config, {"sim-root": str(sim_root)})
    with pytest.raises(SiteError, match="hospital-config"):
        resolve_site({}, {"sim-root": str(sim_root)})


def test_a_node_without_settings_replies_with_an_error_status_only(tmp_path):
    """Through the ClientApp: status 3 and nothing else; the lured hospital's state is never created."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.client_app import app
    from common import keys
    from simulation.inprocess import enter_task

    sim_root, node_config = _simulated_hospital(tmp_path)
    enter_task()
    msg = Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), dst_node_id=1,
                  message_type="train", group_id="1")
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={"sim-root": str(sim_root)})
    reply = app(msg, context)
    assert dict(reply.content.metric_records[keys.METRICS]) == {keys.STATUS: keys.STATUS_ERROR}
    assert not (sim_root / "hospital-0" / "state").exists()


def test_on_the_in_process_engine_sim_root_names_the_virtual_hospital(tmp_path):
    sim_root, node_config = _simulated_hospital(tmp_path)
    with in_process_engine():
        assert on_simulation_engine()
        site = resolve_site(node_config, {"sim-root": str(sim_root)})
    assert site.simulated and site.name == "lured" and not site.hospital.privacy.enabled
    assert not on_simulation_engine()


def test_a_process_with_ray_imported_but_no_flower_actor_is_no_engine():
    import ray  # noqa: F401 - importing is not enough

    assert not on_simulation_engine()


def test_hospital_config_wins_over_sim_root_even_on_an_engine(tmp_path):
    sim_root, node_config = _simulated_hospital(tmp_path)
    (tmp_path / "own").mkdir()
    own = tmp_path / "own.yaml"
    own.write_text(f"name: own\ndata_root: {tmp_path / 'own'}\nstate_dir: {tmp_path / 'own-state'}\n"
                   "privacy:\n  planned_rounds: 3\n")
    with in_process_engine():
        site = resolve_site({**node_config, "hospital-config": str(own)}, {"sim-root": str(sim_root)})
    assert site.name == "own" and site.hospital.privacy.enabled and not site.simulated


def test_data_root_shorthand_needs_an_explicit_state_dir(tmp_path):
    """The ledger's place is the hospital's choice, never derived."""
    (tmp_path / "data").mkdir()
    with pytest.raises(SiteError, match="state-dir"):
        resolve_site({"data-root": str(tmp_path / "data")}, {})
    site = resolve_site({"data-root": str(tmp_path / "data"), "state-dir": str(tmp_path / "state")}, {})
    assert site.state_dir == tmp_path / "state" and site.hospital.privacy.enabled and not site.simulated


# ------------------------------------------------------------------ hyper-parameters from the server


@pytest.mark.parametrize(("key", "value"), [
    ("hp.rollout.temperature", math.inf), ("hp.train.kl_coef", math.inf), ("hp.train.lr", math.nan),
    ("hp.train.lr", math.inf), ("hp.rollout.temperature", -1.0), ("hp.train.steps", 0),
    ("hp.train.steps", "10"), ("hp.train.kl_coef", True),
])
def test_a_non_finite_or_invalid_hyper_parameter_is_refused_naming_it(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        effective_config(load_config(), _site(tmp_path), {key: value})


def test_finite_values_over_the_limits_are_clamped(tmp_path):
    site = _site(tmp_path)
    cfg = effective_config(load_config(), site, {"hp.rollout.temperature": 50.0, "hp.train.kl_coef": 1e3,
                                                  "hp.train.lr": 1.0, "hp.train.steps": 10**9})
    lim = site.hospital.limits
    assert cfg.rollout.temperature == lim.max_temperature and cfg.train.kl_coef == lim.max_kl_coef
    assert cfg.train.lr == lim.max_lr and cfg.train.steps == lim.max_local_steps


def test_a_non_finite_run_configuration_is_refused(tmp_path):
    """Values the run configuration sets directly (not via hp.*) must be finite too."""
    with pytest.raises(ConfigError, match="train.entropy_coef"):
        effective_config(load_config(overrides=["train.entropy_coef=inf"]), _site(tmp_path), {})
