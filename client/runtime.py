"""What a hospital process keeps between rounds: the loaded model and its data.

Flower keeps ClientApp processes (simulation actors, SuperNode app processes) alive
across rounds, so the base model is loaded once per model configuration and the
records (with their decoded, tokenised prompts) once per hospital. Both caches are
keyed by everything that shapes their content.

Loading a hospital's records (:meth:`LocalTrainer.usable`) runs the same media checks as
``fedclimb data validate`` (every file decoded inside the data root and within the
``data.*`` limits, masks and boxes included) and leaves out each failing record with its
reason in the log, so no record can make a round fail when it is first sampled (a failed
round would tell the server that a bad record was drawn).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from client.site import Site
from client.trainer import LocalTrainer
from common.climb.records import Record, load_records
from common.config import FedClimbConfig, to_yaml
from common.modeling.loader import load_base_model
from common.modeling.policy import Policy

log = logging.getLogger(__name__)

__all__ = ["HospitalData", "Runtime", "RUNTIME"]


@dataclass
class HospitalData:
    """One hospital's usable records and the trainer that caches their prompts."""

    trainer: LocalTrainer
    train: list[Record]
    evaluation: list[Record]


def _key(*parts: object) -> str:
    return hashlib.sha256("\n".join(to_yaml(p) if hasattr(p, "__dataclass_fields__") else str(p) for p in parts).encode()).hexdigest()


class Runtime:
    """Caches of loaded policies and hospital data for this process."""

    def __init__(self, max_policies: int = 1) -> None:
        self.max_policies = max_policies
        self._policies: dict[str, Policy] = {}
        self._data: dict[str, HospitalData] = {}

    def _policy_key(self, cfg: FedClimbConfig) -> str:
        return _key(cfg.model, cfg.lora, cfg.aggregation.mode)

    def policy(self, cfg: FedClimbConfig) -> Policy:
        """The policy for ``cfg``'s model and LoRA settings (loaded on first use)."""
        key = self._policy_key(cfg)
        if key not in self._policies:
            if len(self._policies) >= self.max_policies:
                self._policies.clear()
                self._data.clear()
            bundle = load_base_model(cfg.model)
            self._policies[key] = Policy(bundle, cfg.lora, freeze_a=cfg.aggregation.mode == "ffa")
        return self._policies[key]

    def hospital_data(self, site: Site, cfg: FedClimbConfig) -> HospitalData:
        """Records of ``site`` (train split + evaluation split) with a trainer for ``cfg``."""
        key = _key(self._policy_key(cfg), site.name, cfg.data, cfg.prompt, cfg.federation.eval_max_records)
        hit = self._data.get(key)
        if hit is not None:
            hit.trainer.cfg = cfg  # hyper-parameters may change per round; prompts do not
            return hit
        policy = self.policy(cfg)
        trainer = LocalTrainer(policy, cfg)
        root = cfg.data.root
        train = trainer.usable(load_records(root, cfg.data.train_split, domain_key=cfg.data.domain_key,
                                            max_records=cfg.data.max_records, max_line_bytes=cfg.data.max_line_bytes))
        evaluation = trainer.usable(load_records(root, cfg.data.eval_split, domain_key=cfg.data.domain_key,
                                                 max_records=cfg.federation.eval_max_records,
                                                 max_line_bytes=cfg.data.max_line_bytes))
        log.info("%s: %d training and %d evaluation records", site.name, len(train), len(evaluation))
        hit = HospitalData(trainer, train, evaluation)
        self._data[key] = hit
        return hit


# The process-wide runtime used by the ClientApp.
RUNTIME = Runtime()
