"""Tests of common.modeling.lora and common.modeling.shapes on the tiny Qwen2.5-VL.

Tiny preset LoRA: r = 4 on q/k/v/o/gate/up/down of 2 language-model layers, hidden 64,
4 heads of 16 (2 KV heads -> k/v out 32), MLP 128. LoRA parameters per layer,
r * (in + out): q 4*(64+64)=512, k 4*(64+32)=384, v 384, o 512, gate 4*(64+128)=768,
up 768, down 4*(128+64)=768 -> 4096; two layers -> 8192 in 2 * 7 * 2 = 28 tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace

import pytest
import torch

from common.config import LoraSettings, load_config
from common.modeling.loader import load_base_model
from common.modeling.lora import (
    adapter_shapes,
    adapter_state,
    attach_lora,
    freeze_lora_a,
    init_adapter,
    is_lora_a,
    is_lora_b,
    load_adapter_state,
    read_peft_folder,
    save_peft_folder,
    target_regex,
)
from common.modeling.shapes import adapter_shapes_for, model_folder

EXPECTED_TRAINABLE = 8192
EXPECTED_TENSORS = 28
LM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# (in, out) of each target projection of the tiny preset.
IN_OUT = {
    "q_proj": (64, 64),
    "k_proj": (64, 32),
    "v_proj": (64, 32),
    "o_proj": (64, 64),
    "gate_proj": (64, 128),
    "up_proj": (64, 128),
    "down_proj": (128, 64),
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    torch.set_num_threads(1)
    c = load_config()
    c.model.cache_dir = os.environ.get("FEDCLIMB_CACHE") or str(tmp_path_factory.mktemp("models"))
    c.model.device = "cpu"
    return c


def _fresh_peft(cfg):
    """A newly loaded base model with the configured adapter (attach_lora mutates the model)."""
    return attach_lora(load_base_model(cfg.model).model, cfg.lora, base_model_name="tiny")


@pytest.fixture(scope="module")
def peft_model(cfg):
    """Shared read-only LoRA model; tests that change it use _fresh_peft instead."""
    return _fresh_peft(cfg)


def test_preset_is_the_one_the_hand_counts_assume(cfg):
    assert cfg.lora.r == 4 and set(cfg.lora.targets) == LM_TARGETS
    t = cfg.model.tiny
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (64, 128, 2)
    assert (t.num_attention_heads, t.num_key_value_heads) == (4, 2)


def test_only_language_model_lora_tensors_are_trainable(peft_model):
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == EXPECTED_TENSORS
    assert sum(p.numel() for p in trainable.values()) == EXPECTED_TRAINABLE
    for name in trainable:
        assert ".lora_A." in name or ".lora_B." in name, name
        assert "visual" not in name and "vision" not in name, name
        assert ".language_model.layers." in name, name
    # And the frozen part really is everything else, the vision tower included.
    visual = [n for n, _ in peft_model.named_parameters() if "visual" in n]
    assert visual and not any(p.requires_grad for n, p in peft_model.named_parameters() if "visual" in n)


def test_vision_mlp_projections_are_left_alone(peft_model):
    from peft.tuners.lora import LoraLayer

    modules = dict(peft_model.named_modules())
    vision_proj = [n for n in modules if "visual" in n and n.rsplit(".", 1)[-1] in LM_TARGETS]
    # The hazard exists: the vision MLP has gate/up/down projections too.
    assert {n.rsplit(".", 1)[-1] for n in vision_proj} == {"gate_proj", "up_proj", "down_proj"}
    for name in vision_proj:
        assert isinstance(modules[name], torch.nn.Linear) and not isinstance(modules[name], LoraLayer), name
    lm_proj = [n for n in modules if ".language_model.layers." in n and n.rsplit(".", 1)[-1] in LM_TARGETS]
    assert len(lm_proj) == 14
    for name in lm_proj:
        assert isinstance(modules[name], LoraLayer), name


def test_target_regex_by_hand():
    rx = target_regex(["gate_proj", "q_proj"])
    yes = ["model.language_model.layers.0.mlp.gate_proj", "model.layers.11.self_attn.q_proj"]
    no = [
        "model.visual.blocks.0.mlp.gate_proj",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.mlp.up_proj",
        "model.language_model.layers.0.mlp.gate_proj.base_layer",
        "model.language_model.layers.0.mlp.xgate_proj",
        "gate_proj",  # PEFT matches full names, which always have a parent
    ]
    for name in yes:
        assert re.fullmatch(rx, name), name
    for name in no:
        assert not re.fullmatch(rx, name), name


def test_attach_rejects_targets_that_match_nothing(cfg):
    base = load_base_model(cfg.model).model
    with pytest.raises(ValueError, match=r"lora.targets=\['nothing_proj'\] matched no language-model layer"):
        attach_lora(base, replace(cfg.lora, targets=["nothing_proj"]))
    # Projections that exist only in the vision tower do not count either.
    with pytest.raises(ValueError, match=r"lora.targets=\['qkv'\].*named \[.*'gate_proj'.*'q_proj'"):
        attach_lora(base, replace(cfg.lora, targets=["qkv"]))
    assert not any("lora_" in n for n, _ in base.named_parameters())


def test_adapter_state_names_shapes_and_dtype(peft_model):
    state = adapter_state(peft_model)
    assert list(state) == sorted(state) and len(state) == EXPECTED_TENSORS
    r = 4
    for name, value in state.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert name.startswith("base_model.model.model.language_model.layers."), name
        proj = name.split(".")[-3]
        fan_in, fan_out = IN_OUT[proj]
        if is_lora_a(name):
            assert tuple(value.shape) == (r, fan_in), name
        else:
            assert is_lora_b(name) and tuple(value.shape) == (fan_out, r), name
            assert bool((value == 0).all()), "PEFT's default B init is zero"
    assert adapter_shapes(peft_model) == {k: tuple(v.shape) for k, v in state.items()}


def test_adapter_state_is_a_copy(peft_model):
    state = adapter_state(peft_model)
    name = next(iter(state))
    state[name].fill_(123.0)
    assert not bool((adapter_state(peft_model)[name] == 123.0).any())


def test_load_adapter_state_round_trip(cfg):
    model = _fresh_peft(cfg)
    target = init_adapter(adapter_shapes(model), seed=7, b_std=0.05)
    load_adapter_state(model, target)
    got = adapter_state(model)
    assert set(got) == set(target)
    for name in target:
        assert torch.equal(got[name], target[name]), name
    # The copy went into the live parameters (PEFT's ".default." names).
    params = dict(model.named_parameters())
    some = next(n for n in target if is_lora_b(n))
    live = params[some.replace(".lora_B.weight", ".lora_B.default.weight")]
    assert torch.equal(live.detach(), target[some]) and live.requires_grad


def test_load_adapter_state_rejects_wrong_names_and_shapes(cfg, peft_model):
    model = _fresh_peft(cfg)
    good = init_adapter(adapter_shapes(peft_model), seed=1, b_std=0.1)
    before = adapter_state(model)

    renamed = dict(good)
    victim = sorted(renamed)[3]
    renamed[victim.replace("layers.", "layerz.")] = renamed.pop(victim)
    with pytest.raises(ValueError, match=r"missing .*layers.*unexpected .*layerz"):
        load_adapter_state(model, renamed)

    fewer = dict(good)
    del fewer[victim]
    with pytest.raises(ValueError, match="1 missing, 0 unexpected"):
        load_adapter_state(model, fewer)

    # The last tensor (in name order) has the wrong shape; the error names it and both shapes.
    reshaped = dict(good)
    last = sorted(reshaped)[-1]
    assert last.endswith("layers.1.self_attn.v_proj.lora_B.weight")  # v: out 32, r 4
    reshaped[last] = torch.zeros(4, 33)
    with pytest.raises(ValueError, match=re.escape(last) + r".*shape \(4, 33\).*expects \(32, 4\)"):
        load_adapter_state(model, reshaped)
    # A rejected adapter leaves the model's adapter untouched (no half-loaded state).
    after = adapter_state(model)
    for name in before:
        assert torch.equal(after[name], before[name]), name


def test_init_adapter_is_deterministic_and_order_independent(peft_model):
    shapes = adapter_shapes(peft_model)
    a = init_adapter(shapes, seed=3, b_std=0.02)
    b = init_adapter(dict(reversed(list(shapes.items()))), seed=3, b_std=0.02)
    c = init_adapter(shapes, seed=4, b_std=0.02)
    assert list(a) == sorted(shapes) == list(b)
    for name in shapes:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], c[name]), name
        assert tuple(a[name].shape) == shapes[name] and a[name].dtype == torch.float32
    # A tensor's values depend on its own name only, not on the other names present.
    one = sorted(shapes)[5]
    alone = init_adapter({one: shapes[one]}, seed=3, b_std=0.02)
    assert torch.equal(alone[one], a[one])
    # Equal shapes under different names still get different values.
    q0 = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    q1 = q0.replace("layers.0", "layers.1")
    assert not torch.equal(a[q0], a[q1])


def test_init_adapter_distribution():
    """A ~ U(-1/sqrt(in), 1/sqrt(in)); B = 0, or N(0, b_std^2) when b_std > 0."""
    fan_in, r = 400, 50  # 20,000 samples: the moments are checked to a few standard errors
    shapes = {"m.x.lora_A.weight": (r, fan_in), "m.x.lora_B.weight": (fan_in, r)}
    out = init_adapter(shapes, seed=0)
    a = out["m.x.lora_A.weight"].double()
    bound = 1 / math.sqrt(fan_in)  # 0.05
    assert float(a.abs().max()) <= bound
    assert float(a.abs().max()) > 0.999 * bound  # the full range is used, not a narrower one
    assert abs(float(a.mean())) < 4 * bound / math.sqrt(3 * a.numel())
    # Uniform variance bound^2 / 3 = 8.333e-4; its sampling sd is about 0.5% here.
    assert float(a.var()) == pytest.approx(bound**2 / 3, rel=0.03)
    # A quarter of the mass in each quarter of the range.
    hist = torch.histc(a, bins=4, min=-bound, max=bound) / a.numel()
    assert hist.tolist() == pytest.approx([0.25] * 4, abs=0.015)
    assert torch.equal(out["m.x.lora_B.weight"], torch.zeros(fan_in, r))

    b = init_adapter(shapes, seed=0, b_std=0.3)["m.x.lora_B.weight"].double()
    assert abs(float(b.mean())) < 4 * 0.3 / math.sqrt(b.numel())
    assert float(b.std()) == pytest.approx(0.3, rel=0.03)
    assert torch.equal(init_adapter(shapes, seed=0, b_std=0.3)["m.x.lora_A.weight"], out["m.x.lora_A.weight"])


def test_init_adapter_rejects_non_lora_names():
    with pytest.raises(ValueError, match="not a LoRA tensor name: m.weight"):
        init_adapter({"m.weight": (2, 2)}, seed=0)


def test_freeze_lora_a_leaves_only_b_trainable(cfg):
    model = _fresh_peft(cfg)
    freeze_lora_a(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == EXPECTED_TENSORS // 2
    assert all(n.endswith(".lora_B.default.weight") for n in trainable)
    # B has r * out per projection: 4 * (64+32+32+64+128+128+64) * 2 layers = 4096.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4096


def test_saved_folder_loads_with_peft(cfg, peft_model, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    state = init_adapter(adapter_shapes(peft_model), seed=11, b_std=0.05)
    folder = save_peft_folder(tmp_path / "adapter", state, cfg.lora, base_model_name="tiny-base")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == "tiny-base"
    assert config["target_modules"] == target_regex(cfg.lora.targets)

    base = AutoModelForImageTextToText.from_pretrained(str(model_folder(cfg.model)))
    loaded = PeftModel.from_pretrained(base, str(folder))
    got = get_peft_model_state_dict(loaded)
    assert set(got) == set(state)
    for name in state:
        assert torch.equal(got[name].float(), state[name]), name
    lora_names = [n for n, _ in loaded.named_parameters() if "lora_" in n]
    assert len(lora_names) == EXPECTED_TENSORS and not any("visual" in n for n in lora_names)

    back = read_peft_folder(folder)
    assert list(back) == sorted(state)
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_read_peft_folder_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        read_peft_folder(tmp_path)


def test_meta_device_shapes_equal_the_attached_model(cfg, peft_model):
    shapes = adapter_shapes_for(cfg.model, cfg.lora)
    assert shapes == adapter_shapes(peft_model)
    assert len(shapes) == EXPECTED_TENSORS
    # A different rank changes every shape consistently.
    r8 = adapter_shapes_for(cfg.model, LoraSettings(r=8, alpha=16.0))
    for name, shape in shapes.items():
        expected = (8, shape[1]) if is_lora_a(name) else (shape[0], 8)
        assert r8[name] == expected, name


def test_with_zero_b_zeroes_only_lora_b():
    import torch

    from common.modeling.lora import with_zero_b

    state = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.ones(3, 2)}
    zero = with_zero_b(state)
    assert torch.equal(zero["x.lora_A.weight"], state["x.lora_A.weight"])
    assert torch.equal(zero["x.lora_B.weight"], torch.zeros(3, 2))
    assert torch.equal(state["x.lora_B.weight"], torch.ones(3, 2))  # the input is left as it was
