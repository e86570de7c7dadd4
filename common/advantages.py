"""GRPO and DRPO advantages for groups of rollouts.

Shapes: ``P`` prompts (questions) per batch, ``K`` rollouts per prompt. Rewards come
in as a float tensor ``(P, K)`` and advantages go out with the same shape, dtype and
device; one advantage per rollout, to be broadcast over its response tokens.

DRPO is "Domain-aware Relative Policy Optimization" from QoQ-Med (arXiv 2506.00711,
Sec. 3.3 and App. B). The options of :func:`drpo_advantages` select between what the
paper describes (the defaults) and what the released training code does; see
``docs/drpo.md`` for the list of differences.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from common.kmeans import select_k_elbow

HistoryMode = Literal["step", "run"]
DomainMean = Literal["plain", "cluster_weighted"]

#: Smallest mean reward a temperature uses (``advantage.mu_floor``,
#: ``aggregation.mu_floor``); see :func:`domain_temperature`.
MU_FLOOR = 0.1
#: Fewest questions in a DRPO cluster (``advantage.min_cluster_size``); see
#: :func:`common.kmeans.select_k_elbow`.
MIN_CLUSTER_SIZE = 4


# ---------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------


def _check_rewards(rewards: Tensor) -> Tensor:
    if not isinstance(rewards, Tensor):
        raise TypeError(
            f"rewards must be a torch.Tensor (P, K), got {type(rewards).__name__}"
        )
    if rewards.ndim != 2:
        raise ValueError(
            f"rewards must be 2-D (P prompts, K rollouts), got shape "
            f"{tuple(rewards.shape)}"
        )
    if rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(
            f"rewards must have at least one prompt and one rollout, got shape "
            f"{tuple(rewards.shape)}"
        )
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise TypeError(f"rewards must be real numbers, got dtype {rewards.dtype}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards))[0].tolist()
        raise ValueError(
            f"rewards must be finite, got {rewards[bad[0], bad[1]].item()} at "
            f"[prompt {bad[0]}, rollout {bad[1]}]; fix the reward function"
        )
    return rewards


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


def _group_normalise(x: np.ndarray, *, eps: float, unbiased: bool) -> np.ndarray:
    """Row-wise ``(r - mean) / (std + eps)`` on float64; constant rows give 0."""
    if x.shape[1] < 2:
        return np.zeros_like(x)
    mean = x.mean(axis=1, keepdims=True)  # (P, 1)
    std = x.std(axis=1, ddof=1 if unbiased else 0, keepdims=True)  # (P, 1)
    out = (x - mean) / (std + eps)
    # The mean of equal floats can differ from them by one ulp, which eps would
    # blow up; equal rewards carry no signal, so their advantages are exactly 0.
    out[x.max(axis=1) == x.min(axis=1)] = 0.0
    return out


def grpo_advantages(
    rewards: Tensor, *, eps: float = 1e-6, unbiased: bool = True
) -> Tensor:
    """GRPO advantages: rewards standardised within each prompt's group.

    ``s[q, i] = (r[q, i] - mean_q) / (std_q + eps)`` (QoQ-Med Sec. 3.3, step 1).

    Parameters
    ----------
    rewards : torch.Tensor, shape (P, K)
        Finite rewards, one row per prompt.
    eps : float
        Added to the standard deviation.
    unbiased : bool
        Standard deviation with ``K - 1`` (True, as torch's default used by the
        released code) or ``K`` in the denominator.

    Returns
    -------
    torch.Tensor, shape (P, K)
        Same dtype (floating inputs) and device as ``rewards``. A row whose rewards
        are all equal, and every row when ``K == 1``, gives zeros.
    """
    _check_rewards(rewards)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    x = rewards.detach().to("cpu", torch.float64).numpy()
    out = _group_normalise(x, eps=eps, unbiased=unbiased)
    return torch.from_numpy(out).to(device=rewards.device, dtype=_out_dtype(rewards))


# ---------------------------------------------------------------------------
# DRPO state
# ---------------------------------------------------------------------------


@dataclass
class DRPOState:
    """What DRPO remembers between calls, as plain JSON-able Python values.

    Attributes
    ----------
    history : dict of str to list of list of float
        Per domain, the reward vectors (one per question, length K) that the next
        call clusters together with its own. With ``history="step"`` it holds only
        the last call's questions; with ``history="run"`` every question so far.
    counts : dict of str to int
        Per domain, the number of questions seen over the whole run.
    last_stats : dict
        Diagnostics of the last call, for logging: ``{"domains": {domain:
        {"n_prompts", "n_d", "mu_d", "t_d", "k", "source"}}, "kl_threshold",
        "scale_std"}``. ``source`` is ``"local"``, ``"external"`` (from
        ``domain_stats``), ``"fallback"`` (not in ``domain_stats``: the mean of its
        temperatures) or ``"fixed"`` (``fixed_temperature``); ``n_d`` and ``mu_d``
        are None for the last two. ``k`` is None when clustering is off;
        ``kl_threshold`` is None without damping and ``scale_std`` without
        re-standardisation.
    """

    history: dict[str, list[list[float]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    last_stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A deep copy made of dicts, lists, str, int, float and None only."""
        return {
            "history": {d: [list(v) for v in vs] for d, vs in self.history.items()},
            "counts": dict(self.counts),
            "last_stats": copy.deepcopy(self.last_stats),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DRPOState:
        """Rebuild a state from :meth:`to_json` output, checking its structure."""
        if not isinstance(data, Mapping):
            raise TypeError(
                f"DRPO state must be a JSON object, got {type(data).__name__}"
            )
        unknown = set(data) - {"history", "counts", "last_stats"}
        if unknown:
            raise ValueError(f"DRPO state has unknown keys {sorted(unknown)}")
        history = _history_from_json(data.get("history", {}))
        counts = _counts_from_json(data.get("counts", {}))
        last_stats = data.get("last_stats", {})
        if not isinstance(last_stats, Mapping):
            raise TypeError(
                f"DRPO state 'last_stats' must be an object, got {last_stats!r}"
            )
        return cls(
            history=history,
            counts=counts,
            last_stats=copy.deepcopy(dict(last_stats)),
        )


def _history_from_json(raw: object) -> dict[str, list[list[float]]]:
    if not isinstance(raw, Mapping):
        raise TypeError(f"DRPO state 'history' must be an object, got {raw!r}")
    history: dict[str, list[list[float]]] = {}
    for domain, vectors in raw.items():
        if not isinstance(domain, str) or not isinstance(vectors, list):
            raise TypeError(
                f"DRPO state history[{domain!r}] must be a list of reward vectors"
            )
        rows: list[list[float]] = []
        for vector in vectors:
            if not isinstance(vector, list) or not all(
                _is_number(v) and math.isfinite(v) for v in vector
            ):
                raise ValueError(
                    f"DRPO state history[{domain!r}] holds {vector!r}, not a list of "
                    "finite numbers"
                )
            rows.append([float(v) for v in vector])
        if len({len(row) for row in rows}) > 1:
            raise ValueError(
                f"DRPO state history[{domain!r}] mixes reward vectors of lengths "
                f"{sorted({len(row) for row in rows})}"
            )
        history[domain] = rows
    return history


def _counts_from_json(raw: object) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        raise TypeError(f"DRPO state 'counts' must be an object, got {raw!r}")
    counts: dict[str, int] = {}
    for domain, count in raw.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"DRPO state counts[{domain!r}] must be an integer >= 0, got {count!r}"
            )
        counts[str(domain)] = count
    return counts


