"""Answer log-odds after every local step: how far one optimiser step moves a real model.

    python bench/real_model_steps.py --data runs/real-model5/data --out runs/steps-lr3e-4.jsonl --steps 12 train.lr=3e-4
    # about 25-40 s a step alone on 2 CPU cores (fp32, 8 prompts x 8 rollouts)

One hospital holding a whole ``fedclimb data from-table`` root (as built by
``bench/real_model.py``) trains SmolLM2-135M with local DRPO steps; before the first step and
after each one, the model's log p(Malignant) - log p(Benign) is scored on every validation
record. Each line of ``--out`` (JSON) holds the step, the mean log-odds per true answer, their
gap (what the model tells apart) and the AUC. A step that moves both means alike moved the
prior; only the gap and the AUC measure learning. ``key=value`` words override the settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ["model=smollm2-135m", "model.precision=fp32", "model.cpu_threads=2", "prompt.constrained=true",
            "rollout.num_rollouts=8", "rollout.batch_prompts=8", "rollout.temperature=1.0",
            "rollout.eval_batch_prompts=48"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a from-table root with train and valid splits")
    p.add_argument("--out", required=True, help="the JSON-lines file to write (replaced)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="key=value settings, after " + " ".join(SETTINGS))
    args = p.parse_args()

    from client.trainer import LocalTrainer, truth_labels
    from common.climb.records import load_records
    from common.config import load_config
    from common.modeling.loader import load_base_model
    from common.modeling.policy import Policy
    from simulation.evaluate import option_separations

    cfg = load_config(None, [*SETTINGS, *args.overrides])
    policy = Policy(load_base_model(cfg.model), cfg.lora, freeze_a=cfg.aggregation.mode == "ffa")
    trainer = LocalTrainer(policy, cfg)
    data = Path(args.data)
    train = trainer.usable(load_records(data, cfg.data.train_split, domain_key=cfg.data.domain_key))
    probe = trainer.usable(load_records(data, "valid", domain_key=cfg.data.domain_key))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    print(f"{len(train)} training records; scoring {len(probe)} validation records "
          f"({sum(1 for r in probe if 'malignant' in {t.lower() for t in truth_labels(r)})} malignant) after each step")
    t0 = time.perf_counter()

    def measure(step: int, reward: float | None) -> None:
        sep = next(iter(option_separations(probe, trainer.option_logprobs(probe)).values())) or {}
        means = sep.get("mean_score", {})
        labels = sep.get("labels", [])
        row = {"step": step, "training_reward": reward, "mean_log_odds": means, "auc": sep.get("auc"),
               "gap": means[labels[1]] - means[labels[0]] if len(means) == 2 else None,
               "seconds": round(time.perf_counter() - t0, 1)}
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    measure(0, None)
    trainer.train(train, steps=args.steps, seed=args.seed, on_step=lambda s: measure(s.step + 1, s.reward))


if __name__ == "__main__":
    main()
