"""The line a hospital's console shows for every reply: asked, clamped, epsilon, bytes.

    fedclimb hospital st-a: round 3 train: asked steps=20 lr=0.005 ...; clamped train.lr 0.01->0.005;
    epsilon spent 2.105 of 8 (left 5.895); sent 81,920 bytes; status ok

Printed to stderr by the ClientApp process, which `fedclimb hospital start` forwards to
its console and log. "Asked" is what the coordinator's run configuration and instruction
set for the values the hospital's limits bound, before clamping.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from client.site import LIMITED_KEYS, Site, limited_values
from common import keys
from common.config import FedClimbConfig
from common.privacy.ledger import LedgerError, PrivacyLedger

__all__ = ["EVALUATION_KEYS", "asked_values", "clamps", "epsilon_text", "print_round_line", "round_line"]

#: The limited values an evaluation reads (greedy answers of at most this many tokens);
#: its line shows only these, not the training settings it never uses.
EVALUATION_KEYS = ("rollout.max_new_tokens",)


def asked_values(run_cfg: FedClimbConfig, values: Mapping[str, Any]) -> dict[str, Any]:
    """The limited values the coordinator asked for: run configuration, then the instruction's ``hp.*``."""
    asked = limited_values(run_cfg)
    for dotted in asked:
        sent = values.get(keys.HPARAM_PREFIX + dotted)
        if isinstance(sent, int | float) and not isinstance(sent, bool):
            asked[dotted] = sent
    return asked


def clamps(asked: Mapping[str, Any], site: Site) -> list[str]:
    """``key asked->limit`` for each asked value above the hospital's limit."""
    lim = site.hospital.limits
    return [f"{dotted} {asked[dotted]:g}->{getattr(lim, field):g}" for dotted, field in LIMITED_KEYS
            if dotted in asked and asked[dotted] > getattr(lim, field)]


def epsilon_text(site: Site) -> str:
    """Spent and left of the hospital's privacy budget, from its ledger."""
    p = site.hospital.privacy
    if not p.enabled:
        return "DP off"
    try:
        ledger = PrivacyLedger.open(site.state_dir, delta=p.delta, target_epsilon=p.target_epsilon,
                                    accountant=p.accountant)
    except (LedgerError, OSError) as exc:
        return f"epsilon unknown ({exc})"
    return (f"epsilon spent {ledger.spent_epsilon():.3f} of {ledger.target_epsilon:g} "
            f"(left {max(ledger.remaining(), 0.0):.3f})")


def round_line(site: Site, kind: str, server_round: int | None, asked: Mapping[str, Any] | None,
               sent_bytes: int, status: str, *, resent: bool = False) -> str:
    """One console line for a reply."""
    parts = [f"fedclimb hospital {site.name}: round {server_round if server_round is not None else '?'} {kind}"]
    if asked is not None and kind == "evaluate":
        asked = {d: v for d, v in asked.items() if d in EVALUATION_KEYS}
    if asked is not None:
        parts[0] += ": asked " + " ".join(f"{d.split('.')[1]}={v:g}" for d, v in asked.items())
        clamped = clamps(asked, site)
        parts.append("clamped " + (", ".join(clamped) if clamped else "nothing"))
    parts.append(epsilon_text(site))
    parts.append(f"sent {sent_bytes:,} bytes" + (" (re-sent, already paid for)" if resent else ""))
    parts.append(f"status {status}")
    return "; ".join(parts)


def print_round_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
