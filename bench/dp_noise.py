"""Cost of cryptographic DP noise: ChaCha20 + Box-Muller time as a fraction of a DP step.

    .venv/bin/python bench/dp_noise.py --preset tiny

The DP update of bench/dp_overhead.py (fixed rollout batch, 8 prompts x 2 rollouts, LoRA
r = 16, Opacus per-row gradients, clipping, noise) is run ``--repeats`` times with every
``NoiseSource.standard_normal`` call (ChaCha20 keystream + Box-Muller) timed. It prints the
noise time per update, the update time, their ratio (target: noise <= 10% of a DP step)
and, for comparison, torch's Mersenne Twister ``randn`` for the same number of values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--data", default="")
    args = p.parse_args()
    from dp_overhead import bench_data

    args.data = args.data or bench_data()

    import torch

    from common.privacy.noise import NoiseSource
    from dp_overhead import run_update, setup

    torch.set_num_threads(1)
    bundle, policy, trainer, records, rollouts, adv, opt, settings = setup(
        args.preset, True, args.rank, args.prompts, args.data
    )
    spent = [0.0]
    drawn = [0]
    real_normal = NoiseSource.standard_normal

    def timed_normal(self: NoiseSource, size: int | tuple[int, ...]):  # noqa: ANN202
        t0 = time.perf_counter()
        out = real_normal(self, size)
        spent[0] += time.perf_counter() - t0
        drawn[0] += out.size
        return out

    NoiseSource.standard_normal = timed_normal  # type: ignore[method-assign]
    step_s, noise_s = [], []
    for i in range(args.repeats + 1):
        spent[0], drawn[0] = 0.0, 0
        t0 = time.perf_counter()
        run_update(trainer, rollouts, adv, opt, settings, len(records))
        if i:  # the first call warms up
            step_s.append(time.perf_counter() - t0)
            noise_s.append(spent[0])
    NoiseSource.standard_normal = real_normal  # type: ignore[method-assign]
    values = drawn[0]
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        torch.randn(values, dtype=torch.float64)
    mt_s = (time.perf_counter() - t0) / args.repeats
    fractions = [n / s for n, s in zip(noise_s, step_s, strict=True)]
    out = {
        "preset": args.preset, "device": str(bundle.device), "trainable": values,
        "step_median_s": statistics.median(step_s), "noise_median_s": statistics.median(noise_s),
        "noise_fraction_median": statistics.median(fractions), "noise_fraction_max": max(fractions),
        "torch_mt_randn_s": mt_s,
    }
    print(json.dumps(out, indent=2))
    print(f"{args.preset}: ChaCha20 noise {out['noise_median_s'] * 1e3:.1f} ms of a {out['step_median_s'] * 1e3:.0f} ms "
          f"DP step = {100 * out['noise_fraction_median']:.1f}% by median (max {100 * out['noise_fraction_max']:.1f}%; "
          f"target <= 10%); torch Mersenne Twister randn of the same {values} values: {mt_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
