"""The hospital's Flower ClientApp: thin glue between Messages and client/rounds.py.

Every instruction is checked whole (client/instruction.py) before anything is spent;
an evaluation also needs room in the hospital's evaluation limits (client/evaluations.py).
Replies carry only adapter tensors and the whitelisted numeric metrics of common/keys.py;
a refused or failed instruction gets a status code and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.evaluations import admit_evaluation
from client.instruction import CheckedInstruction, InstructionError, check_instruction
from client.privacy_round import evaluation_withheld
from client.rounds import evaluate_round, instruction_from_config, train_round
from client.runtime import RUNTIME
from client.site import NODE_PARTITION, Site, resolve_site
from common import keys
from common.config import FedClimbConfig
from common.modeling.loader import cache_root
from common.modeling.lora import adapter_shapes
from common.modeling.preload import preload
from common.runconfig import config_from_run_config
from common.wire import encode_adapter

log = logging.getLogger(__name__)

preload()

app = ClientApp()


def _adapter_shapes(cfg: FedClimbConfig) -> Mapping[str, tuple[int, ...]]:
    """This hospital's LoRA tensor names and shapes for ``cfg`` (the policy is cached)."""
    return adapter_shapes(RUNTIME.policy(cfg).peft)


def _prepare(msg: Message, context: Context) -> tuple[Site, CheckedInstruction]:
    """The hospital and the checked instruction; raises InstructionError on a refusal."""
    run_cfg = config_from_run_config(context.run_config)
    site = resolve_site(context.node_config, context.run_config, run_id=context.run_id, cache=cache_root(run_cfg.model))
    return site, check_instruction(msg.content, run_cfg=run_cfg, site=site, adapter_shapes=_adapter_shapes)


def _site_metrics(site: Site, context: Context) -> dict[str, int]:
    if site.simulated and NODE_PARTITION in context.node_config:
        return {keys.SITE_PARTITION: int(context.node_config[NODE_PARTITION])}
    return {}


def _status(msg: Message, status: int) -> Message:
    return Message(RecordDict({keys.METRICS: MetricRecord({keys.STATUS: status})}), reply_to=msg)


def _refused(msg: Message, where: str, exc: InstructionError) -> Message:
    log.warning("fedclimb %s instruction refused before anything was spent (status %d sent): %s",
                where, keys.STATUS_REFUSED, exc)
    return _status(msg, keys.STATUS_REFUSED)


def _failed(msg: Message, where: str) -> Message:
    """A numeric error reply: the exception stays in this hospital's log, never on the wire.

    (Flower would otherwise send the exception text, which can hold paths, record ids or
    exact counts, to the server.)
    """
    log.exception("fedclimb %s round failed; nothing but status %d is sent to the server", where, keys.STATUS_ERROR)
    return _status(msg, keys.STATUS_ERROR)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local DRPO from the global adapter; reply with the new adapter and metrics."""
    try:
        site, ok = _prepare(msg, context)
        outcome = train_round(RUNTIME, site, ok.cfg, instruction_from_config(ok.values), ok.adapter)
        content = RecordDict({keys.METRICS: MetricRecord({**outcome.metrics, **_site_metrics(site, context)})})
        if outcome.adapter is not None:
            content[keys.ARRAYS] = encode_adapter(outcome.adapter, ok.precision)  # type: ignore[arg-type]
    except InstructionError as exc:
        return _refused(msg, "train", exc)
    except Exception:  # noqa: BLE001 - any failure becomes a status code
        return _failed(msg, "train")
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-domain held-out metrics of the global adapter, within the hospital's evaluation limits."""
    try:
        site, ok = _prepare(msg, context)
        withheld = evaluation_withheld(ok.cfg.privacy)  # sends nothing: not counted against the limits
        if not withheld and not admit_evaluation(site.state_dir, int(context.run_id),
                                                 int(ok.values[keys.SERVER_ROUND]), site.hospital.limits):
            return _status(msg, keys.STATUS_EVAL_LIMIT)
        outcome = evaluate_round(RUNTIME, site, ok.cfg, instruction_from_config(ok.values), ok.adapter)
        metrics = MetricRecord({**outcome.metrics, **_site_metrics(site, context)})
    except InstructionError as exc:
        return _refused(msg, "evaluate", exc)
    except Exception:  # noqa: BLE001
        return _failed(msg, "evaluate")
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)
