"""The hospital's Flower ClientApp: thin glue between Messages and client/rounds.py.

Every instruction is checked whole (client/instruction.py) before anything is spent;
an evaluation also needs room in the hospital's evaluation limits (client/evaluations.py).
Replies carry only adapter tensors and the whitelisted numeric metrics of common/keys.py;
a refused or failed instruction gets a status code and nothing else.

A reply already computed for the same global adapter and instruction (a resumed round)
is re-sent from client/reply_cache.py instead of being computed, and charged, again.
Every reply is appended to the hospital's audit log (client/audit.py) and summarised on
its console (client/round_report.py) just before it is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import append_audit, reply_bytes, reply_entry
from client.evaluations import admit_evaluation
from client.instruction import CheckedInstruction, InstructionError, check_instruction
from client.privacy_round import evaluation_withheld
from client.reply_cache import reply_key, reserved
from client.round_report import asked_values, print_round_line, round_line
from client.rounds import evaluate_round, instruction_from_config, ledger_before_evaluation, train_round
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


@dataclass
class _Note:
    """What the audit line and the console line of a reply need besides the reply itself."""

    site: Site | None = None
    server_round: int | None = None
    asked: dict[str, Any] | None = None
    resent: bool = False


def _prepare(msg: Message, context: Context, note: _Note) -> tuple[Site, CheckedInstruction]:
    """The hospital and the checked instruction; raises InstructionError on a refusal."""
    run_cfg = config_from_run_config(context.run_config)
    site = resolve_site(context.node_config, context.run_config, run_id=context.run_id, cache=cache_root(run_cfg.model))
    note.site = site
    ok = check_instruction(msg.content, run_cfg=run_cfg, site=site, adapter_shapes=_adapter_shapes)
    note.server_round = int(ok.values[keys.SERVER_ROUND])
    note.asked = asked_values(run_cfg, ok.values)
    return site, ok


def _sent(kind: str, msg: Message, reply: Message, context: Context, note: _Note) -> Message:
    """Append the reply to the audit log and print its console line, then let it go.

    A reply that cannot be audited is not sent: the status-error reply goes instead.
    """
    site = note.site
    if site is None:  # no hospital settings: nothing was read, and there is no state folder to log in
        return reply
    content = reply.content if reply.has_content() else RecordDict()
    entry = reply_entry(kind, note.server_round, int(context.run_id), content, resent=note.resent)
    try:
        append_audit(site.state_dir, entry)
    except OSError:
        log.exception("cannot append to the audit log in %s; sending status %d instead of the reply",
                      site.state_dir, keys.STATUS_ERROR)
        return _status(msg, keys.STATUS_ERROR)
    print_round_line(round_line(site, kind, note.server_round, note.asked, reply_bytes(content),
                                str(entry["status"]), resent=note.resent))
    return reply


def _resending(site: Site, kind: str, server_round: int) -> None:
    log.warning("%s: re-sending the %s reply of round %d already computed and paid for (same global adapter and "
                "instruction): no new privacy cost", site.name, kind, server_round)


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
    note = _Note()
    return _sent("train", msg, _train(msg, context, note), context, note)


def _train(msg: Message, context: Context, note: _Note) -> Message:
    try:
        site, ok = _prepare(msg, context, note)

        def compute() -> RecordDict | Message:
            outcome = train_round(RUNTIME, site, ok.cfg, instruction_from_config(ok.values), ok.adapter)
            content = RecordDict({keys.METRICS: MetricRecord({**outcome.metrics, **_site_metrics(site, context)})})
            if outcome.adapter is not None:
                content[keys.ARRAYS] = encode_adapter(outcome.adapter, ok.precision)  # type: ignore[arg-type]
            return content

        return _once("train", msg, site, ok, note, compute)
    except InstructionError as exc:
        return _refused(msg, "train", exc)
    except Exception:  # noqa: BLE001 - any failure becomes a status code
        return _failed(msg, "train")


def _once(kind: str, msg: Message, site: Site, ok: CheckedInstruction, note: _Note,
          compute: Callable[[], RecordDict | Message]) -> Message:
    """The reply to a ``kind`` instruction, computed once: an instruction asked again with the same
    adapter and values (a resumed round) gets the stored reply, released and paid for already.
    ``compute`` returns the content to store, or a status Message (not stored)."""
    with reserved(site.state_dir, reply_key(kind, ok.values, ok.adapter, ok.cfg)) as slot:
        cached = slot.load()
        if cached is not None:
            note.resent = True
            _resending(site, kind, int(ok.values[keys.SERVER_ROUND]))
            return Message(cached, reply_to=msg)
        content = compute()
        if isinstance(content, Message):
            return content
        slot.store(content)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-domain held-out metrics of the global adapter, within the hospital's evaluation limits."""
    note = _Note()
    return _sent("evaluate", msg, _evaluate(msg, context, note), context, note)


def _evaluate(msg: Message, context: Context, note: _Note) -> Message:
    try:
        site, ok = _prepare(msg, context, note)

        def compute() -> RecordDict | Message:
            withheld = evaluation_withheld(ok.cfg.privacy)  # sends nothing: not counted against the limits
            ledger_before_evaluation(site, ok.cfg)  # before the count below is written
            if not withheld and not admit_evaluation(site.state_dir, int(context.run_id),
                                                     int(ok.values[keys.SERVER_ROUND]), site.hospital.limits):
                return _status(msg, keys.STATUS_EVAL_LIMIT)
            outcome = evaluate_round(RUNTIME, site, ok.cfg, instruction_from_config(ok.values), ok.adapter)
            return RecordDict({keys.METRICS: MetricRecord({**outcome.metrics, **_site_metrics(site, context)})})

        return _once("evaluate", msg, site, ok, note, compute)
    except InstructionError as exc:
        return _refused(msg, "evaluate", exc)
    except Exception:  # noqa: BLE001
        return _failed(msg, "evaluate")
