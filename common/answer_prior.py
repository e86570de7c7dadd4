"""A hospital's own answer prior, for logit-adjusted rollouts (``train.logit_adjustment``).

Under label skew a hospital that holds, say, only "Low sodium" records of a domain teaches
the shared adapter to answer "Low sodium" to every question of that domain, whatever the
record shows; another hospital teaches the opposite, and the average learns the question's
prior rather than its rule. Logit adjustment (Menon et al. 2021, "Long-tail learning via
logit adjustment"; for federated label skew Zhang et al. 2022, FedLC) adds
``tau * log p_local(answer | domain)`` to the answer's logit while the hospital trains, so
that the local prior is supplied by the adjustment and the adapter need not learn it. The
rollouts are sampled from, and the PPO loss scores, the adjusted policy; evaluation and
every other use of the adapter do not adjust.

With constrained answers the first answer token decides the option. An option's bias goes
on its first token; options that share a first token share the log of their summed prior.

The prior counts every training record's answers, so it depends on every record: under DP
it is refused (common/config.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["answer_counts", "option_prior", "first_token_bias"]


def answer_counts(records: Iterable[tuple[str, Sequence[str]]]) -> dict[str, Counter[str]]:
    """``{domain: Counter(answer)}`` over ``(domain, answers)`` pairs; a multi-label record counts each answer."""
    counts: dict[str, Counter[str]] = {}
    for domain, answers in records:
        counts.setdefault(domain, Counter()).update(answers)
    return counts


def option_prior(counts: Mapping[str, int], options: Sequence[str]) -> list[float]:
    """Add-one (Laplace) estimate of p(option) among ``options``: ``(c_a + 1) / (sum c + len)``.

    An option never seen still gets a finite log-prior; with no counts at all the prior is
    uniform (no adjustment beyond a constant, which softmax ignores).
    """
    if not options:
        raise ValueError("an answer prior needs at least one option")
    c = [int(counts.get(o, 0)) for o in options]
    total = sum(c) + len(options)
    return [(x + 1) / total for x in c]


def first_token_bias(sequences: Sequence[Sequence[int]], prior: Sequence[float], strength: float) -> dict[int, float]:
    """``{first token: strength * log(sum of the prior of the options starting with it)}``."""
    if len(sequences) != len(prior):
        raise ValueError(f"{len(sequences)} answer sequences but {len(prior)} prior values")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    mass: dict[int, float] = {}
    for seq, p in zip(sequences, prior, strict=True):
        if not seq:
            raise ValueError("an answer sequence is empty")
        if not p > 0:
            raise ValueError(f"prior values must be > 0, got {p!r}")
        mass[int(seq[0])] = mass.get(int(seq[0]), 0.0) + float(p)
    return {tok: strength * math.log(m) for tok, m in mass.items()}
