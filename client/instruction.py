"""Everything a hospital checks in a train or evaluate instruction before spending anything.

The checks run in this order, and the first failure refuses the whole instruction:

1. the instruction's values: ``server-round``, ``seed`` and ``planned-rounds`` are
   integers in range; ``wire-precision`` is known; ``only-lora-b`` is a bool; the
   domain names are distinct short strings and their counts and means are finite
   numbers, one per name;
2. the hyper-parameters: every tunable ``hp.*`` value is a finite number the
   configuration accepts (a finite value above the hospital's limit is clamped to it:
   client/site.py ``effective_config``), and no number of the run configuration is
   NaN or infinite;
3. the adapter's declarations, without decoding a byte: exactly this model's LoRA
   tensor names and shapes, each at the announced wire precision, and payload sizes
   that match (common/wire.py ``check_declared``);
4. the decoded adapter: every value finite.

A refusal raises :class:`InstructionError`; the ClientApp replies with
``keys.STATUS_REFUSED`` and nothing else. Nothing here touches the privacy ledger: it is
charged by client/rounds.py, after these checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from client.site import Site, effective_config
from common import keys
from common.config import ConfigError, FedClimbConfig
from common.wire import WIRE_ARRAYS, WireError, check_declared, decode_adapter, fp32_names

__all__ = ["InstructionError", "CheckedInstruction", "check_values", "check_instruction"]

#: Rounds (server round, planned rounds) a federation may announce.
MAX_ROUNDS = 1_000_000
#: Seeds are non-negative 63-bit integers (common/seeding.py).
MAX_SEED = (1 << 63) - 1
MAX_DOMAINS = 1000
MAX_DOMAIN_NAME_CHARS = 200
#: |N_d|: a sum over hospitals of DP-released unit counts (noise can make it negative).
MAX_DOMAIN_COUNT = 1e15
#: |mu_d|: a mean reward (-1 = not evaluated yet); rewards are weighted sums of scores in [0, 1].
MAX_DOMAIN_MEAN = 1e6

#: The shapes of this hospital's adapter for a configuration (name -> shape).
AdapterShapes = Callable[[FedClimbConfig], Mapping[str, tuple[int, ...]]]


class InstructionError(ValueError):
    """The server's instruction is refused before anything is spent; the message names why."""


@dataclass(frozen=True)
class CheckedInstruction:
    """An instruction that passed every check.

    Attributes
    ----------
    values : dict[str, Any]
        The instruction's values, checked (what ``client.rounds.instruction_from_config`` reads).
    cfg : FedClimbConfig
        The configuration of this round (client/site.py ``effective_config``).
    adapter : dict[str, torch.Tensor]
        The global adapter, fp32, every value finite.
    precision : str
        The wire precision of the reply.
    """

    values: dict[str, Any]
    cfg: FedClimbConfig
    adapter: dict[str, torch.Tensor]
    precision: str


def _integer(values: Mapping[str, Any], key: str, low: int, high: int, default: int | None) -> None:
    if key not in values:
        if default is None:
            raise InstructionError(f"{key}: missing")
        return
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InstructionError(f"{key}: must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InstructionError(f"{key}: must be in [{low}, {high}], got {value}")


def _numbers(values: Mapping[str, Any], key: str, length: int, bound: float) -> None:
    items = values.get(key, [])
    if not isinstance(items, list):
        raise InstructionError(f"{key}: must be a list of numbers, got {type(items).__name__}")
    if len(items) != length:
        raise InstructionError(f"{key}: has {len(items)} entries, expected {length} (one per domain name)")
    for i, x in enumerate(items):
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise InstructionError(f"{key}[{i}]: must be a number, got {type(x).__name__}")
        if not math.isfinite(x) or abs(x) > bound:
            raise InstructionError(f"{key}[{i}]: must be finite and within +-{bound:g}, got {x!r}")


def _domain_names(values: Mapping[str, Any]) -> int:
    names = values.get(keys.DOMAIN_NAMES, [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InstructionError(f"{keys.DOMAIN_NAMES}: must be a list of strings")
    if len(names) > MAX_DOMAINS:
        raise InstructionError(f"{keys.DOMAIN_NAMES}: {len(names)} names, at most {MAX_DOMAINS}")
    if any(not 0 < len(n) <= MAX_DOMAIN_NAME_CHARS for n in names) or len(set(names)) != len(names):
        raise InstructionError(
            f"{keys.DOMAIN_NAMES}: names must be distinct and 1-{MAX_DOMAIN_NAME_CHARS} characters long")
    return len(names)


def check_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check the instruction's own values (not ``hp.*``, not the adapter).

    Returns
    -------
    dict[str, Any]
        A copy of ``values``.

    Raises
    ------
    InstructionError
        Naming the first bad key.
    """
    _integer(values, keys.SERVER_ROUND, 0, MAX_ROUNDS, None)
    _integer(values, keys.SEED, 0, MAX_SEED, 0)
    _integer(values, keys.PLANNED_ROUNDS, 0, MAX_ROUNDS, 0)
    precision = values.get(keys.WIRE_PRECISION, "fp32")
    if not isinstance(precision, str) or precision not in WIRE_ARRAYS:
        raise InstructionError(f"{keys.WIRE_PRECISION}: must be one of {sorted(WIRE_ARRAYS)}, got {precision!r:.40}")
    if not isinstance(values.get(keys.ONLY_B, False), bool):
        raise InstructionError(f"{keys.ONLY_B}: must be a bool")
    n = _domain_names(values)
    _numbers(values, keys.DOMAIN_COUNT, n, MAX_DOMAIN_COUNT)
    _numbers(values, keys.DOMAIN_MEAN, n, MAX_DOMAIN_MEAN)
    return dict(values)


def check_instruction(
    content: RecordDict, *, run_cfg: FedClimbConfig, site: Site, adapter_shapes: AdapterShapes
) -> CheckedInstruction:
    """Check a train or evaluate Message's content; see the module docstring for the order.

    Parameters
    ----------
    content : RecordDict
        The Message's content: ``keys.CONFIG`` (instruction values) and ``keys.ARRAYS``
        (the global adapter).
    run_cfg : FedClimbConfig
        The run configuration.
    site : Site
        This hospital (its limits and settings).
    adapter_shapes : AdapterShapes
        This hospital's adapter names and shapes for the round's configuration.

    Raises
    ------
    InstructionError
        The first problem found.
    """
    values = check_values(dict(content.config_records.get(keys.CONFIG, ConfigRecord())))
    try:
        cfg = effective_config(run_cfg, site, values)
    except ConfigError as exc:
        raise InstructionError(str(exc)) from None
    if keys.ARRAYS not in content.array_records:
        raise InstructionError(f"the instruction carries no {keys.ARRAYS!r} record (the global adapter)")
    record = content.array_records[keys.ARRAYS]
    precision = str(values.get(keys.WIRE_PRECISION, "fp32"))
    shapes = adapter_shapes(cfg)
    try:
        check_declared(record, shapes, precision, exact=fp32_names(shapes, bool(values.get(keys.ONLY_B))))
        adapter = {name: t.float() for name, t in decode_adapter(record).items()}
    except WireError as exc:
        raise InstructionError(f"adapter: {exc}") from None
    for name, tensor in adapter.items():
        if not bool(torch.isfinite(tensor).all()):
            raise InstructionError(f"adapter: tensor {name!r} holds NaN or infinite values")
    return CheckedInstruction(values, cfg, adapter, precision)