# ---------------------------------------------------------------------------
# DRPO
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _DomainScale:
    """Per-prompt divisors of one domain and its diagnostics."""

    t_d: float
    t_c: np.ndarray  # (n_prompts,)
    stats: dict[str, Any]


def domain_temperature(n: float, mu: float, *, mu_floor: float = MU_FLOOR) -> float:
    """DRPO temperature of a domain or cluster, ``T = sqrt(max(N, 1)) * max(mu, mu_floor)``.

    The paper's ``T = max(sqrt(N) * mu, eps)`` (QoQ-Med Sec. 3.3) with ``eps = 1e-6``
    lets one near-zero mean reward make ``T`` a million times smaller than every other
    temperature; after the batch re-standardisation the other domains' advantages fall
    to ~1e-6, and on the server the hospital holding that domain takes all the weight.
    Here a mean below ``mu_floor`` counts as ``mu_floor`` (rewards are in [0, 1], so the
    difficulty factor of two temperatures differs at most ``1 / mu_floor``-fold), and a
    count below 1 (DP noise) as 1: a domain or cluster with statistics holds at least
    one question.

    Parameters
    ----------
    n : float
        Number of questions ``N`` (a DP-released count may be fractional or < 1).
    mu : float
        Mean reward ``mu``.
    mu_floor : float
        Smallest mean used, > 0.

    Returns
    -------
    float
        ``T >= mu_floor > 0``.

    Raises
    ------
    ValueError
        If ``n`` or ``mu`` is not finite, or ``mu_floor`` is not a finite number > 0.
    """
    if not (math.isfinite(mu_floor) and mu_floor > 0):
        raise ValueError(f"mu_floor must be a finite number > 0, got {mu_floor!r}")
    if not (math.isfinite(n) and math.isfinite(mu)):
        raise ValueError(
            f"a temperature needs a finite N and mu, got N={n!r}, mu={mu!r}"
        )
    return math.sqrt(max(n, 1.0)) * max(mu, mu_floor)


