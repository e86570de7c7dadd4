"""Who this hospital is, and the configuration it will actually train with.

The hospital's own settings (data path, state directory, privacy budget, limits) come
from its SuperNode's ``--node-config`` (``hospital-config="/etc/fedclimb/hospital.yaml"``),
never from the server. Only on a simulation engine (Flower's, or fedclimb's in-process
one), where one person runs the server and every virtual hospital, may the run
configuration's ``sim-root`` say where the virtual hospitals' settings are. The server's
run configuration and per-round instruction may tune hyper-parameters, clamped to the
hospital's limits; they can never raise the privacy budget, change the data path or turn
DP off where the hospital turned it on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common import keys
from common.config import ConfigError, FedClimbConfig, HospitalConfig, HospitalLimits, load_hospital_config
from common.runconfig import SIM_AUTO, auto_run_dir

log = logging.getLogger(__name__)

__all__ = ["Site", "SiteError", "resolve_site", "effective_config", "on_simulation_engine", "in_process_engine",
           "LIMITED_KEYS", "limit_clamps", "limited_values",
           "NODE_HOSPITAL_CONFIG", "NODE_DATA_ROOT", "NODE_STATE_DIR"]

# --node-config keys a SuperNode operator sets.
NODE_HOSPITAL_CONFIG = "hospital-config"
NODE_DATA_ROOT = "data-root"
NODE_STATE_DIR = "state-dir"
# Set by Flower's simulation engine for virtual SuperNodes (an operator can set it too:
# it says nothing about where the ClientApp runs).
NODE_PARTITION = "partition-id"

#: The Ray actor method in which Flower 1.42's simulation engine calls a ClientApp.
FLOWER_SIMULATION_TASK = "flwr.simulation.ray_transport.ray_actor.ClientAppActor.run"
_IN_PROCESS_ENGINE: ContextVar[bool] = ContextVar("fedclimb_in_process_engine", default=False)


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


@contextlib.contextmanager
def in_process_engine() -> Iterator[None]:
    """ClientApp calls made inside this block come from fedclimb's in-process engine.

    ``simulation/inprocess.py`` wraps its deliveries in it. It is process-local state: no
    Message, run configuration or node configuration can set it.
    """
    token = _IN_PROCESS_ENGINE.set(True)
    try:
        yield
    finally:
        _IN_PROCESS_ENGINE.reset(token)


def on_simulation_engine() -> bool:
    """True when this ClientApp call comes from a simulation engine, never on a SuperNode.

    Flower's simulation engine calls the ClientApp inside the Ray actor method
    ``FLOWER_SIMULATION_TASK``; a SuperNode's ClientApp process never starts Ray. The
    ``partition-id``/``num-partitions`` node-config keys the engine sets are no signal:
    any SuperNode operator can set them (Flower's own examples do).
    """
    if _IN_PROCESS_ENGINE.get():
        return True
    ray = sys.modules.get("ray")  # never imported here: a process without Ray is no engine
    if ray is None or not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return False
    return bool(context.get_task_function_name() == FLOWER_SIMULATION_TASK)


def resolve_site(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], *, run_id: int = 0, cache: Path | None = None
) -> Site:
    """Find the hospital's settings from the node's own configuration.

    Order: ``hospital-config`` (a YAML file), then ``data-root`` + ``state-dir`` with
    default privacy settings and limits, then — only when :func:`on_simulation_engine` —
    ``<sim-root>/hospital-<partition-id>/hospital.yaml`` written by ``fedclimb simulate``.
    Anywhere else a node without its own settings refuses to start, whatever the run
    configuration says.
    """
    if NODE_HOSPITAL_CONFIG in node_config:
        hospital = load_hospital_config(str(node_config[NODE_HOSPITAL_CONFIG]))
        return Site(hospital.name, _checked(hospital), simulated=False)
    if NODE_DATA_ROOT in node_config:
        if NODE_STATE_DIR not in node_config:
            raise SiteError(
                f"--node-config sets {NODE_DATA_ROOT} but not {NODE_STATE_DIR}: name the directory that keeps this "
                f"hospital's privacy ledger ({NODE_STATE_DIR}=\"/var/lib/fedclimb\"), or use "
                f"{NODE_HOSPITAL_CONFIG}=\"/path/to/hospital.yaml\""
            )
        root = Path(str(node_config[NODE_DATA_ROOT]))
        state = Path(str(node_config[NODE_STATE_DIR]))
        hospital = HospitalConfig(name=root.name, data_root=str(root), state_dir=str(state))
        log.warning("%s: no hospital-config; using the default privacy settings (DP on, target epsilon %s, "
                    "delta %s) and limits of common.config.HospitalConfig", hospital.name,
                    hospital.privacy.target_epsilon, hospital.privacy.delta)
        return Site(hospital.name, _checked(hospital), simulated=False)
    if not on_simulation_engine():
        raise SiteError(
            "this SuperNode has no hospital settings: start it with "
            "--node-config 'hospital-config=\"/path/to/hospital.yaml\"' (see docs/deploy.md and "
            "configs/hospital.example.yaml); outside a simulation engine the run configuration "
            "(sim-root) never chooses a hospital's settings"
        )
    return _simulated_site(node_config, run_config, run_id=run_id, cache=cache)


def _simulated_site(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], *, run_id: int, cache: Path | None
) -> Site:
    """A virtual hospital of ``fedclimb simulate`` (only ever called on a simulation engine)."""
    sim_root = str(run_config.get("sim-root", "") or "")
    if NODE_PARTITION not in node_config or not sim_root:
        raise SiteError("a virtual SuperNode needs the run configuration's sim-root (set by `fedclimb simulate`)")
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


def _checked(h: HospitalConfig) -> HospitalConfig:
    if not h.data_root:
        raise SiteError(f"hospital {h.name!r}: data_root is not set in its hospital config")
    if not Path(h.data_root).is_dir():
        raise SiteError(f"hospital {h.name!r}: data_root {h.data_root} is not a directory")
    if not h.state_dir:
        raise SiteError(f"hospital {h.name!r}: state_dir is not set; it holds the privacy ledger")
    Path(h.state_dir).mkdir(parents=True, exist_ok=True)
    return h


def _with_hparam(cfg: FedClimbConfig, dotted: str, value: Any) -> FedClimbConfig:
    """``cfg`` with one server-sent value replaced, type- and range-checked like a config file.

    Raises
    ------
    ConfigError
        If ``value`` is not a finite number or the configuration's own checks refuse it
        (e.g. ``rollout.temperature`` <= 0).
    """
    key = keys.HPARAM_PREFIX + dotted
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be finite, got {value!r}")
    node = OmegaConf.structured(cfg)
    try:
        OmegaConf.update(node, dotted, value, merge=False)
        out = OmegaConf.to_object(node)
    except (OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None
    assert isinstance(out, FedClimbConfig)
    return out


def _non_finite(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of the non-finite floats anywhere in a config dataclass."""
    bad = []
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            bad += _non_finite(value, name + ".")
        items = value if isinstance(value, list) else [value]
        bad += [name for x in items if isinstance(x, float) and not math.isfinite(x)]
    return bad


#: The run settings a hospital's limits bound: (dotted key, HospitalLimits field).
LIMITED_KEYS: tuple[tuple[str, str], ...] = (
    ("train.steps", "max_local_steps"),
    ("rollout.num_rollouts", "max_rollouts"),
    ("rollout.batch_prompts", "max_batch_prompts"),
    ("rollout.max_new_tokens", "max_new_tokens"),
    ("train.lr", "max_lr"),
    ("train.ppo_epochs", "max_ppo_epochs"),
    ("rollout.temperature", "max_temperature"),
    ("train.kl_coef", "max_kl_coef"),
)


def limited_values(cfg: FedClimbConfig) -> dict[str, Any]:
    """The values of ``cfg`` that a hospital's limits bound (what the coordinator asks for)."""
    return {dotted: getattr(getattr(cfg, dotted.split(".")[0]), dotted.split(".")[1]) for dotted, _ in LIMITED_KEYS}


def limit_clamps(cfg: FedClimbConfig, limits: HospitalLimits) -> list[tuple[str, Any, Any]]:
    """(dotted key, asked value, limit) for each value of ``cfg`` above the hospital's limit."""
    asked = limited_values(cfg)
    return [(dotted, asked[dotted], getattr(limits, field_name)) for dotted, field_name in LIMITED_KEYS
            if asked[dotted] > getattr(limits, field_name)]


def effective_config(run_cfg: FedClimbConfig, site: Site, instruction: Mapping[str, Any]) -> FedClimbConfig:
    """The configuration this hospital trains with this round.

    Starts from the run configuration, applies the instruction's ``hp.*`` values that are
    tunable (others are ignored with a warning), clamps to the hospital's limits, and
    replaces privacy and data settings with the hospital's own.

    Raises
    ------
    ConfigError
        If a tunable value is not a finite number or out of its valid range, or any
        number of the run configuration is not finite. A finite value above one of
        the hospital's limits is not an error: the limit is used.
    """
    cfg = copy.deepcopy(run_cfg)
    for key, value in instruction.items():
        if not key.startswith(keys.HPARAM_PREFIX):
            continue
        name = key[len(keys.HPARAM_PREFIX) :]
        if name not in keys.TUNABLE:
            log.warning("ignoring %s=%r from the server: not a tunable hyper-parameter", key, value)
            continue
        cfg = _with_hparam(cfg, name, value)
    bad = _non_finite(cfg)
    if bad:
        raise ConfigError(f"{bad[0]}: must be finite ({len(bad)} non-finite value(s) in the run configuration)")
    for dotted, value, bound in limit_clamps(cfg, site.hospital.limits):
        section, name = dotted.split(".")
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
