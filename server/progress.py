"""One line per round of a deployed federation, from the server's events (``events.jsonl``).

    round 1/2 | hospitals 2/2: alpha, beta | test bal-acc 0.512 reward 0.431 | eps alpha 1.23, beta 1.20 | sent 1.20 MB recv 0.40 MB | 45 s

A hospital that was asked but did not answer, or whose reply was refused, is named with
the reason (``beta: unreachable ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import keys
from simulation.report import overall

__all__ = ["RoundPrinter", "format_round", "not_aggregated"]


def _short(reason: str, limit: int = 90) -> str:
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def format_round(event: dict[str, Any], rounds: int) -> str:
    """The progress line of one round's event."""
    rnd = int(event["server_round"])
    train = event.get("train") or {}
    nodes: dict[str, dict[str, Any]] = train.get("nodes", {})
    rejected: dict[str, str] = train.get("rejected", {})
    missing: list[str] = train.get("missing", [])
    left_out = set(rejected) | set(train.get("no_data", [])) | set(train.get("budget_exhausted", []))
    done = sorted(n for n in nodes if n not in left_out)
    asked = len(set(nodes) | set(missing))
    parts = ["round 0 (before training)" if rnd == 0 else f"round {rnd}/{rounds}"]
    if rnd > 0:
        line = f"hospitals {len(done)}/{asked}" + (f": {', '.join(done)}" if done else "")
        notes = [f"{n}: {_short(r)}" for n, r in sorted(rejected.items())]
        notes += [f"{n}: no reply" for n in missing]
        notes += [f"{n}: privacy budget exhausted" for n in train.get("budget_exhausted", [])]
        notes += [f"{n}: no usable data" for n in train.get("no_data", [])]
        if notes:
            line += " (" + "; ".join(notes) + ")"
        if train and not train.get("aggregated", False):
            line += " - not aggregated, global adapter unchanged"
        parts.append(line)
    domains = (event.get("evaluate") or {}).get("domains") or {}
    metrics = [(label, overall(domains, name)) for label, name in
               (("bal-acc", "balanced_accuracy"), ("acc", "accuracy"), ("reward", "mean_reward"))]
    shown = [f"{label} {value:.3f}" for label, value in metrics if value is not None]
    # Balanced accuracy comes from exact releases only: without it, every number shown is a
    # DP-noised sum over a few test records (privacy.eval_release: dp), not a measurement.
    noised = bool(shown) and overall(domains, "balanced_accuracy") is None
    head = "test (DP-noised, see docs/privacy.md) " if noised else "test "
    parts.append(head + " ".join(shown) if shown else "test: no evaluation")
    eps = [f"{n} {m[keys.EPSILON]:.2f}" for n, m in sorted(nodes.items()) if keys.EPSILON in m]
    if eps:
        parts.append("eps " + ", ".join(eps))
    parts.append(f"sent {event.get('bytes_sent', 0) / 1e6:.2f} MB recv {event.get('bytes_received', 0) / 1e6:.2f} MB")
    parts.append(f"{event.get('seconds', 0.0):.0f} s")
    return " | ".join(parts)


def not_aggregated(event: dict[str, Any], min_replies: int) -> str | None:
    """Why a training round's updates did not reach the global adapter; None when they did.

    ``round 1: no update aggregated (fewer than federation.min_replies=1 accepted); alpha: the
    hospital reported an error: the hospital has not approved app sha256:...; beta: no reply
    within federation.round_timeout_s``
    """
    rnd = int(event.get("server_round", -1))
    train = event.get("train") or {}
    if rnd <= 0 or train.get("aggregated", False):
        return None
    notes = [f"{n}: {r}" for n, r in sorted((train.get("rejected") or {}).items())]
    notes += [f"{n}: no reply within federation.round_timeout_s" for n in train.get("missing") or []]
    notes += [f"{n}: privacy budget exhausted" for n in train.get("budget_exhausted") or []]
    notes += [f"{n}: no usable data" for n in train.get("no_data") or []]
    if train.get("error"):
        notes.append(f"aggregation failed: {train['error']}")
    if not train.get("nodes") and not train.get("missing"):
        notes.append("no hospital was asked (none connected)")
    head = f"round {rnd}: no update aggregated" + (
        "" if train.get("error") else f" (fewer than federation.min_replies={min_replies} accepted)")
    return head + ("; " + "; ".join(notes) if notes else "")


@dataclass
class RoundPrinter:
    """Prints each round once, even when a resume rewrites the event file."""

    rounds: int
    say: Callable[[str], None]
    printed: set[int] = field(default_factory=set)

    @property
    def last_round(self) -> int:
        return max(self.printed, default=-1)

    def emit(self, event: dict[str, Any]) -> None:
        rnd = int(event.get("server_round", -1))
        if rnd < 0 or rnd in self.printed:
            return
        self.printed.add(rnd)
        self.say(format_round(event, self.rounds))
