"""`fedclimb train-local`: one hospital's local DRPO on its own data, no Flower."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from client.trainer import EvalResult, LocalResult, LocalTrainer
from common.climb.records import load_records
from common.config import ConfigError, load_config
from common.modeling.loader import load_base_model
from common.modeling.lora import save_peft_folder
from common.modeling.policy import Policy

log = logging.getLogger(__name__)

__all__ = ["train_local_command", "format_domain_table"]


def format_domain_table(result: LocalResult, before: EvalResult | None, after: EvalResult | None) -> str:
    """Per-domain table: training use, reward, and held-out balanced accuracy before -> after."""
    domains = sorted(set(result.domain_stats) | set(after.domains if after else {}))
    head = f"{'domain':<24}{'records':>9}{'rollouts':>10}{'reward':>9}{'accuracy':>10}"
    if after is not None:
        head += f"{'test bal-acc before -> after':>32}"
    lines = [head, "-" * len(head)]
    for d in domains:
        s = result.domain_stats.get(d)
        row = f"{d:<24}{(s.records if s else 0):>9}{(s.rollouts if s else 0):>10}"
        row += f"{(s.mean_reward if s else 0):>9.3f}{(s.mean_accuracy if s else 0):>10.3f}"
        if after is not None:
            b = before.domains[d].balanced_accuracy if before and d in before.domains else float("nan")
            a = after.domains[d].balanced_accuracy if d in after.domains else float("nan")
            row += f"{b:>22.3f} -> {a:.3f}"
        lines.append(row)
    lines.append(
        f"{result.steps} steps: rollout {result.rollout_s:.1f} s, update {result.update_s:.1f} s, "
        f"mean reward {result.mean_reward:.3f}"
    )
    return "\n".join(lines)


def train_local_command(args: argparse.Namespace) -> int:
    """Run ``--steps`` local steps on ``--data`` and print a per-domain table."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"fedclimb: error: {exc}")
        return 2
    root = Path(args.data)
    if not root.is_dir():
        print(f"fedclimb: error: --data {root} is not a directory")
        return 2
    if cfg.privacy.enabled:
        log.warning("train-local runs without DP (privacy.* applies to federated rounds with a ledger)")
    t0 = time.perf_counter()
    bundle = load_base_model(cfg.model)
    policy = Policy(bundle, cfg.lora, freeze_a=cfg.aggregation.mode == "ffa")
    trainer = LocalTrainer(policy, cfg)
    train = trainer.usable(load_records(root, cfg.data.train_split, domain_key=cfg.data.domain_key,
                                        max_records=cfg.data.max_records))
    evaluation = [] if args.no_eval else trainer.usable(
        load_records(root, cfg.data.eval_split, domain_key=cfg.data.domain_key, max_records=cfg.data.max_records))
    print(f"{bundle.name}: {len(train)} training records, {len(evaluation)} evaluation records "
          f"(loaded in {time.perf_counter() - t0:.1f} s)")
    before = trainer.evaluate(evaluation, seed=args.seed, progress=True) if evaluation else None
    result = trainer.train(train, steps=args.steps, seed=args.seed, progress=True)
    after = trainer.evaluate(evaluation, seed=args.seed, progress=True) if evaluation else None
    print(format_domain_table(result, before, after))
    if args.out:
        save_peft_folder(args.out, result.adapter, cfg.lora, base_model_name=bundle.source)
        print(f"adapter written to {args.out}")
    return 0