def fallback_temperature(known: Iterable[float]) -> float:
    """The temperature of a domain without statistics: the mean of the known ones, else 1.

    The mean neither up- nor down-weights the domain relative to the others; with no
    known temperature at all every domain gets 1 (no domain weighting). The server's
    weights and the hospitals' DRPO use this same rule.
    """
    values = list(known)
    return sum(values) / len(values) if values else 1.0


def domain_temperatures(
    stats: Mapping[str, tuple[float, float]],
    domains: Iterable[str] | None = None,
    *,
    mu_floor: float = MU_FLOOR,
) -> dict[str, float]:
    """``T_d`` of each domain from ``{domain: (N_d, mu_d)}``, with the shared fallback.

    Parameters
    ----------
    stats : mapping of str to (N_d, mu_d)
        Domains with statistics (e.g. the federation-wide values the server
        broadcasts); see :func:`domain_temperature`.
    domains : iterable of str, optional
        Domains to return, in this order; one without statistics gets
        :func:`fallback_temperature` of the domains in ``stats``. Default: those of
        ``stats``.
    mu_floor : float
        Passed to :func:`domain_temperature`.

    Returns
    -------
    dict of str to float
        ``T_d`` per requested domain.
    """
    known = {
        d: domain_temperature(float(n), float(mu), mu_floor=mu_floor)
        for d, (n, mu) in stats.items()
    }
    fill = fallback_temperature(known.values())
    names = list(stats) if domains is None else list(domains)
    return {d: known.get(d, fill) for d in names}


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _external_stats(domain: str, value: object) -> tuple[float, float]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(_is_number(v) for v in value)
    ):
        raise ValueError(
            f"domain_stats[{domain!r}] must be a pair (N_d, mu_d) of numbers, "
            f"got {value!r}"
        )
    n_d, mu_d = float(value[0]), float(value[1])
    if not (math.isfinite(n_d) and n_d > 0 and math.isfinite(mu_d)):
        raise ValueError(
            f"domain_stats[{domain!r}] must have a finite N_d > 0 and a finite mu_d, "
            f"got {value!r}"
        )
    return n_d, mu_d


