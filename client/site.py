"""Who this hospital is, and the configuration it will actually train with.

The hospital's own settings (data path, state directory, privacy budget, limits) come
from its SuperNode's ``--node-config`` (``hospital-config="/etc/fedclimb/hospital.yaml"``),
never from the server. The server's run configuration and per-round instruction may tune
hyper-parameters, clamped to the hospital's limits; they can never raise the privacy
budget, change the data path or turn DP off where the hospital turned it on.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common import keys
from common.config import FedClimbConfig, HospitalConfig, load_hospital_config
from common.runconfig import SIM_AUTO, auto_run_dir

log = logging.getLogger(__name__)

__all__ = ["Site", "SiteError", "resolve_site", "effective_config", "NODE_HOSPITAL_CONFIG", "NODE_DATA_ROOT"]

# --node-config keys a SuperNode operator sets.
NODE_HOSPITAL_CONFIG = "hospital-config"
NODE_DATA_ROOT = "data-root"
NODE_STATE_DIR = "state-dir"
# Set by Flower's simulation engine for virtual SuperNodes.
NODE_PARTITION = "partition-id"


class SiteError(RuntimeError):
    """This SuperNode is not configured as a hospital."""


@dataclass(frozen=True)
class Site:
    """A hospital as this process sees it."""

    name: str
    hospital: HospitalConfig
    simulated: bool

    @property
    def state_dir(self) -> Path:
        return Path(self.hospital.state_dir)


def resolve_site(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], *, run_id: int = 0, cache: Path | None = None
) -> Site:
    """Find the hospital's settings from the node's own configuration.

    Order: ``hospital-config`` (a YAML file), then ``data-root`` (+ ``state-dir``) with
    default privacy settings, then — only for a virtual node of Flower's simulation
    engine — ``<sim-root>/hospital-<partition-id>/hospital.yaml`` written by
    ``fedclimb simulate``.
    """
    if NODE_HOSPITAL_CONFIG in node_config:
        hospital = load_hospital_config(str(node_config[NODE_HOSPITAL_CONFIG]))
        return Site(hospital.name, _checked(hospital), simulated=False)
    if NODE_DATA_ROOT in node_config:
        root = Path(str(node_config[NODE_DATA_ROOT]))
        state = Path(str(node_config.get(NODE_STATE_DIR, root.parent / f"{root.name}-fedclimb-state")))
        hospital = HospitalConfig(name=root.name, data_root=str(root), state_dir=str(state))
        return Site(hospital.name, _checked(hospital), simulated=False)
    sim_root = str(run_config.get("sim-root", "") or "")
    if NODE_PARTITION in node_config and sim_root:
        pid = int(node_config[NODE_PARTITION])
        if sim_root == SIM_AUTO:
            if cache is None:
                raise SiteError("sim-root=auto needs the model cache directory")
            sim_root = str(auto_run_dir(cache, run_id) / "hospitals")
        path = Path(sim_root) / f"hospital-{pid}" / "hospital.yaml"
        if not path.is_file():
            raise SiteError(f"simulated hospital {pid}: {path} not found (was the run started by `fedclimb simulate`?)")
        hospital = load_hospital_config(path)
        return Site(hospital.name, _checked(hospital), simulated=True)
    raise SiteError(
        "this SuperNode has no hospital settings: start it with "
        "--node-config 'hospital-config=\"/path/to/hospital.yaml\"' (see docs/deploy.md and configs/hospital.example.yaml)"
    )


def _checked(h: HospitalConfig) -> HospitalConfig:
    if not h.data_root:
        raise SiteError(f"hospital {h.name!r}: data_root is not set in its hospital config")
    if not Path(h.data_root).is_dir():
        raise SiteError(f"hospital {h.name!r}: data_root {h.data_root} is not a directory")
    if not h.state_dir:
        raise SiteError(f"hospital {h.name!r}: state_dir is not set; it holds the privacy ledger")
    Path(h.state_dir).mkdir(parents=True, exist_ok=True)
    return h


def _with_hparam(cfg: FedClimbConfig, dotted: str, value: Any) -> FedClimbConfig | None:
    """``cfg`` with one value replaced, type-checked and range-checked like a config file."""
    node = OmegaConf.structured(cfg)
    try:
        OmegaConf.update(node, dotted, value, merge=False)
        out = OmegaConf.to_object(node)
    except (OmegaConfBaseException, ValueError) as exc:
        log.warning("ignoring %s=%r from the server: %s", dotted, value, str(exc).splitlines()[0])
        return None
    assert isinstance(out, FedClimbConfig)
    return out


def effective_config(run_cfg: FedClimbConfig, site: Site, instruction: Mapping[str, Any]) -> FedClimbConfig:
    """The configuration this hospital trains with this round.

    Starts from the run configuration, applies the instruction's ``hp.*`` values that are
    tunable (others are ignored with a warning), clamps to the hospital's limits, and
    replaces privacy and data settings with the hospital's own.
    """
    cfg = copy.deepcopy(run_cfg)
    for key, value in instruction.items():
        if not key.startswith(keys.HPARAM_PREFIX):
            continue
        name = key[len(keys.HPARAM_PREFIX) :]
        if name not in keys.TUNABLE:
            log.warning("ignoring %s=%r from the server: not a tunable hyper-parameter", key, value)
            continue
        cfg = _with_hparam(cfg, name, value) or cfg
    lim = site.hospital.limits
    clamps = (
        ("train.steps", lim.max_local_steps),
        ("rollout.num_rollouts", lim.max_rollouts),
        ("rollout.batch_prompts", lim.max_batch_prompts),
        ("rollout.max_new_tokens", lim.max_new_tokens),
        ("train.lr", lim.max_lr),
        ("train.ppo_epochs", lim.max_ppo_epochs),
    )
    for dotted, bound in clamps:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value > bound:
            log.warning("%s=%s exceeds this hospital's limit %s; using the limit", dotted, value, bound)
            setattr(getattr(cfg, section), name, type(value)(bound))
    hospital = site.hospital
    cfg.privacy = copy.deepcopy(hospital.privacy)
    cfg.data.root = hospital.data_root
    cfg.data.domain_key = hospital.domain_key
    cfg.data.train_split, cfg.data.eval_split = hospital.train_split, hospital.eval_split
    cfg.data.max_records = hospital.max_train_records
    cfg.federation.eval_max_records = hospital.max_eval_records
    if site.hospital.device != "auto":
        cfg.model.device = site.hospital.device
    return cfg
