"""DP-SGD update cost: DP step time / non-DP step time, and peak memory ratio.

    .venv/bin/python bench/dp_overhead.py --preset tiny
    .venv/bin/python bench/dp_overhead.py --preset smollm2-135m

Fixed rollout batch (8 prompts, LoRA r=16 by default), the same update run with and
without DP-SGD (Opacus per-row gradients, per-unit clipping, noise); each mode runs in
its own process so that peak memory is measured separately (max RSS on CPU, peak
allocated on CUDA). Targets (issue 4): <= 1.3x time, <= 1.5x memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def setup(preset: str, dp: bool, rank: int, prompts: int, data: str, overrides: Sequence[str] = ()) -> tuple:
    """A trainer, a fixed rollout batch and the arguments of one update (DP or plain).

    Returns ``(bundle, policy, trainer, records, rollouts, adv, opt, settings)``; one update
    is ``run_update(trainer, rollouts, adv, opt, settings, len(records))``. ``overrides``
    (config words) come last. Also used by bench/dp_noise.py and bench/perf.py.
    """
    import torch

    from client.dp_step import DPSettings, DPUpdater
    from client.trainer import LocalTrainer
    from common.climb.records import load_records
    from common.config import load_config
    from common.modeling.loader import load_base_model
    from common.modeling.policy import Policy
    from common.privacy.noise import NoiseSource

    cfg = load_config(overrides=[f"model={preset}", "privacy=off", f"lora.r={rank}", f"lora.alpha={2 * rank}",
                                 f"rollout.batch_prompts={prompts}", "rollout.num_rollouts=2",
                                 "rollout.max_new_tokens=16", "train.kl_coef=0", f"train.micro_batch={prompts}",
                                 "aggregation.mode=fedit", *overrides])
    bundle = load_base_model(cfg.model)
    policy = Policy(bundle, cfg.lora)
    trainer = LocalTrainer(policy, cfg)
    records = trainer.usable([r for r in load_records(data, "train") if bundle.multimodal or not r.images])[:prompts]
    rollouts = policy.generate([trainer.encode(r) for r in records], num_rollouts=2, temperature=1.0,
                               max_new_tokens=16, seed=0)
    adv = torch.linspace(-1, 1, rollouts.num_rows)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    settings = DPSettings(1.0, 0.5, 1.0, "record", NoiseSource.secure()) if dp else None
    if dp:
        updater = DPUpdater.for_policy(policy)
        updater._num_units = prompts * 2  # noqa: SLF001 - expected batch = q * N = prompts
        trainer._dp_updater = updater  # noqa: SLF001
    return bundle, policy, trainer, records, rollouts, adv, opt, settings


def run_update(trainer, rollouts, adv, opt, settings, num_records: int) -> None:  # noqa: ANN001
    """One update on the fixed batch (``_update`` with or without an ``old_logp`` argument)."""
    import inspect

    prompts = list(range(num_records))
    if "old_logp" in inspect.signature(trainer._update).parameters:  # noqa: SLF001
        trainer._update(rollouts, adv, None, None, opt, settings, prompts, num_records)  # noqa: SLF001
    else:
        trainer._update(rollouts, adv, None, opt, settings, prompts, num_records)  # noqa: SLF001


def _measure(preset: str, dp: bool, rank: int, prompts: int, repeats: int, data: str) -> dict:
    import torch

    bundle, policy, trainer, records, rollouts, adv, opt, settings = setup(preset, dp, rank, prompts, data)
    cuda = bundle.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_update(trainer, rollouts, adv, opt, settings, len(records))
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"preset": preset, "dp": dp, "median_s": statistics.median(times), "min_s": min(times),
            "peak_bytes": peak, "device": str(bundle.device), "trainable": sum(p.numel() for p in policy.trainable_parameters())}


def bench_data() -> str:
    """A small synthetic hospital, generated once under $TMPDIR."""
    from simulation.synth import generate_federation

    root = Path(os.environ.get("TMPDIR", "/tmp")) / "fedclimb-bench-data"
    if not (root / "federation.json").is_file():
        generate_federation(root, hospitals=1, seed=0, scale=0.25, overwrite=True)
    return str(root / "hospital-0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data", default="")
    p.add_argument("--mode", choices=("dp", "plain"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data = args.data or bench_data()
    if args.mode:
        print(json.dumps(_measure(args.preset, args.mode == "dp", args.rank, args.prompts, args.repeats, args.data)))
        return
    out = {}
    for mode in ("plain", "dp"):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--rank", str(args.rank), "--prompts",
               str(args.prompts), "--repeats", str(args.repeats), "--data", args.data, "--mode", mode]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    # The minimum over repeats is the least disturbed by other load on a shared machine.
    ratio_t = out["dp"]["min_s"] / out["plain"]["min_s"]
    ratio_med = out["dp"]["median_s"] / out["plain"]["median_s"]
    ratio_m = out["dp"]["peak_bytes"] / out["plain"]["peak_bytes"]
    print(json.dumps(out, indent=2))
    print(f"{args.preset} r={args.rank} batch={args.prompts}: DP/plain update time {ratio_t:.2f}x by minimum "
          f"({ratio_med:.2f}x by median; target <= 1.3x), peak memory {ratio_m:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
