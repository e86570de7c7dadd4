"""Tests of common.advantages (GRPO, DRPO) against hand-computed values.

Recurring numbers: a group [1, 0] (or [0, 1], [0.5, 0], [1, 0.5]) has mean m and
unbiased std sqrt(2) * |r1 - m| = |r1 - r2| / sqrt(2), so its GRPO advantages are
+-(|r1 - r2| / 2) / (|r1 - r2| / sqrt(2)) = +-1 / sqrt(2) = +-0.7071068 (up to eps).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from common.advantages import (
    MIN_CLUSTER_SIZE,
    MU_FLOOR,
    DRPOState,
    domain_temperature,
    domain_temperatures,
    drpo_advantages,
    grpo_advantages,
)
from common.config import ConfigError, load_config

R2 = 1 / math.sqrt(2)  # 0.7071068
# Options that turn DRPO into plain GRPO scaled by T_d alone, for isolating steps.
NO_CLUSTER_NO_STD = {"clustering": False, "restandardize": False}
# The paper's unconstrained clusters (a cluster may hold a single question), for the
# hand-computed examples of the cluster term below.
ANY_CLUSTER = {"min_cluster_size": 1}


def approx(values, rel: float = 1e-5, abs: float = 1e-6):  # noqa: A002 - pytest name
    return pytest.approx(values, rel=rel, abs=abs)


# ---------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------


def test_grpo_on_a_2x3_example():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    adv = grpo_advantages(rewards)
    # Row 1: mean 1/3; deviations 2/3, -1/3, -1/3; unbiased var (4/9 + 1/9 + 1/9) / 2
    # = 1/3, std 0.5773503 -> 1.1547005, -0.5773503, -0.5773503
    # Row 2: mean 0.4; deviations -0.2, 0, 0.2; var 0.08 / 2 = 0.04, std 0.2
    # -> -1, 0, 1 (times 0.2 / (0.2 + 1e-6) = 0.999995)
    assert adv[0].tolist() == approx([1.1547005, -0.5773503, -0.5773503])
    assert adv[1].tolist() == approx([-0.999995, 0.0, 0.999995])
    assert adv.dtype == torch.float32


def test_grpo_biased_std():
    # Row [1, 0, 0]: population var (4/9 + 1/9 + 1/9) / 3 = 2/9, std 0.4714045
    # -> (2/3) / 0.4714045 = 1.4142136 and (-1/3) / 0.4714045 = -0.7071068
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0]]), unbiased=False)
    assert adv[0].tolist() == approx([1.4142136, -0.7071068, -0.7071068])


def test_grpo_all_equal_rewards_give_exact_zeros():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7]], dtype=torch.float64)
    adv = grpo_advantages(rewards)
    assert torch.equal(adv, torch.zeros(2, 3, dtype=torch.float64))


def test_grpo_single_rollout_gives_zeros():
    adv = grpo_advantages(torch.tensor([[0.3], [0.9]]))
    assert torch.equal(adv, torch.zeros(2, 1))


def test_grpo_rejects_1d_rewards():
    with pytest.raises(ValueError, match=r"2-D .*got shape \(3,\)"):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]))


def test_grpo_rejects_non_finite_rewards_and_says_where():
    with pytest.raises(ValueError, match=r"nan at \[prompt 1, rollout 0\]"):
        grpo_advantages(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))


# ---------------------------------------------------------------------------
# DRPO: temperatures (Sec. 3.3, stage 2)
# ---------------------------------------------------------------------------

# Domain "a": three prompts [1, 0], [1, 0], [1, 0.5]; domain "b": one prompt [0.5, 0].
# Domain "a" has 2 distinct rows -> k = 2 clusters: A = {[1,0], [1,0]} (N_c = 2,
# mean 0.5) and B = {[1, 0.5]} (N_c = 1, mean 0.75).
# Every prompt has s = +-1/sqrt(2).
TWO_DOMAIN_REWARDS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.5], [0.5, 0.0]])
TWO_DOMAINS = ["a", "a", "a", "b"]


def test_drpo_temperatures_plain_domain_mean():
    adv, state = drpo_advantages(
        TWO_DOMAIN_REWARDS, TWO_DOMAINS, restandardize=False, **ANY_CLUSTER
    )
    # a: N_d = 3, mu_d = (1 + 0 + 1 + 0 + 1 + 0.5) / 6 = 0.5833333,
    #    T_d = sqrt(3) * 0.5833333 = 1.0103630
    #    prompt in A: T_c = sqrt(2) * 0.5 = 0.7071068
    #      -> 0.7071068 / (1.0103630 * 0.7071068) = 1 / 1.0103630 = 0.9897433
    #    prompt in B: T_c = sqrt(1) * 0.75 = 0.75
    #      -> 0.7071068 / (1.0103630 * 0.75) = 0.7071068 / 0.7577722 = 0.9331389
    # b (single prompt): N_d = 1, mu_d = 0.25, T_d = 0.25; one cluster, T_c = 0.25
    #      -> 0.7071068 / 0.0625 = 11.3137085
    assert adv[:, 0].tolist() == approx([0.9897433, 0.9897433, 0.9331389, 11.3137085])
    assert adv[:, 1].tolist() == approx(
        [-0.9897433, -0.9897433, -0.9331389, -11.3137085]
    )
    stats = state.last_stats["domains"]
    assert stats["a"]["k"] == 2
    assert stats["a"]["n_d"] == 3.0
    assert stats["a"]["mu_d"] == pytest.approx(0.5833333)
    assert stats["a"]["t_d"] == pytest.approx(1.0103630)
    assert stats["b"] == {
        "n_prompts": 1,
        "n_d": 1.0,
        "mu_d": 0.25,
        "t_d": 0.25,
        "k": 1,
        "source": "local",
    }


def test_drpo_temperatures_cluster_weighted_domain_mean():
    adv, state = drpo_advantages(
        TWO_DOMAIN_REWARDS,
        TWO_DOMAINS,
        restandardize=False,
        domain_mean="cluster_weighted",
        **ANY_CLUSTER,
    )
    # a: mu_d = (0.5 / 2 + 0.75 / 1) / (1/2 + 1/1) = 1.0 / 1.5 = 0.6666667,
    #    T_d = sqrt(3) * 0.6666667 = 1.1547005
    #    A: 0.7071068 / (1.1547005 * 0.7071068) = 0.8660254
    #    B: 0.7071068 / (1.1547005 * 0.75) = 0.7071068 / 0.8660254 = 0.8164966
    # b: one cluster, so the weighted mean is the plain mean: 11.3137085 as before
    assert adv[:, 0].tolist() == approx([0.8660254, 0.8660254, 0.8164966, 11.3137085])
    assert state.last_stats["domains"]["a"]["mu_d"] == pytest.approx(0.6666667)


def test_drpo_restandardizes_over_the_batch():
    adv, state = drpo_advantages(TWO_DOMAIN_REWARDS, TWO_DOMAINS, **ANY_CLUSTER)
    # Scaled entries (plain mean): +-0.9897433 (2 prompts), +-0.9331389, +-11.3137085.
    # Their mean is 0, so the unbiased std is sqrt(sum of squares / (8 - 1)):
    # squares 0.9795918 (x4), 0.8707483 (x2), 128.0 (x2) -> 261.6598638 / 7
    # = 37.3799805 -> std 6.1139170. (Step 1's eps shrinks prompt b's s by a relative
    # 1e-6 / 0.3535534 = 2.8e-6, hence 6.11390 measured; within rel=1e-5.)
    std = 6.1139170
    assert state.last_stats["scale_std"] == pytest.approx(std, rel=1e-5)
    expected = [0.9897433 / std, 0.9897433 / std, 0.9331389 / std, 11.3137085 / std]
    assert adv[:, 0].tolist() == approx(expected, rel=1e-5)


def test_drpo_all_equal_rewards_give_zeros():
    rewards = torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0]])
    adv, state = drpo_advantages(rewards, ["a", "a", "b"])
    assert torch.equal(adv, torch.zeros(3, 2))
    assert state.last_stats["scale_std"] == 0.0


def test_drpo_single_prompt_batch():
    # One prompt [1, 0]: N_d = 1, mu_d = 0.5, T_d = 0.5; one cluster, T_c = 0.5
    # -> s / 0.25 = +-2.8284271. Re-standardised over 2 entries: std =
    # sqrt(2 * 2.8284271^2 / 1) = 4 -> +-0.7071068
    adv, _ = drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"], restandardize=False)
    assert adv[0].tolist() == approx([2.8284271, -2.8284271])
    adv, _ = drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"])
    assert adv[0].tolist() == approx([R2, -R2])


def test_drpo_zero_mean_cluster_with_nonnegative_rewards_stays_finite():
    # Domain "a": [0, 0] and [1, 0] -> k = 2. Prompt [0, 0] has s = 0 and T_c =
    # sqrt(1) * 0 = 0: floored at mu_floor it gives 0 / 0.1 = 0; unclamped 0 / 0 is
    # caught by the guard and left unscaled = 0.
    # Prompt [1, 0]: T_d = sqrt(2) * 0.25 = 0.3535534, T_c = 0.5
    # -> 0.7071068 / 0.1767767 = 4
    rewards = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    for clamp in (True, False):
        adv, _ = drpo_advantages(
            rewards,
            ["a", "a"],
            restandardize=False,
            cluster_eps_clamp=clamp,
            **ANY_CLUSTER,
        )
        assert torch.isfinite(adv).all()
        assert adv.tolist() == [[0.0, 0.0], approx([4.0, -4.0])]


def test_drpo_zero_mean_cluster_clamp_versus_released_code():
    # Rewards [-1, 1]: s = -+1/sqrt(2), cluster mean 0 -> raw T_c = 0; T_d fixed at 1.
    # floor: T_c = sqrt(1) * mu_floor = 0.1 -> s / 0.1 = -+7.071068
    # (the paper's eps clamp, reachable with mu_floor=1e-6: s / 1e-6 = -+707106.8)
    # no clamp (released code): factor 0 -> non-finite -> prompt left unscaled = s
    rewards = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    common = {"restandardize": False, "fixed_temperature": True}
    clamped, _ = drpo_advantages(rewards, ["a"], cluster_eps_clamp=True, **common)
    paper, _ = drpo_advantages(rewards, ["a"], mu_floor=1e-6, **common)
    raw, _ = drpo_advantages(rewards, ["a"], cluster_eps_clamp=False, **common)
    assert clamped[0].tolist() == approx([-7.071068, 7.071068])
    assert paper[0].tolist() == approx([-707106.8, 707106.8])
    assert raw[0].tolist() == approx([-R2, R2])


def test_drpo_without_clustering_or_temperature_is_grpo():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    adv, _ = drpo_advantages(
        rewards, ["a", "b"], fixed_temperature=True, **NO_CLUSTER_NO_STD
    )
    # Same hand values as test_grpo_on_a_2x3_example.
    assert adv[0].tolist() == approx([1.1547005, -0.5773503, -0.5773503])
    assert adv[1].tolist() == approx([-0.999995, 0.0, 0.999995])


# ---------------------------------------------------------------------------
# DRPO: bounded temperatures and clusters of several questions
# ---------------------------------------------------------------------------


def test_domain_temperature_floors_the_mean_and_the_count():
    """T = sqrt(max(N, 1)) * max(mu, mu_floor), so T >= mu_floor."""
    assert domain_temperature(4.0, 0.5) == pytest.approx(1.0)  # 2 * 0.5
    assert domain_temperature(4.0, 0.0) == pytest.approx(0.2)  # 2 * 0.1, not 1e-6
    assert domain_temperature(0.25, 0.5) == pytest.approx(0.5)  # noisy N < 1 -> 1
    assert domain_temperature(9.0, 0.0, mu_floor=0.5) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="mu_floor"):
        domain_temperature(4.0, 0.5, mu_floor=0.0)
    with pytest.raises(ValueError, match="finite"):
        domain_temperature(math.nan, 0.5)


def test_domain_temperatures_give_a_domain_without_statistics_the_mean():
    """One fallback rule: the mean of the known temperatures, or 1 when none is known."""
    stats = {"a": (4.0, 0.5), "b": (9.0, 1.0)}  # T = 1 and 3
    assert domain_temperatures(stats, ["b", "c", "a"]) == approx(
        {"b": 3.0, "c": 2.0, "a": 1.0}
    )
    assert domain_temperatures(stats) == approx({"a": 1.0, "b": 3.0})
    assert domain_temperatures({}, ["a", "b"]) == {"a": 1.0, "b": 1.0}


def test_drpo_zero_mean_domain_does_not_crush_the_other_domains():
    """A held-out mean of 0 makes T_d = 2 * 0.1, not 1e-6: the others keep 1/5 of its scale."""
    # a: (N, mu) = (4, 0) -> T_a = 2 * 0.1 = 0.2; b: (4, 0.5) -> T_b = 1. Both prompts
    # [1, 0] have s = +-0.7071068 -> scaled +-3.5355339 (a) and +-0.7071068 (b).
    # Batch std (mean 0, 4 entries, n - 1): sqrt((2 * 12.5 + 2 * 0.5) / 3)
    # = sqrt(26 / 3) = 2.9439203 -> a: +-1.2009612, b: +-0.2401922.
    # (With T_a = 1e-6, b fell to +-1.2e-6.)
    rewards = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    stats = {"a": (4.0, 0.0), "b": (4.0, 0.5)}
    adv, state = drpo_advantages(
        rewards, ["a", "b"], domain_stats=stats, clustering=False
    )
    assert adv[1].tolist() == approx([0.2401922, -0.2401922])
    assert adv[0].tolist() == approx([1.2009612, -1.2009612])
    assert state.last_stats["domains"]["a"]["t_d"] == pytest.approx(0.2)


def test_drpo_a_nearly_zero_prompt_is_not_its_own_cluster():
    """With clusters of >= 4 questions, [0.05, 0, 0, 0] is weighted like its batch."""
    # Five distinct rows: without a minimum size each was its own cluster, so
    # [0.05, 0, 0, 0] had T_c = sqrt(1) * 0.0125 and dwarfed the rest of the batch.
    # Now 5 // 4 = 1 cluster: every prompt shares T_d * T_c, so re-standardisation
    # leaves A = s / std(s). Each row's s has sum of squares K - 1 = 3 (n - 1 std),
    # mean 0, so std over the 20 entries = sqrt(5 * 3 / 19) = 0.8885233.
    # s of [0.05, 0, 0, 0]: mean 0.0125, std 0.025 -> [1.5, -0.5, -0.5, -0.5]
    # s of [1, 0, 1, 0]: +-0.8660254; of [1, 1, 0, 1]: [0.5, 0.5, -1.5, 0.5].
    rewards = torch.tensor(
        [[0.05, 0, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 1]],
        dtype=torch.float64,
    )
    # (Step 1's eps shrinks the first row's s by a relative 1e-6 / 0.025 = 4e-5.)
    adv, state = drpo_advantages(rewards, ["a"] * 5)
    assert state.last_stats["domains"]["a"]["k"] == 1
    assert adv[0].tolist() == approx(
        [1.6881943, -0.5627314, -0.5627314, -0.5627314], rel=1e-4
    )
    assert adv[1].tolist() == approx([0.9746794, -0.9746794, 0.9746794, -0.9746794])
    assert adv[2].tolist() == approx([0.5627314, 0.5627314, -1.6881943, 0.5627314])


def test_drpo_a_hard_cluster_is_bounded_by_the_floor():
    """A cluster whose mean is near 0 uses mu_floor: T_c = sqrt(4) * 0.1 = 0.2."""
    # Four prompts, one cluster; domain fixed at T_d = 1. Cluster mean
    # (0.05 + 0 + 0.05 + 0) / 16 = 0.00625 < 0.1 -> T_c = 0.2 (was 2 * 0.00625 = 0.0125).
    # Prompt [0.05, 0, 0, 0]: s = [1.5, -0.5, -0.5, -0.5] -> / 0.2 = [7.5, -2.5, ...]
    # (eps = 1e-6 on its std 0.025: relative 4e-5).
    rewards = torch.tensor(
        [[0.05, 0, 0, 0], [0, 0, 0, 0], [0, 0.05, 0, 0], [0, 0, 0, 0]],
        dtype=torch.float64,
    )
    adv, _ = drpo_advantages(
        rewards, ["a"] * 4, fixed_temperature=True, restandardize=False
    )
    assert adv[0].tolist() == approx([7.5, -2.5, -2.5, -2.5], rel=1e-4)


@pytest.mark.parametrize(
    "key",
    ["advantage.mu_floor=0", "advantage.min_cluster_size=0", "aggregation.mu_floor=0"],
)
def test_config_rejects_bounds_that_turn_them_off(key):
    """A floor of 0 or clusters of 0 questions are refused, naming the key."""
    with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
        load_config(overrides=[key])


def test_config_floors_default_to_the_shared_constant():
    """The hospitals' and the server's floors and the function default agree."""
    cfg = load_config()
    assert cfg.advantage.mu_floor == cfg.aggregation.mu_floor == MU_FLOOR
    assert cfg.advantage.min_cluster_size == MIN_CLUSTER_SIZE
    assert cfg.aggregation.weight_cap == 0.5


def test_drpo_rejects_bad_floor_and_cluster_size():
    rewards = torch.tensor([[1.0, 0.0]])
    with pytest.raises(ValueError, match="mu_floor must be a finite number > 0"):
        drpo_advantages(rewards, ["a"], mu_floor=0.0)
    with pytest.raises(ValueError, match="min_cluster_size must be an integer >= 1"):
        drpo_advantages(rewards, ["a"], min_cluster_size=0)


# ---------------------------------------------------------------------------
# DRPO: KL-aware damping (App. B.2)
# ---------------------------------------------------------------------------


def test_drpo_kl_damping_hand_example():
    # s = [[+r, -r], [-r, +r]] with r = 1/sqrt(2); T_d = T_c = 1; kl = [2, 1].
    # z = max(s * k, 0) = [[2r, 0], [0, r]] = [[1.4142136, 0], [0, 0.7071068]]
    # sorted z: 0, 0, 0.7071068, 1.4142136; 0.75 quantile at position 0.75 * 3 = 2.25
    # -> t = 0.7071068 + 0.25 * 0.7071068 = 0.8838835
    # m[0, 0] = t / (t + 2r) = 0.8838835 / 2.2980971 = 0.3846154 -> 0.2719641
    # m[1, 1] = t / (t + r) = 0.8838835 / 1.5909903 = 0.5555556 -> 0.3928371
    # entries with z = 0 keep m = 1.
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    adv, state = drpo_advantages(
        rewards,
        ["a", "a"],
        kl=torch.tensor([2.0, 1.0]),
        kl_damping=True,
        fixed_temperature=True,
        **NO_CLUSTER_NO_STD,
    )
    assert state.last_stats["kl_threshold"] == pytest.approx(0.8838835, rel=1e-5)
    assert adv.tolist() == [approx([0.2719641, -R2]), approx([-R2, 0.3928371])]


def test_drpo_kl_damping_with_zero_threshold_does_nothing():
    # kl = 0 everywhere -> z = 0 -> t = 0 -> m = 1 (documented choice).
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    adv, state = drpo_advantages(
        rewards,
        ["a", "a"],
        kl=torch.zeros(2),
        kl_damping=True,
        fixed_temperature=True,
        **NO_CLUSTER_NO_STD,
    )
    assert state.last_stats["kl_threshold"] == 0.0
    assert adv.tolist() == [approx([R2, -R2]), approx([-R2, R2])]


def test_drpo_kl_damping_needs_kl():
    with pytest.raises(ValueError, match="kl_damping=True needs kl"):
        drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"], kl_damping=True)


def test_drpo_kl_damping_rejects_wrong_kl_shape():
    with pytest.raises(ValueError, match=r"kl must have shape"):
        drpo_advantages(
            torch.tensor([[1.0, 0.0]]), ["a"], kl=torch.zeros(3), kl_damping=True
        )


# ---------------------------------------------------------------------------
# DRPO: external domain statistics
# ---------------------------------------------------------------------------


def test_drpo_external_domain_stats_replace_local_ones():
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    # a: external (N_d, mu_d) = (9, 0.5) -> T_d = 3 * 0.5 = 1.5 -> s / 1.5 = 0.4714045
    # c: external (16, 0.25) -> T_d = 4 * 0.25 = 1 -> s = 0.7071068
    # b: no external value -> not its local history (N_d = 1, mu_d = 0.25 would give
    #    T_d = 0.25) but the mean external temperature (1.5 + 1) / 2 = 1.25
    #    -> 0.7071068 / 1.25 = 0.5656854
    adv, state = drpo_advantages(
        rewards,
        ["a", "b", "c"],
        domain_stats={"a": (9.0, 0.5), "c": (16.0, 0.25)},
        **NO_CLUSTER_NO_STD,
    )
    assert adv[0].tolist() == approx([0.4714045, -0.4714045])
    assert adv[1].tolist() == approx([0.5656854, -0.5656854])
    assert adv[2].tolist() == approx([R2, -R2])
    domains = state.last_stats["domains"]
    assert domains["a"]["source"] == "external"
    assert domains["a"]["t_d"] == pytest.approx(1.5)
    assert domains["b"]["source"] == "fallback"
    assert domains["b"]["t_d"] == pytest.approx(1.25)
    assert domains["b"]["n_d"] is None and domains["b"]["mu_d"] is None


def test_drpo_external_domain_stats_keep_local_clusters():
    # a: two prompts [1, 0] and [1, 0.5] -> k = 2, T_c = 0.5 and 0.75.
    # External (4, 0.5): T_d = 2 * 0.5 = 1
    # -> 0.7071068 / 0.5 = 1.4142136 and 0.7071068 / 0.75 = 0.9428090
    rewards = torch.tensor([[1.0, 0.0], [1.0, 0.5]])
    adv, _ = drpo_advantages(
        rewards,
        ["a", "a"],
        domain_stats={"a": (4, 0.5)},
        restandardize=False,
        **ANY_CLUSTER,
    )
    assert adv[:, 0].tolist() == approx([1.4142136, 0.9428090])


def test_drpo_rejects_bad_external_stats():
    with pytest.raises(ValueError, match=r"domain_stats\['a'\].*N_d > 0"):
        drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"], domain_stats={"a": (0, 0.5)})


# ---------------------------------------------------------------------------
# DRPO: history and state
# ---------------------------------------------------------------------------


def run_two_calls(history: str):
    first, state = drpo_advantages(
        torch.tensor([[1.0, 0.0]]), ["a"], history=history, **NO_CLUSTER_NO_STD
    )
    second, state = drpo_advantages(
        torch.tensor([[1.0, 0.5]]), ["a"], state, history=history, **NO_CLUSTER_NO_STD
    )
    return first, second, state


def test_drpo_run_history_accumulates_across_calls():
    _, second, state = run_two_calls("run")
    # History [1, 0], [1, 0.5]: N_d = 2, mu_d = 2.5 / 4 = 0.625,
    # T_d = sqrt(2) * 0.625 = 0.8838835 -> 0.7071068 / 0.8838835 = 0.8
    assert second[0].tolist() == approx([0.8, -0.8])
    assert state.history == {"a": [[1.0, 0.0], [1.0, 0.5]]}
    assert state.counts == {"a": 2}


def test_drpo_step_history_uses_only_the_current_call():
    _, second, state = run_two_calls("step")
    # Only [1, 0.5]: N_d = 1, mu_d = 0.75, T_d = 0.75 -> 0.7071068 / 0.75 = 0.9428090
    assert second[0].tolist() == approx([0.9428090, -0.9428090])
    assert state.history == {"a": [[1.0, 0.5]]}
    assert state.counts == {"a": 2}


def test_drpo_run_history_clusters_the_current_prompt_with_the_past():
    # History [1, 0], [1, 0.5] -> k = 2; the current prompt [1, 0.5] is alone in its
    # cluster: T_c = 0.75; T_d = 0.8838835 as above -> 0.8 / 0.75 = 1.0666667
    _, state = drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"], history="run")
    adv, state = drpo_advantages(
        torch.tensor([[1.0, 0.5]]),
        ["a"],
        state,
        history="run",
        restandardize=False,
        **ANY_CLUSTER,
    )
    assert adv[0].tolist() == approx([1.0666667, -1.0666667])
    assert state.last_stats["domains"]["a"]["k"] == 2


def test_drpo_does_not_modify_the_given_state():
    _, state = drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"], history="run")
    before = json.dumps(state.to_json(), sort_keys=True)
    drpo_advantages(torch.tensor([[0.0, 1.0]]), ["a"], state, history="run")
    assert json.dumps(state.to_json(), sort_keys=True) == before


def test_drpo_run_history_rejects_a_changed_group_size():
    _, state = drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"], history="run")
    with pytest.raises(ValueError, match="length 2 but rewards have K=3"):
        drpo_advantages(torch.tensor([[1.0, 0.0, 0.5]]), ["a"], state, history="run")


def test_drpo_state_json_round_trip():
    _, _, state = run_two_calls("run")
    _, state = drpo_advantages(
        torch.tensor([[0.25, 0.5], [1.0, 1.0]]), ["b", "a"], state, history="run"
    )
    restored = DRPOState.from_json(json.loads(json.dumps(state.to_json())))
    assert restored == state
    # Continuing from the restored state gives the same advantages.
    nxt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    a1, s1 = drpo_advantages(nxt, ["a", "b"], state, history="run")
    a2, s2 = drpo_advantages(nxt, ["a", "b"], restored, history="run")
    assert torch.equal(a1, a2)
    assert s1 == s2


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"history": {"a": [[1.0, "x"]]}}, "not a list of finite numbers"),
        ({"history": {"a": [[1.0, 0.0], [1.0]]}}, "mixes reward vectors"),
        ({"counts": {"a": -1}}, r"counts\['a'\] must be an integer >= 0"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_drpo_state_from_json_rejects_bad_payloads(payload, message):
    with pytest.raises((TypeError, ValueError), match=message):
        DRPOState.from_json(payload)


# ---------------------------------------------------------------------------
# DRPO: validation
# ---------------------------------------------------------------------------


def test_drpo_rejects_domain_count_mismatch():
    message = "domains has 1 entries but rewards has 2 prompts"
    with pytest.raises(ValueError, match=message):
        drpo_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["a"])


def test_drpo_rejects_unknown_option_values():
    message = "history must be 'step' or 'run', got 'epoch'"
    with pytest.raises(ValueError, match=message):
        drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"], history="epoch")
    with pytest.raises(ValueError, match="domain_mean"):
        drpo_advantages(torch.tensor([[1.0, 0.0]]), ["a"], domain_mean="median")


# ---------------------------------------------------------------------------
# DRPO under differential privacy: no coupling between prompts
# ---------------------------------------------------------------------------

DP_DOMAINS = ["a", "b", "a", "c", "b"]
DP_STATS = {"a": (4.0, 0.5), "b": (9.0, 0.5), "c": (1.0, 2.0)}  # T_d = 1, 1.5, 2


def dp_rewards(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.rand(5, 4, generator=generator)
    rewards[0] = torch.tensor([1.0, 0.0, 0.5, 0.5])  # the prompt under test
    return rewards


@pytest.mark.parametrize(
    "dp_options",
    [
        pytest.param({"domain_stats": DP_STATS}, id="server-domain-stats"),
        pytest.param({"fixed_temperature": True}, id="fixed-temperature"),
    ],
)
@pytest.mark.parametrize("history", ["step", "run"])
def test_drpo_dp_mode_prompt_depends_only_on_its_own_rewards(dp_options, history):
    options = {
        "clustering": False,
        "restandardize": False,
        "history": history,
        **dp_options,
    }
    state = None
    if history == "run":
        # A history of other prompts must not matter either.
        _, state = drpo_advantages(dp_rewards(1), DP_DOMAINS, history="run")
    first, _ = drpo_advantages(dp_rewards(2), DP_DOMAINS, state, **options)
    second, _ = drpo_advantages(dp_rewards(3), DP_DOMAINS, state, **options)
    assert not torch.equal(dp_rewards(2)[1:], dp_rewards(3)[1:])
    assert torch.equal(first[0], second[0])
    # Row [1, 0, 0.5, 0.5]: mean 0.5, unbiased std sqrt(0.5 / 3) = 0.4082483
    # -> +-1.2247449, 0, 0; domain "a" has T_d = sqrt(4) * 0.5 = 1 (or fixed 1)
    assert first[0].tolist() == approx([1.2247449, -1.2247449, 0.0, 0.0])


def test_drpo_default_mode_couples_prompts():
    # Control for the test above: with clustering and re-standardisation on, the
    # same change to the other prompts does change prompt 0's advantages.
    first, _ = drpo_advantages(dp_rewards(2), DP_DOMAINS)
    second, _ = drpo_advantages(dp_rewards(3), DP_DOMAINS)
    assert not torch.allclose(first[0], second[0])
