"""GPU smoke run: bf16, a larger random-init Qwen2.5-VL, one DRPO round with and without DP.

    python bench/gpu_smoke.py --out results.json [--hidden 1024 --layers 8]
    python bench/gpu_smoke.py --model qwen7b --out qwen7b.json       # the 7B architecture, random weights
    python bench/gpu_smoke.py --model qwen7b --device cpu --width-divisor 8 --layers 2 --vision-depth 8 \
        --steps 1 --prompts 2 --rollouts 2 --new-tokens 32              # the 7B preset's code path on a CPU

``--model qwen7b`` runs the ``qwen2_5_vl_7b`` preset (gradient checkpointing, 65,536 to
524,288-pixel images, LoRA r = 16, micro-batches of 2) on a random-init model with the
published Qwen2.5-VL-7B architecture (common/modeling/qwen7b.py), widths divided by
``--width-divisor`` and depths as given.

Runs the hospital's real round function (client.rounds.train_round: privacy plan, DP-SGD
with exact per-unit gradients, ledger) on a synthetic hospital, free-form generation,
then an evaluation. Prints and writes timings, generated tokens per second, peak GPU
memory and the DP/non-DP update ratio. Nothing is downloaded: the model is built from a
config and the data are generated.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="gpu_smoke.json")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=None, help="text layers (default: 8 for tiny, 28 for qwen7b)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--rollouts", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda", help="cuda (the point) or cpu (a quick local check)")
    p.add_argument("--model", choices=("tiny", "qwen7b"), default="tiny",
                   help="tiny: the tiny builder at --hidden/--layers; qwen7b: the 7B preset on its architecture")
    p.add_argument("--width-divisor", type=int, default=1, help="qwen7b: divide every width by this")
    p.add_argument("--vision-depth", type=int, default=32, help="qwen7b: vision tower depth (published: 32)")
    args = p.parse_args()

    import torch

    from client.rounds import Instruction, evaluate_round, train_round
    from client.runtime import Runtime
    from client.site import Site, effective_config
    from common.config import HospitalConfig, load_config
    from common.modeling.lora import init_adapter
    from common.modeling.shapes import adapter_shapes_for
    from simulation.synth import generate_federation

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; use --device cpu for a local check")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak_gib() -> float:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0
    work = Path(tempfile.mkdtemp(prefix="fedclimb-gpu-"))
    t0 = time.perf_counter()
    generate_federation(work / "fed", hospitals=1, seed=0, scale=1.0)
    common_words = [
        f"model.cache_dir={work / 'cache'}", "model.precision=auto", f"model.device={args.device}", "model.cpu_threads=0",
        "prompt.constrained=false", f"rollout.num_rollouts={args.rollouts}", f"rollout.batch_prompts={args.prompts}",
        f"rollout.max_new_tokens={args.new_tokens}", "rollout.temperature=1.0", f"train.steps={args.steps}",
        "train.kl_coef=0.0001", "privacy.secure_rng=true",
    ]
    if args.model == "qwen7b":
        from common.modeling.qwen7b import build_qwen7b_folder

        folder = build_qwen7b_folder(work / "qwen7b", width_divisor=args.width_divisor, layers=args.layers or 28,
                                     vision_depth=args.vision_depth)
        words = ["model=qwen2_5_vl_7b", f"model.name_or_path={folder}", *common_words]
    else:
        half = args.hidden // args.heads // 2  # rotary half-dim; Qwen2.5-VL's (t, h, w) split
        t_sec = half // 4
        h_sec = (half - t_sec) // 2
        mrope = [t_sec, h_sec, half - t_sec - h_sec]
        words = [
            *common_words,
            f"model.tiny.hidden_size={args.hidden}", f"model.tiny.intermediate_size={args.hidden * 11 // 4}",
            f"model.tiny.num_hidden_layers={args.layers or 8}", f"model.tiny.num_attention_heads={args.heads}",
            f"model.tiny.num_key_value_heads={max(args.heads // 4, 1)}", f"model.tiny.mrope_section=[{','.join(map(str, mrope))}]",
            "model.tiny.vision_depth=4", "model.tiny.vision_hidden_size=256", "model.tiny.vision_intermediate_size=1024",
            "model.tiny.vision_num_heads=4", "model.tiny.vocab_size=4096", "model.tiny.initializer_range=0.02",
            "model.min_pixels=50176", "model.max_pixels=50176", "train.micro_batch=8", "lora.r=16", "lora.alpha=32",
        ]
    base = load_config(overrides=words)
    runtime = Runtime()
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                     "args": vars(args)}
    for dp in (False, True):
        state = work / f"state-{'dp' if dp else 'plain'}"
        state.mkdir()
        hospital = HospitalConfig(name="gpu-hospital", data_root=str(work / "fed" / "hospital-0"), state_dir=str(state))
        hospital.privacy.enabled = dp
        hospital.privacy.target_epsilon = 8.0
        hospital.privacy.planned_rounds = 1  # required under DP (the hospital's own plan)
        hospital.privacy.eval_release = "exact"  # a benchmark: exact metrics, not a DP release
        site = Site("gpu-hospital", hospital, True)
        cfg = effective_config(base, site, {})
        adapter = init_adapter(adapter_shapes_for(cfg.model, cfg.lora), seed=0)
        ins = Instruction(server_round=1, seed=0, planned_rounds=1, domain_names=["synth_cxr", "synth_derm", "synth_ecg", "synth_labs"])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        out = train_round(runtime, site, cfg, ins, adapter)
        sync()
        t2 = time.perf_counter()
        ev = evaluate_round(runtime, site, cfg, ins, out.adapter or adapter)
        t3 = time.perf_counter()
        policy = runtime.policy(cfg)
        key = "dp" if dp else "plain"
        results[key] = {
            "status": out.status,
            "round_s": round(t2 - t1, 2),
            "rollout_s": round(out.local["rollout_s"], 2),  # hospital-side timings (never sent under DP)
            "update_s": round(out.local["update_s"], 2),
            "eval_s": round(t3 - t2, 2),
            "epsilon": out.metrics.get("dp.epsilon"),
            "noise_multiplier": out.metrics.get("dp.noise-multiplier"),
            "peak_gpu_gib": peak_gib(),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "eval_records": ev.metrics.get("num-examples"),
        }
        results["model_params"] = sum(p.numel() for p in policy.peft.parameters())
        results["lora_params"] = sum(p.numel() for p in policy.trainable_parameters())
        print(key, json.dumps(results[key]), flush=True)
    # generation throughput on the trained policy
    policy = runtime.policy(cfg)
    data = runtime.hospital_data(site, cfg)
    prompts = [data.trainer.encode(r) for r in data.train[: args.prompts]]
    policy.generate(prompts, num_rollouts=args.rollouts, temperature=1.0, max_new_tokens=8, seed=0)
    sync()
    t4 = time.perf_counter()
    ro = policy.generate(prompts, num_rollouts=args.rollouts, temperature=1.0,
                         max_new_tokens=args.new_tokens, seed=1)
    sync()
    gen_s = time.perf_counter() - t4
    results["generation"] = {"rows": ro.num_rows, "tokens": int(ro.mask.sum()), "seconds": round(gen_s, 3),
                             "tokens_per_s": round(float(ro.mask.sum()) / gen_s, 1)}
    results["dp_over_plain_update"] = round(results["dp"]["update_s"] / results["plain"]["update_s"], 2)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
