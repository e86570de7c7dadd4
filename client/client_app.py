"""The hospital's Flower ClientApp: thin glue between Messages and client/rounds.py.

Replies carry only adapter tensors and the whitelisted numeric metrics of common/keys.py.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.rounds import evaluate_round, instruction_from_config, train_round
from client.runtime import RUNTIME
from client.site import NODE_PARTITION, Site, effective_config, resolve_site
from common import keys
from common.modeling.loader import cache_root
from common.modeling.preload import preload
from common.runconfig import config_from_run_config
from common.wire import decode_adapter, encode_adapter

log = logging.getLogger(__name__)

preload()

app = ClientApp()


def _prepare(msg: Message, context: Context) -> tuple[Site, Any, Any, dict[str, Any]]:
    values: dict[str, Any] = dict(msg.content.config_records.get(keys.CONFIG, ConfigRecord()))
    run_cfg = config_from_run_config(context.run_config)
    site = resolve_site(context.node_config, context.run_config, run_id=context.run_id, cache=cache_root(run_cfg.model))
    cfg = effective_config(run_cfg, site, values)
    adapter = {k: v.float() for k, v in decode_adapter(msg.content.array_records[keys.ARRAYS]).items()}
    return site, cfg, adapter, values


def _site_metrics(site: Site, context: Context) -> dict[str, int]:
    if site.simulated and NODE_PARTITION in context.node_config:
        return {keys.SITE_PARTITION: int(context.node_config[NODE_PARTITION])}
    return {}


def _failed(msg: Message, where: str) -> Message:
    """A numeric error reply: the exception stays in this hospital's log, never on the wire.

    (Flower would otherwise send the exception text, which can hold paths, record ids or
    exact counts, to the server.)
    """
    log.exception("fedclimb %s round failed; nothing but status %d is sent to the server", where, keys.STATUS_ERROR)
    return Message(RecordDict({keys.METRICS: MetricRecord({keys.STATUS: keys.STATUS_ERROR})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local DRPO from the global adapter; reply with the new adapter and metrics."""
    try:
        site, cfg, adapter, values = _prepare(msg, context)
        ins = instruction_from_config(values)
        outcome = train_round(RUNTIME, site, cfg, ins, adapter)
        content = RecordDict({keys.METRICS: MetricRecord({**outcome.metrics, **_site_metrics(site, context)})})
        if outcome.adapter is not None:
            precision = str(values.get(keys.WIRE_PRECISION, "fp32"))
            content[keys.ARRAYS] = encode_adapter(outcome.adapter, precision)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - any failure becomes a status code
        return _failed(msg, "train")
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-domain held-out metrics of the global adapter."""
    try:
        site, cfg, adapter, values = _prepare(msg, context)
        outcome = evaluate_round(RUNTIME, site, cfg, instruction_from_config(values), adapter)
        metrics = MetricRecord({**outcome.metrics, **_site_metrics(site, context)})
    except Exception:  # noqa: BLE001
        return _failed(msg, "evaluate")
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)
