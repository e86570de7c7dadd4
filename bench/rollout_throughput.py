"""Rollout throughput and the rollout / update time split of local DRPO steps.

    .venv/bin/python bench/rollout_throughput.py --preset tiny --steps 5
    .venv/bin/python bench/rollout_throughput.py --preset smollm2-135m --steps 3

Prints generated tokens per second (free-form generation, K rollouts per prompt, KV cache)
and how a local step's time splits between rollout (generation, scoring, reference
pass) and update (forward/backward, optimiser).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import torch

    from client.trainer import LocalTrainer
    from common.climb.records import load_records
    from common.config import load_config
    from common.modeling.loader import load_base_model
    from common.modeling.policy import Policy
    from simulation.synth import generate_federation

    root = Path(os.environ.get("TMPDIR", "/tmp")) / "fedclimb-bench-data"
    if not (root / "federation.json").is_file():
        generate_federation(root, hospitals=1, seed=0, scale=0.25, overwrite=True)
    cfg = load_config(overrides=[f"model={args.preset}", "privacy=off", f"rollout.batch_prompts={args.prompts}",
                                 f"rollout.num_rollouts={args.rollouts}", f"rollout.max_new_tokens={args.new_tokens}",
                                 "prompt.constrained=false", *args.overrides])
    t0 = time.perf_counter()
    bundle = load_base_model(cfg.model)
    load_s = time.perf_counter() - t0
    policy = Policy(bundle, cfg.lora)
    trainer = LocalTrainer(policy, cfg)
    records = [r for r in load_records(root / "hospital-0", "train") if bundle.multimodal or not r.images]
    records = trainer.usable(records[: 4 * args.prompts])
    # generation alone: tokens per second
    prompts = [trainer.encode(r) for r in records[: args.prompts]]
    policy.generate(prompts, num_rollouts=args.rollouts, temperature=0.7, max_new_tokens=8, seed=0)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    ro = policy.generate(prompts, num_rollouts=args.rollouts, temperature=0.7,
                         max_new_tokens=args.new_tokens, seed=1)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t1
    tokens = int(ro.mask.sum())
    # whole local steps
    result = trainer.train(records, steps=args.steps, seed=0)
    total = result.rollout_s + result.update_s
    print(f"{bundle.name} on {bundle.device}: load {load_s:.1f} s")
    print(f"generation: {tokens} tokens in {gen_s:.2f} s = {tokens / gen_s:.0f} tokens/s "
          f"({args.prompts} prompts x {args.rollouts} rollouts, up to {args.new_tokens} new tokens)")
    print(f"{args.steps} local steps: rollout {result.rollout_s:.2f} s ({100 * result.rollout_s / total:.0f}%), "
          f"update {result.update_s:.2f} s ({100 * result.update_s / total:.0f}%), "
          f"{total / args.steps:.2f} s per step")


if __name__ == "__main__":
    main()