def _scale_domain(
    hist: np.ndarray,
    n_current: int,
    *,
    external: tuple[float | None, float | None, float] | None,
    fixed_temperature: bool,
    domain_mean: DomainMean,
    clustering: bool,
    cluster_eps_clamp: bool,
    mu_floor: float,
    min_cluster_size: int,
    k_max: int,
    tol: float,
    kmeans_seed: int,
    kmeans_n_init: int,
    kmeans_max_iter: int,
) -> _DomainScale:
    """T_d and the per-prompt T_c of one domain (Sec. 3.3, stages 1 and 2).

    ``hist`` is the domain's history (N_d, K) whose last ``n_current`` rows are the
    current prompts. ``external`` is ``(N_d, mu_d, T_d)`` from ``domain_stats``
    (``N_d`` and ``mu_d`` None for a domain given the fallback temperature).
    """
    k: int | None = None
    t_c = np.ones(n_current)
    weighted_mu: float | None = None
    if clustering:
        k, labels = select_k_elbow(
            hist,
            k_max=k_max,
            tol=tol,
            min_size=min_cluster_size,
            seed=kmeans_seed,
            n_init=kmeans_n_init,
            max_iter=kmeans_max_iter,
        )
        clusters = np.unique(labels)
        sizes = np.array([(labels == c).sum() for c in clusters], dtype=np.float64)
        means = np.array([hist[labels == c].mean() for c in clusters])
        weighted_mu = float((means / sizes).sum() / (1.0 / sizes).sum())
        position = np.searchsorted(clusters, labels[len(hist) - n_current :])
        if cluster_eps_clamp:
            t_c = np.array(  # (n_current,)
                [
                    domain_temperature(n, mu, mu_floor=mu_floor)
                    for n, mu in zip(sizes[position], means[position], strict=True)
                ]
            )
        else:  # the released code: no floor at all
            t_c = np.sqrt(sizes[position]) * means[position]  # (n_current,)
    if fixed_temperature:
        t_d = 1.0
        stats: dict[str, Any] = {"n_d": None, "mu_d": None, "source": "fixed"}
    else:
        if external is not None:
            n_d, mu_d, t_d = external
            source = "external" if n_d is not None else "fallback"
        else:
            local_mu = float(hist.mean())
            if domain_mean == "cluster_weighted" and weighted_mu is not None:
                local_mu = weighted_mu
            n_d, mu_d, source = float(len(hist)), local_mu, "local"
            t_d = domain_temperature(float(len(hist)), local_mu, mu_floor=mu_floor)
        stats = {"n_d": n_d, "mu_d": mu_d, "source": source}
    stats.update({"n_prompts": n_current, "t_d": t_d, "k": k})
    return _DomainScale(t_d=t_d, t_c=t_c, stats=stats)


