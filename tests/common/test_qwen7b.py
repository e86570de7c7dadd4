"""The qwen2_5_vl_7b preset's code path on the published 7B architecture, narrowed.

Its weights cannot be had here; the model is built from the published config with only
widths and depths reduced, loaded through the preset (model.source=hf, gradient
checkpointing, 65,536-524,288-pixel images, LoRA r = 16) and trained one DP round by the
hospital's real round function.
"""

from __future__ import annotations

import torch

from common.modeling.qwen7b import QWEN2_5_VL_7B_TEXT, QWEN2_5_VL_7B_VISION, build_qwen7b_folder, qwen7b_config

KEPT_TEXT = ("vocab_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
             "hidden_act", "tie_word_embeddings")
KEPT_VISION = ("num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size", "window_size", "hidden_act",
               "tokens_per_second")


def test_full_size_is_the_published_architecture():
    c = qwen7b_config()
    t, v = c.text_config, c.vision_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", *KEPT_TEXT):
        assert getattr(t, key) == QWEN2_5_VL_7B_TEXT[key], key
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and t.rope_parameters["rope_theta"] == 1e6
    for key in ("depth", "hidden_size", "intermediate_size", "out_hidden_size", "fullatt_block_indexes", *KEPT_VISION):
        assert getattr(v, key) == QWEN2_5_VL_7B_VISION[key], key
    assert (c.image_token_id, c.vision_start_token_id) == (151655, 151652)


def test_reduced_keeps_everything_but_widths_and_depths():
    c = qwen7b_config(width_divisor=8, layers=2, vision_depth=8)
    t, v = c.text_config, c.vision_config
    for key in KEPT_TEXT:
        assert getattr(t, key) == QWEN2_5_VL_7B_TEXT[key], key
    for key in KEPT_VISION:
        assert getattr(v, key) == QWEN2_5_VL_7B_VISION[key], key
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (448, 2368, 2)
    head_dim = 448 // 28
    assert sum(t.rope_parameters["mrope_section"]) == head_dim // 2  # (t, h, w) sections fill half a head
    assert v.hidden_size == 128 and v.out_hidden_size == 448  # 1280 / 8 rounded to 4 x 16 heads
    assert v.fullatt_block_indexes == [1, 3, 5, 7]  # a full-attention block every quarter, as 7, 15, 23, 31 of 32


def test_one_dp_round_through_the_preset(tmp_path):
    from client.rounds import Instruction, train_round
    from client.runtime import Runtime
    from client.site import Site, effective_config
    from common.config import HospitalConfig, load_config
    from common.modeling.lora import init_adapter
    from common.modeling.shapes import adapter_shapes_for
    from simulation.synth import generate_federation

    torch.set_num_threads(1)
    root = generate_federation(tmp_path / "fed", hospitals=1, seed=0, scale=0.25).hospital_roots[0]
    folder = build_qwen7b_folder(tmp_path / "qwen7b", width_divisor=16, layers=1, vision_depth=4)
    base = load_config(overrides=["model=qwen2_5_vl_7b", f"model.name_or_path={folder}", "model.device=cpu",
                                  f"model.cache_dir={tmp_path / 'cache'}", "rollout.num_rollouts=2",
                                  "rollout.batch_prompts=2", "rollout.max_new_tokens=6", "train.steps=1"])
    assert base.model.gradient_checkpointing and base.lora.r == 16 and base.model.min_pixels == 65536
    (tmp_path / "state").mkdir()
    hospital = HospitalConfig(name="h", data_root=str(root), state_dir=str(tmp_path / "state"), max_eval_records=4)
    hospital.privacy.planned_rounds = 1
    hospital.privacy.target_epsilon = 8.0
    site = Site("h", hospital, True)
    cfg = effective_config(base, site, {})
    start = init_adapter(adapter_shapes_for(cfg.model, cfg.lora), seed=0, b_std=0.01)
    out = train_round(Runtime(), site, cfg, Instruction(server_round=1, domain_names=["synth_cxr", "synth_labs"]), start)
    assert out.status == 0, out.message
    assert 0 < out.metrics["dp.epsilon"] <= 8.0
    assert set(out.adapter) == set(start)
    assert any(not torch.equal(out.adapter[k], start[k]) for k in start)
    assert all(torch.isfinite(v).all() for v in out.adapter.values())
