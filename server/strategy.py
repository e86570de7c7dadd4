"""The fedclimb strategy: domain-aware weights, exact LoRA aggregation, hostile replies.

Built on ``flwr.serverapp.strategy.Strategy``. The math lives in server/aggregation.py
(pure functions) and the reply checks in server/validation.py; this class holds the
federation's state (the global adapter, federation-wide domain statistics, per-round
history) and turns it into Messages and back.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import keys
from common.advantages import domain_temperatures
from common.config import FedClimbConfig
from common.modeling.lora import is_lora_b
from common.seeding import derive_seed
from common.wire import decode_adapter, encode_adapter
from server.aggregation import aggregate, client_weights, domain_raw_weights
from server.validation import MetricSpec, expected_from_adapter, validate_metrics_reply, validate_reply

log = logging.getLogger(__name__)

__all__ = ["FedClimbStrategy", "TRAIN_METRICS", "EVAL_METRICS", "node_label"]

# Plausibility bounds of what a hospital may report. Counts beyond MAX_COUNT (records,
# units, examples) are hostile or broken, and unbounded ones could overflow the server's
# sums to inf; seconds beyond a year likewise. Noisy (DP) counts may be negative.
MAX_COUNT = 1e9
MAX_SECONDS = 3.2e7
MAX_PARTITION = 1_000_000

TRAIN_METRICS: dict[str, MetricSpec] = {
    keys.NUM_EXAMPLES: MetricSpec("int", required=True, low=0, high=MAX_COUNT),
    keys.LOCAL_STEPS: MetricSpec("int", required=True, low=1, high=MAX_COUNT),
    keys.ROLLOUT_SECONDS: MetricSpec("float", low=0, high=MAX_SECONDS),
    keys.UPDATE_SECONDS: MetricSpec("float", low=0, high=MAX_SECONDS),
    keys.REWARD_MEAN: MetricSpec("float", low=-MAX_COUNT, high=MAX_COUNT),
    keys.EPSILON: MetricSpec("float", low=0, high=MAX_COUNT),
    keys.DELTA: MetricSpec("float", low=0, high=1),
    keys.NOISE_MULTIPLIER: MetricSpec("float", low=0, high=MAX_COUNT),
    keys.SAMPLE_RATE: MetricSpec("float", low=0, high=1),
    keys.SITE_PARTITION: MetricSpec("int", low=0, high=MAX_PARTITION),
    keys.D_COUNT: MetricSpec("per_domain_float", low=-MAX_COUNT, high=MAX_COUNT),
}
_RATES = {keys.E_BALANCED_ACCURACY, keys.E_MACRO_F1, keys.E_MEAN_IOU, keys.E_FORMAT_RATE, keys.E_ACCURACY}
EVAL_METRICS: dict[str, MetricSpec] = {
    keys.NUM_EXAMPLES: MetricSpec("int", required=True, low=0, high=MAX_COUNT),
    keys.SITE_PARTITION: MetricSpec("int", low=0, high=MAX_PARTITION),
    keys.E_RECORDS: MetricSpec("per_domain_float", low=0, high=MAX_COUNT),
    **{k: MetricSpec("per_domain_float", low=0, high=1) for k in _RATES},
    keys.E_MEAN_REWARD: MetricSpec("per_domain_float", low=-MAX_COUNT, high=MAX_COUNT),
    # DP-released sums (noisy: may be negative or exceed the units).
    **{k: MetricSpec("per_domain_float", low=-MAX_COUNT, high=MAX_COUNT) for k in keys.EVAL_DP_PER_DOMAIN},
}
assert set(EVAL_METRICS) == {keys.NUM_EXAMPLES, keys.SITE_PARTITION, *keys.EVAL_PER_DOMAIN, *keys.EVAL_DP_PER_DOMAIN}
# The means the server computes from a DP evaluation release: field -> released sum.
_DP_MEANS = {"accuracy": keys.E_DP_ACCURACY_SUM, "mean_reward": keys.E_DP_REWARD_SUM,
             "format_rate": keys.E_DP_FORMAT_SUM}


def _partition(metrics: dict[str, Any]) -> int:
    value = metrics.get(keys.SITE_PARTITION)
    return value if type(value) is int else -1


def _extra_records(content: RecordDict) -> str | None:
    """A reply holds at most the adapter and the metrics; anything else is refused."""
    extra = [f"array record {k!r}" for k in content.array_records if k != keys.ARRAYS]
    extra += [f"metric record {k!r}" for k in content.metric_records if k != keys.METRICS]
    extra += [f"config record {k!r}" for k in content.config_records]
    return f"the reply carries more than the adapter and metrics: {', '.join(extra[:3])}" if extra else None


def node_label(node_id: int, metrics: dict[str, Any] | None) -> str:
    """A readable name: ``hospital-<i>`` in simulation, ``node-<id>`` otherwise."""
    if metrics and _partition(metrics) >= 0:
        return f"hospital-{_partition(metrics)}"
    return f"node-{node_id}"


@dataclass
class RoundLog:
    """What happened in one round (goes to metrics.json)."""

    server_round: int
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class FedClimbStrategy(Strategy):
    """Domain-aware, exact LoRA aggregation with per-reply validation."""

    def __init__(self, cfg: FedClimbConfig, global_adapter: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.domains = list(cfg.federation.domains)
        self.global_adapter = {k: v.float() for k, v in global_adapter.items()}
        self.only_b = cfg.aggregation.mode == "ffa"
        # Federation-wide domain statistics. N_d: the sum of every hospital's latest
        # (DP-released) count of training units in domain d. mu_d: the global adapter's
        # mean held-out reward in domain d at the latest evaluation (-1 = not known yet).
        self.hospital_counts: dict[str, list[float]] = {}
        self.domain_mu = {d: -1.0 for d in self.domains}
        self.current: RoundLog | None = None
        self.rejected_total = 0
        # Who is who in this process: a reply's name (hospital-<i>) comes from its
        # metrics, so each name is bound to the first node that used it and each node
        # to its first name. A node cannot then speak for another hospital or for several
        # (which would add its counts to N_d several times).
        self._owner_of_label: dict[str, int] = {}
        self._label_of_node: dict[int, str] = {}
        # Deployment: node id -> hospital name (server.node_names, from the coordinator's
        # registrations); simulated hospitals name themselves (site.partition).
        self._names = {int(node): str(name) for name, node in cfg.server.node_names.items()}
        # The instructions of the current configure_* call: the SuperLink's own error
        # replies (hospital unreachable) come from the SuperLink, not from the hospital.
        self._sent: list[Message] = []

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": self.domains,
            "hospital_counts": self.hospital_counts,
            "domain_mu": self.domain_mu,
            "rejected_total": self.rejected_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("domains", [])) != self.domains:
            raise ValueError(
                f"checkpoint domains {state.get('domains')} differ from federation.domains {self.domains}; "
                "resume with the same configuration"
            )
        self.hospital_counts = {h: [float(x) for x in c] for h, c in state["hospital_counts"].items()}
        self.domain_mu = {d: float(v) for d, v in state["domain_mu"].items()}
        self.rejected_total = int(state.get("rejected_total", 0))

    @property
    def domain_count(self) -> dict[str, float]:
        """N_d: the sum of the hospitals' latest unit counts, then clamped at 0.

        The counts carry zero-mean DP noise; summing first lets it cancel, while clamping
        each hospital's count would keep only its positive part and bias N_d up.
        """
        return {
            d: max(sum(float(c[i]) for c in self.hospital_counts.values()), 0.0)
            for i, d in enumerate(self.domains)
        }

    def domain_means(self) -> dict[str, float]:
        return dict(self.domain_mu)

    def temperatures(self) -> dict[str, float]:
        """Federation-wide T_d of every domain (common.advantages.domain_temperatures).

        A domain with both statistics (the ones broadcast to the hospitals) uses
        sqrt(N_d) * max(mu_d, aggregation.mu_floor); one without gets the mean of those,
        or 1 when none has them: the same rule as the hospitals' DRPO.
        """
        n, mu = self.domain_count, self.domain_mu
        known = {d: (n[d], mu[d]) for d in self.domains if n[d] > 0 and mu[d] >= 0}
        return domain_temperatures(known, self.domains, mu_floor=self.cfg.aggregation.mu_floor)

    def label(self, node: int, metrics: dict[str, Any] | None = None) -> str:
        """A reply's hospital: its simulated name, its registered name, else ``node-<id>``."""
        if node in self._names and not (metrics and _partition(metrics) >= 0):
            return self._names[node]
        return node_label(node, metrics)

    def _claim(self, node: int, metrics: dict[str, Any]) -> str | None:
        """Bind the reply's name to its node; the reason when it belongs to another."""
        label = self.label(node, metrics)
        previous = self._label_of_node.get(node)
        if _partition(metrics) < 0:  # unnamed: known by its node id, unique by construction
            return None if previous is None else f"node {node} was {previous!r} and now sends no name"
        owner = self._owner_of_label.get(label)
        if owner is not None and owner != node:
            return f"node {node} claims the name {label!r} of node {owner}"
        if previous is not None and previous != label:
            return f"node {node} was {previous!r} and now claims to be {label!r}"
        self._owner_of_label[label] = node
        self._label_of_node[node] = label
        return None

    # ----------------------------------------------------------------- messages

    def _instruction(self, server_round: int) -> ConfigRecord:
        cfg = self.cfg
        mu = self.domain_means()
        n = self.domain_count
        values: dict[str, Any] = {
            keys.SERVER_ROUND: server_round,
            keys.SEED: cfg.seed,
            keys.PLANNED_ROUNDS: cfg.federation.rounds,
            keys.WIRE_PRECISION: cfg.federation.wire_precision,
            keys.ONLY_B: self.only_b,
            keys.DOMAIN_NAMES: self.domains,
            keys.DOMAIN_COUNT: [float(n[d]) for d in self.domains],
            keys.DOMAIN_MEAN: [float(mu[d]) for d in self.domains],
        }
        for name in keys.TUNABLE:
            section, attr = name.split(".")
            values[keys.HPARAM_PREFIX + name] = getattr(getattr(cfg, section), attr)
        return ConfigRecord(values)

    def sample_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """All connected nodes, or a seeded fraction of them."""
        nodes = sorted(grid.get_node_ids())
        k = max(1, math.ceil(self.cfg.federation.fraction_train * len(nodes)))
        if k >= len(nodes):
            return nodes
        return sorted(random.Random(derive_seed(self.cfg.seed, "sample", server_round)).sample(nodes, k))

    def _messages(self, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, kind: str, rnd: int) -> list[Message]:
        out = []
        for node in nodes:
            content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
            # A message lives as long as the round waits for it (Flower's default TTL of
            # 12 h would silently cut a longer round_timeout_s short).
            out.append(Message(content, dst_node_id=node, message_type=kind, group_id=str(rnd),
                               ttl=float(self.cfg.federation.round_timeout_s)))
        self._sent = list(out)
        if self.current is not None:
            self.current.bytes_sent += arrays.count_bytes() * len(nodes)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), **dict(self._instruction(server_round))})
        return self._messages(self.sample_nodes(grid, server_round), arrays, config, MessageType.TRAIN, server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), **dict(self._instruction(server_round))})
        return self._messages(sorted(grid.get_node_ids()), arrays, config, MessageType.EVALUATE, server_round)

    # ----------------------------------------------------------------- aggregation

    def _senders(self, replies: Sequence[Message]) -> list[int]:
        """The hospital each reply answers for.

        An error reply the SuperLink makes itself (the hospital stopped sending heartbeats)
        comes from the SuperLink's id; it answers the instruction sent to the hospital.
        The instructions' ids are read here, once per batch of replies: the grid sets them
        when it pushes the instructions, after configure_* returned them.
        """
        sent_to = {int(m.metadata.dst_node_id) for m in self._sent}
        by_id = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent if m.metadata.message_id}
        out = []
        for msg in replies:
            src = int(msg.metadata.src_node_id)
            out.append(src if src in sent_to else by_id.get(msg.metadata.reply_to_message_id, src))
        return out

    def _missing(self, server_round: int, repliers: set[int], kind: str) -> list[str]:
        """Hospitals that were sent an instruction and never answered (logged by name)."""
        missing = sorted(self.label(int(m.metadata.dst_node_id)) for m in self._sent
                         if int(m.metadata.dst_node_id) not in repliers)
        for name in missing:
            log.warning("round %d: no %s reply from %s within federation.round_timeout_s=%s s", server_round,
                        kind, name, self.cfg.federation.round_timeout_s)
        return missing

    def _received(self, msg: Message) -> None:
        if self.current is not None and msg.has_content() and keys.ARRAYS in msg.content.array_records:
            self.current.bytes_received += msg.content.array_records[keys.ARRAYS].count_bytes()

    def _check(self, msg: Message) -> tuple[str, dict[str, torch.Tensor] | None, dict[str, Any], str]:
        """(status, adapter, metrics, reason) of one train reply; never raises."""
        if msg.has_error():
            if int(msg.error.code) == int(ErrorCode.NODE_UNAVAILABLE):
                return "error", None, {}, ("unreachable: its SuperNode stopped sending heartbeats "
                                           "(stopped, crashed or cut off); it is left out of this round")
            return "error", None, {}, f"the hospital reported an error: {msg.error.reason}"
        content = msg.content
        metrics = dict(content.metric_records[keys.METRICS]) if keys.METRICS in content.metric_records else {}
        extra = _extra_records(content)
        if extra is not None:
            return "rejected", None, metrics, extra
        no_arrays = keys.ARRAYS not in content.array_records
        if metrics.get(keys.STATUS) == keys.STATUS_NO_DATA and no_arrays:
            return "no_data", None, metrics, "the hospital has no usable training records"
        if metrics.get(keys.STATUS) == keys.STATUS_ERROR and no_arrays:
            return "error", None, metrics, "the hospital's round failed (the details are in its own log)"
        try:
            arrays = decode_adapter(content.array_records[keys.ARRAYS]) if keys.ARRAYS in content.array_records else None
        except Exception as exc:  # a hostile or broken payload must not stop the round
            return "rejected", None, metrics, f"undecodable adapter: {exc}"
        names = [k for k in self.global_adapter if is_lora_b(k)] if self.only_b else None
        verdict = validate_reply(
            arrays,
            metrics,
            expected=expected_from_adapter(self.global_adapter, keys=names),
            allowed_metric_keys=TRAIN_METRICS,
            max_update_norm=self.cfg.federation.max_update_norm or None,
            global_adapter=self.global_adapter,
            num_domains=len(self.domains),
        )
        if verdict.ok and int(metrics[keys.LOCAL_STEPS]) > self.cfg.train.steps:
            # A hospital's limits only ever lower the steps; more would inflate FedNova's
            # weight of this update.
            return "rejected", None, metrics, (
                f"metric {keys.LOCAL_STEPS!r} is {metrics[keys.LOCAL_STEPS]}, more than the "
                f"{self.cfg.train.steps} steps the server asked for")
        if verdict.ok and self.cfg.aggregation.weighting == "domain" and keys.D_COUNT not in metrics:
            return "rejected", None, metrics, (
                f"aggregation.weighting=domain needs the hospital's per-domain counts ({keys.D_COUNT!r}); "
                "this hospital sends none (its privacy.stats_release is 'none'?): it cannot be weighted")
        if verdict.ok:
            return "ok", arrays, metrics, ""
        return verdict.status, None, metrics, verdict.reason or "rejected"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[tuple[int, dict[str, torch.Tensor], dict[str, Any]]] = []
        report: dict[str, Any] = {"nodes": {}, "rejected": {}, "budget_exhausted": [], "no_data": []}
        # Replies arrive in completion order; aggregate in a fixed order (simulated
        # hospital index, else node id) so that a run is reproducible bit for bit.
        checked = []
        replies = list(replies)
        for msg, sender in zip(replies, self._senders(replies), strict=True):
            self._received(msg)
            checked.append((sender, *self._check(msg)))
        checked.sort(key=lambda c: (_partition(c[3]), c[0]))
        report["missing"] = self._missing(server_round, {c[0] for c in checked}, "training")
        for node, status, arrays, metrics, reason in checked:
            clash = self._claim(node, metrics) if status == "ok" or _partition(metrics) >= 0 else None
            if clash is not None:
                status, arrays, reason = "rejected", None, clash
                label = self.label(node)
            else:
                label = self.label(node, metrics)
                report["nodes"][label] = {k: v for k, v in metrics.items()}
            if status == "ok" and arrays is not None:
                accepted.append((node, arrays, metrics))
            elif status == "budget_exhausted":
                report["budget_exhausted"].append(label)
                log.warning("round %d: %s: privacy budget exhausted, no update", server_round, label)
            elif status == "no_data":
                report["no_data"].append(label)
                log.warning("round %d: %s: %s", server_round, label, reason)
            else:
                report["rejected"][label] = reason
                self.rejected_total += 1
                log.warning("round %d: dropped the reply of %s: %s", server_round, label, reason)
        if self.current is not None:
            self.current.train = report
        if len(accepted) < self.cfg.federation.min_replies:
            log.warning(
                "round %d: %d valid update(s), fewer than federation.min_replies=%d; the global adapter is unchanged",
                server_round, len(accepted), self.cfg.federation.min_replies,
            )
            report["aggregated"] = False
            return None, None
        self._update_domain_stats(accepted)
        try:
            temperatures = self.temperatures()
            weights = self._weights(accepted, temperatures)
            agg = aggregate(
                self.global_adapter,
                [a for _, a, _ in accepted],
                weights,
                mode=self.cfg.aggregation.mode,
                local_steps=[int(m.get(keys.LOCAL_STEPS, 1)) for _, _, m in accepted],
                fednova=self.cfg.aggregation.fednova,
            )
        except (ValueError, ArithmeticError, RuntimeError) as exc:  # never crash the server on replies
            log.error("round %d: aggregation failed (%s); the global adapter is unchanged", server_round, exc)
            report.update(aggregated=False, error=str(exc))
            return None, None
        self.global_adapter = {k: v.float() for k, v in agg.adapter.items()}
        report.update(
            aggregated=True,
            weights={self.label(n, m): w for (n, _, m), w in zip(accepted, weights, strict=True)},
            fedit_error=agg.fedit_error,
            svd_truncation_error=agg.svd_truncation_error,
            temperatures=temperatures,
        )
        if self.cfg.aggregation.mode == "fedit" and agg.fedit_error is not None:
            log.info("round %d: fedit aggregation error ||sum w BA - B_avg A_avg|| / ||sum w BA|| = %.4g",
                     server_round, agg.fedit_error)
        if agg.svd_truncation_error is not None:
            log.info("round %d: svd truncation error %.4g", server_round, agg.svd_truncation_error)
        summary = {"accepted": float(len(accepted)), "rejected": float(len(report["rejected"]))}
        return encode_adapter(self.global_adapter, "fp32"), MetricRecord(summary)

    def _update_domain_stats(self, accepted: list[tuple[int, dict[str, torch.Tensor], dict[str, Any]]]) -> None:
        for node, _, m in accepted:
            counts = m.get(keys.D_COUNT)
            if counts is not None:
                self.hospital_counts[self.label(node, m)] = [float(x) for x in counts]

    def _weights(
        self, accepted: list[tuple[int, dict[str, torch.Tensor], dict[str, Any]]], temperatures: dict[str, float]
    ) -> list[float]:
        mode = self.cfg.aggregation.weighting
        examples = [max(float(m.get(keys.NUM_EXAMPLES, 0)), 0.0) for _, _, m in accepted]
        if mode == "examples" and sum(examples) <= 0:
            log.warning("no hospital reported example counts; using uniform weights")
            mode = "uniform"
        domain_counts = None
        if mode == "domain":  # every accepted reply carries its counts (_check rejects the others)
            domain_counts = [dict(zip(self.domains, (float(x) for x in m[keys.D_COUNT]), strict=True))
                             for _, _, m in accepted]
            if all(w <= 0 for w in domain_raw_weights(len(accepted), domain_counts, temperatures)):
                mode, domain_counts = "uniform", None

        def weights(cap: float | None) -> list[float]:
            return client_weights(
                mode,
                num_examples=examples,
                domain_counts=domain_counts,
                domain_temperature=temperatures if mode == "domain" else None,
                cap=cap,
            )

        cap = self.cfg.aggregation.weight_cap or None
        if cap is None:
            return weights(None)
        # Only hospitals with a positive weight can take a share of the excess.
        positive = sum(w > 0 for w in weights(None))
        if positive and cap * positive < 1:
            # Expected with the default cap 0.5 and a single weighted reply: not a warning.
            log.info("aggregation.weight_cap=%s cannot hold with %d weighted replies; using 1/%d this round",
                     cap, positive, positive)
            cap = 1.0 / positive
        return weights(cap)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_node: dict[str, dict[str, Any]] = {}
        replies = list(replies)
        senders = self._senders(replies)
        self._missing(server_round, set(senders), "evaluation")
        for msg, sender in zip(replies, senders, strict=True):
            if msg.has_error():
                log.warning("round %d: no evaluation from %s: %s", server_round, self.label(sender),
                            msg.error.reason)
                continue
            content = msg.content
            metrics = dict(content.metric_records[keys.METRICS]) if keys.METRICS in content.metric_records else {}
            extra = _extra_records(content)
            if extra is not None:
                log.warning("round %d: dropped evaluation of %s: %s", server_round, self.label(msg.metadata.src_node_id),
                            extra)
                continue
            verdict = validate_metrics_reply(
                metrics,
                allowed_metric_keys=EVAL_METRICS,
                num_domains=len(self.domains),
                has_arrays=bool(content.array_records),
            )
            label = self.label(msg.metadata.src_node_id, metrics)
            if metrics.get(keys.STATUS) in (keys.STATUS_NO_DATA, keys.STATUS_ERROR) and not content.array_records:
                log.info("round %d: %s sent no evaluation (status %s)", server_round, label, metrics.get(keys.STATUS))
                continue
            if not verdict.ok:
                log.warning("round %d: dropped evaluation of %s: %s", server_round, label, verdict.reason)
                continue
            exact = any(k in metrics for k in keys.EVAL_PER_DOMAIN)
            released = any(k in metrics for k in keys.EVAL_DP_PER_DOMAIN)
            expected = (keys.EVAL_PER_DOMAIN if exact else ()) + (keys.EVAL_DP_PER_DOMAIN if released else ())
            partial = [k for k in expected if k not in metrics]
            if partial or (exact and released):
                why = f"it lacks {partial}" if partial else "it mixes exact and DP-released metrics"
                log.warning("round %d: dropped evaluation of %s: %s", server_round, label, why)
                continue
            clash = self._claim(msg.metadata.src_node_id, metrics)
            if clash is not None:
                log.warning("round %d: dropped evaluation of %s: %s", server_round,
                            self.label(msg.metadata.src_node_id), clash)
                continue
            per_node[label] = metrics
        combined = self._combine_eval(per_node)
        for d, row in combined.items():
            if d in self.domain_mu and "mean_reward" in row:
                self.domain_mu[d] = min(max(float(row["mean_reward"]), 0.0), 1.0)
        if self.current is not None:
            self.current.evaluate = {"nodes": per_node, "domains": combined}
        flat = {f"{k}/{d}": v for d, row in combined.items() for k, v in row.items() if k != "records"}
        return MetricRecord(flat) if flat else None

    def _combine_eval(self, per_node: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
        """Per domain: records-weighted means over hospitals.

        Exact replies count with their records; DP-released replies with their noisy
        units and sums, which are added up over hospitals before dividing (less noise
        than per-hospital means). Balanced accuracy, macro-F1 and IoU come from exact
        replies only. A domain whose total is not positive has no estimate.
        """
        out: dict[str, dict[str, float]] = {}
        noisy = [m for m in per_node.values() if keys.E_DP_UNITS in m]
        for i, d in enumerate(self.domains):
            rows = [(m[keys.E_RECORDS][i], m) for m in per_node.values() if keys.E_RECORDS in m and m[keys.E_RECORDS][i] > 0]
            exact_total = sum(n for n, _ in rows)
            total = exact_total + sum(m[keys.E_DP_UNITS][i] for m in noisy)
            if total <= 0:  # (without noisy replies total is exact_total)
                continue
            out[d] = {"records": float(total)}
            for k in keys.EVAL_PER_DOMAIN:
                name = k.split(".", 1)[1].replace("-", "_")
                if k == keys.E_RECORDS:
                    continue
                if name in _DP_MEANS:
                    s = sum(n * m[k][i] for n, m in rows) + sum(m[_DP_MEANS[name]][i] for m in noisy)
                    out[d][name] = min(max(s / total, 0.0), 1.0) if noisy else s / total
                elif exact_total > 0:
                    out[d][name] = sum(n * m[k][i] for n, m in rows) / exact_total
        return out

    def summary(self) -> None:
        a = self.cfg.aggregation
        log.info(
            "fedclimb strategy: mode=%s weighting=%s cap=%s fednova=%s rounds=%d min_replies=%d domains=%s wire=%s",
            a.mode, a.weighting, a.weight_cap or "none", a.fednova, self.cfg.federation.rounds,
            self.cfg.federation.min_replies, self.domains, self.cfg.federation.wire_precision,
        )