def _check_options(
    *,
    history: str,
    domain_mean: str,
    kl_quantile: float,
    eps: float,
    mu_floor: float,
    min_cluster_size: int,
) -> None:
    if history not in ("step", "run"):
        raise ValueError(f"history must be 'step' or 'run', got {history!r}")
    if domain_mean not in ("plain", "cluster_weighted"):
        raise ValueError(
            f"domain_mean must be 'plain' or 'cluster_weighted', got {domain_mean!r}"
        )
    if not 0.0 <= kl_quantile <= 1.0:
        raise ValueError(f"kl_quantile must be in [0, 1], got {kl_quantile!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not (math.isfinite(mu_floor) and mu_floor > 0):
        raise ValueError(f"mu_floor must be a finite number > 0, got {mu_floor!r}")
    if (
        isinstance(min_cluster_size, bool)
        or not isinstance(min_cluster_size, numbers.Integral)
        or min_cluster_size < 1
    ):
        raise ValueError(
            f"min_cluster_size must be an integer >= 1, got {min_cluster_size!r}"
        )


def _check_domains(domains: Sequence[str], n_prompts: int) -> list[str]:
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise TypeError(
            "domains must be a list of str (one per prompt), "
            f"got {type(domains).__name__}"
        )
    if len(domains) != n_prompts:
        raise ValueError(
            f"domains has {len(domains)} entries but rewards has {n_prompts} prompts; "
            "pass one domain per prompt row"
        )
    for i, domain in enumerate(domains):
        if not isinstance(domain, str):
            raise TypeError(f"domains[{i}] must be a str, got {domain!r}")
    return list(domains)


def _kl_damping(
    scaled: np.ndarray, kl: Tensor | None, *, quantile: float
) -> tuple[np.ndarray, float]:
    """Apply ``m = t / (t + max(s * k, 0))`` (App. B.2); returns (damped, t)."""
    if kl is None:
        raise ValueError(
            "kl_damping=True needs kl: pass the per-prompt KL values, shape (P,)"
        )
    if not isinstance(kl, Tensor):
        raise TypeError(f"kl must be a torch.Tensor, got {type(kl).__name__}")
    k = kl.detach().to("cpu", torch.float64).numpy()
    if k.shape == (scaled.shape[0],):
        k = k[:, None]  # (P, 1)
    elif k.shape != scaled.shape:
        raise ValueError(
            f"kl must have shape (P,) = ({scaled.shape[0]},) or (P, K) = "
            f"{scaled.shape}, got {tuple(kl.shape)}"
        )
    if not np.isfinite(k).all():
        raise ValueError("kl contains NaN or inf; check the reference-policy log-probs")
    z = np.maximum(scaled * k, 0.0)  # (P, K)
    t = float(np.quantile(z, quantile))  # linear interpolation
    if t <= 0:
        # No threshold to damp against: at least the chosen quantile of the batch
        # is undamped already, so leave everything undamped (m = 1).
        return scaled, t
    return scaled * (t / (t + z)), t


def _restandardise(
    scaled: np.ndarray, *, eps: float, unbiased: bool
) -> tuple[np.ndarray, float]:
    ddof = 1 if unbiased else 0
    if scaled.size - ddof <= 0:
        return np.zeros_like(scaled), 0.0
    std = float(scaled.std(ddof=ddof))
    if not (math.isfinite(std) and std > 0):
        return np.zeros_like(scaled), std if math.isfinite(std) else 0.0
    return scaled / (std + eps), std


def drpo_advantages(
    rewards: Tensor,
    domains: Sequence[str],
    state: DRPOState | None = None,
    *,
    kl: Tensor | None = None,
    history: HistoryMode = "step",
    domain_mean: DomainMean = "plain",
    clustering: bool = True,
    cluster_eps_clamp: bool = True,
    fixed_temperature: bool = False,
    domain_stats: Mapping[str, tuple[float, float]] | None = None,
    kl_damping: bool = False,
    kl_quantile: float = 0.75,
    restandardize: bool = True,
    eps: float = 1e-6,
    mu_floor: float = MU_FLOOR,
    min_cluster_size: int = MIN_CLUSTER_SIZE,
    unbiased: bool = True,
    k_max: int = 10,
    tol: float = 0.10,
    kmeans_seed: int = 0,
    kmeans_n_init: int = 4,
    kmeans_max_iter: int = 100,
) -> tuple[Tensor, DRPOState]:
    """DRPO advantages (QoQ-Med Sec. 3.3 and App. B).

    1. ``s = grpo_advantages(rewards)`` within each prompt.
    2. Each prompt's reward vector joins its domain's history: with
       ``history="step"`` (paper: "at each step t") the history is this call's
       prompts only; with ``"run"`` (released code) it accumulates across calls.
    3. Per domain, k-means with the elbow rule (:func:`common.kmeans.select_k_elbow`)
       over the history, clusters of at least ``min_cluster_size`` questions; a
       prompt's cluster is the cluster of its own vector.
    4. ``T_d = sqrt(N_d) * max(mu_d, mu_floor)`` and ``T_c = sqrt(N_c) * max(mu_c,
       mu_floor)`` (:func:`domain_temperature`); N is a number of questions and mu a
       mean reward over the domain's history or the cluster.
    5. ``s_scaled = m * s / (T_d * T_c)`` with the KL-aware damping ``m`` (App. B.2)
       when ``kl_damping``, else ``m = 1``.
    6. With ``restandardize``: ``A = s_scaled / (std(s_scaled over all P*K) + eps)``.

    Parameters
    ----------
    rewards : torch.Tensor, shape (P, K)
        Finite rewards, one row per prompt (question) and one column per rollout.
    domains : sequence of str, length P
        Domain (dataset) of each prompt.
    state : DRPOState, optional
        State returned by the previous call; None starts empty. It is not modified.
    kl : torch.Tensor, shape (P,) or (P, K), optional
        KL of the policy to the reference, ``k_q`` per prompt (or per rollout).
        Needed only with ``kl_damping``.
    history : {"step", "run"}
        Which questions the domain statistics and clusters cover (see step 2).
    domain_mean : {"plain", "cluster_weighted"}
        ``mu_d`` as the plain mean of all rewards in the domain's history (paper)
        or ``sum_c mu_c / N_c / sum_c 1 / N_c`` over its clusters (released code).
        Without clustering both are the plain mean.
    clustering : bool
        Scale by the cluster term; False sets ``T_c = 1``.
    cluster_eps_clamp : bool
        Floor ``T_c`` like ``T_d`` (``mu_floor``; the paper clamps at 1e-6). False
        follows the released code: no floor, so a cluster with mean 0 gives ``T_c = 0`` (and a negative mean a
        negative ``T_c``); a prompt whose scaled advantages come out non-finite
        is left unscaled (``s_scaled = s``), as the later fork's guard does.
    fixed_temperature : bool
        Use ``T_d = 1`` (takes precedence over ``domain_stats``).
    domain_stats : mapping of str to (N_d, mu_d), optional
        Externally supplied domain statistics (e.g. federation-wide values from the
        server). When given, no ``T_d`` comes from the local history: a listed domain
        uses its values and a batch domain not listed gets
        :func:`fallback_temperature` of the listed ones (``source`` "fallback"), a
        function of ``domain_stats`` alone. Clusters stay local.
    kl_damping : bool
        Apply ``m = t / (t + z)`` with ``z = max(s_scaled * k_q, 0)`` and ``t`` the
        ``kl_quantile`` quantile of ``z`` over all P*K entries (linear
        interpolation). When ``t <= 0`` nothing is damped (``m = 1``).
    kl_quantile : float
        Quantile of ``z`` used as ``t`` (0.75; the paper gives no value).
    restandardize : bool
        Divide by the batch standard deviation (step 6); if it is 0 the result is 0.
    eps : float
        Added to standard deviations (steps 1 and 6).
    mu_floor : float
        Smallest mean reward a temperature uses (> 0); bounds how far one hard
        domain or cluster can outweigh the others (see :func:`domain_temperature`).
    min_cluster_size : int
        Fewest questions per cluster (>= 1; 1 is the paper's unconstrained k-means).
        Smaller clusters are folded into the nearest one, so ``T_c`` is a statistic of
        a group of questions rather than of a single prompt's own rewards.
    unbiased : bool
        Standard deviations with ``n - 1`` (torch's default, released code) or ``n``.
    k_max : int
        Elbow rule: at most ``k_max`` clusters (10; 3 in a later fork).
    tol : float
        Elbow rule: stopping tolerance (the paper's tau, 0.10; ``advantage.elbow_tol``
        in the config).
    kmeans_seed, kmeans_n_init, kmeans_max_iter : int
        Passed to :func:`common.kmeans.kmeans`.

    Returns
    -------
    advantages : torch.Tensor, shape (P, K)
        Same dtype (floating inputs) and device as ``rewards``.
    state : DRPOState
        New state with the updated history and counts and this call's diagnostics
        in ``last_stats``.

    Notes
    -----
    With ``clustering=False``, ``restandardize=False``, ``kl_damping=False`` and
    either ``fixed_temperature=True`` or ``domain_stats`` for every domain of the
    batch, each prompt's advantages depend only on its own rewards and the external
    statistics. This is the configuration to use under differential privacy.
    """
    _check_rewards(rewards)
    names = _check_domains(domains, rewards.shape[0])
    _check_options(
        history=history,
        domain_mean=domain_mean,
        kl_quantile=kl_quantile,
        eps=eps,
        mu_floor=mu_floor,
        min_cluster_size=min_cluster_size,
    )
    previous = state if state is not None else DRPOState()
    x = rewards.detach().to("cpu", torch.float64).numpy()  # (P, K)
    s = _group_normalise(x, eps=eps, unbiased=unbiased)  # (P, K)

    new_history: dict[str, list[list[float]]] = (
        dict(previous.history) if history == "run" else {}
    )
    counts = dict(previous.counts)
    batch_domains = list(dict.fromkeys(names))  # first-appearance order
    checked: dict[str, tuple[float, float]] = {}
    external_t: dict[str, float] = {}
    if domain_stats is not None and not fixed_temperature:
        checked = {d: _external_stats(d, v) for d, v in domain_stats.items()}
        external_t = domain_temperatures(checked, batch_domains, mu_floor=mu_floor)
    scaled = s.copy()
    domain_report: dict[str, dict[str, Any]] = {}
    for domain in batch_domains:
        rows = [i for i, name in enumerate(names) if name == domain]
        current = x[rows].tolist()
        past = new_history.get(domain, []) if history == "run" else []
        if past and len(past[0]) != x.shape[1]:
            raise ValueError(
                f"domain {domain!r} has history vectors of length {len(past[0])} but "
                f"rewards have K={x.shape[1]}; keep K fixed or use history='step'"
            )
        new_history[domain] = past + current
        counts[domain] = counts.get(domain, 0) + len(rows)
        external = None
        if domain in external_t:
            n_d, mu_d = checked.get(domain, (None, None))
            external = (n_d, mu_d, external_t[domain])
        scale = _scale_domain(
            np.asarray(new_history[domain], dtype=np.float64),
            len(rows),
            external=external,
            fixed_temperature=fixed_temperature,
            domain_mean=domain_mean,
            clustering=clustering,
            cluster_eps_clamp=cluster_eps_clamp,
            mu_floor=mu_floor,
            min_cluster_size=min_cluster_size,
            k_max=k_max,
            tol=tol,
            kmeans_seed=kmeans_seed,
            kmeans_n_init=kmeans_n_init,
            kmeans_max_iter=kmeans_max_iter,
        )
        factor = scale.t_d * scale.t_c  # (n_rows,)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            candidate = s[rows] / factor[:, None]  # (n_rows, K)
        finite = np.isfinite(candidate).all(axis=1)
        scaled[rows] = np.where(finite[:, None], candidate, s[rows])
        domain_report[domain] = scale.stats

    kl_threshold: float | None = None
    if kl_damping:
        scaled, kl_threshold = _kl_damping(scaled, kl, quantile=kl_quantile)
    scale_std: float | None = None
    if restandardize:
        scaled, scale_std = _restandardise(scaled, eps=eps, unbiased=unbiased)

    new_state = DRPOState(
        history=new_history,
        counts=counts,
        last_stats={
            "domains": domain_report,
            "kl_threshold": kl_threshold,
            "scale_std": scale_std,
        },
    )
    advantages = torch.from_numpy(scaled).to(
        device=rewards.device, dtype=_out_dtype(rewards)
    )
    return advantages, new_state
