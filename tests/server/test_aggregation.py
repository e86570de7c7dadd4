"""Tests for server.aggregation: client weights, the three merge modes, FedNova."""

from __future__ import annotations

import math

import pytest
import torch

from server.aggregation import (
    a_row_scale,
    aggregate,
    client_weights,
    lora_pairs,
    update_norm,
)

PREFIX = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
A = f"{PREFIX}.lora_A.weight"
B = f"{PREFIX}.lora_B.weight"


def t(rows: list[list[float]]) -> torch.Tensor:
    """A float32 tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)


def adapter(a: list[list[float]], b: list[list[float]]) -> dict[str, torch.Tensor]:
    """A one-layer adapter with the given A (r, in) and B (out, r)."""
    return {A: t(a), B: t(b)}


# ---------------------------------------------------------------------------
# Client weights
# ---------------------------------------------------------------------------


def test_examples_weights_are_proportional_to_counts() -> None:
    """FedAvg weights are n_k / sum n."""
    # 10/100, 30/100, 60/100
    assert client_weights("examples", num_examples=[10, 30, 60]) == pytest.approx(
        [0.1, 0.3, 0.6]
    )


def test_uniform_weights_ignore_counts() -> None:
    """Uniform weights are 1/K whatever the counts."""
    assert client_weights("uniform", num_examples=[1, 100, 7, 0]) == pytest.approx(
        [0.25] * 4
    )


def test_domain_weights_sum_noisy_counts_then_clamp() -> None:
    """w_k ∝ max(sum_d n_kd / T_d, 0): a negative noisy count offsets, it is not dropped."""
    counts = [{"a": 4, "b": 0}, {"a": 1, "b": 9}, {"a": 2, "b": -3}]
    # raw: 4/2 + 0/3 = 2;  1/2 + 9/3 = 3.5;  max(2/2 - 3/3, 0) = 0;  total 5.5
    # (clamping each count first gave client 2 the phantom raw weight 1: 1/6.5)
    weights = client_weights(
        "domain",
        num_examples=[4, 10, 2],
        domain_counts=counts,
        domain_temperature={"a": 2.0, "b": 3.0},
    )
    assert weights == pytest.approx([2 / 5.5, 3.5 / 5.5, 0.0])


def test_domain_without_temperature_uses_the_mean_temperature() -> None:
    """A domain missing from domain_temperature has the mean of the others' T (here 3)."""
    counts = [{"a": 2, "c": 3}, {"b": 4, "c": 12}]
    # raw: 2/2 + 3/3 = 2;  4/4 + 12/3 = 5;  total 7   (T = 1 for c gave 4/17, 13/17)
    weights = client_weights(
        "domain",
        num_examples=[5, 5],
        domain_counts=counts,
        domain_temperature={"a": 2.0, "b": 4.0},
    )
    assert weights == pytest.approx([2 / 7, 5 / 7])


def test_cap_redistributes_excess_proportionally() -> None:
    """One pass: the capped excess goes to the others in proportion 2:1."""
    # normalised 0.7, 0.2, 0.1; cap 0.5 leaves 0.5 for clients 1, 2 -> 1/3, 1/6
    weights = client_weights("examples", num_examples=[70, 20, 10], cap=0.5)
    assert weights == pytest.approx([0.5, 1 / 3, 1 / 6])


def test_cap_iterates_until_stable() -> None:
    """Redistribution can push another client over the cap."""
    # normalised 0.5, 0.4, 0.1; cap 0.4.
    # pass 1: client 0 -> 0.4; 0.6 split 40:10 -> 0.48, 0.12 (client 1 now over)
    # pass 2: client 1 -> 0.4; client 2 gets 1 - 0.8 = 0.2
    weights = client_weights("examples", num_examples=[50, 40, 10], cap=0.4)
    assert weights == pytest.approx([0.4, 0.4, 0.2])


def test_cap_infeasible_raises() -> None:
    """cap * K < 1 cannot sum to 1."""
    with pytest.raises(ValueError, match="infeasible for 3 clients"):
        client_weights("uniform", num_examples=[1, 1, 1], cap=0.3)


def test_cap_infeasible_with_zero_weight_clients_raises() -> None:
    """Zero-weight clients cannot absorb any excess."""
    with pytest.raises(ValueError, match="only 1 of 3 clients"):
        client_weights("examples", num_examples=[5, 0, 0], cap=0.5)


def test_all_zero_raw_weights_name_the_clients() -> None:
    """All-zero raw weights are an error listing the clients."""
    with pytest.raises(ValueError, match="clients \\[0, 1\\]"):
        client_weights("domain", num_examples=[3, 3], domain_counts=[{"a": -1}, {}])


def test_unknown_weight_mode_raises() -> None:
    """An unknown mode is named in the error."""
    with pytest.raises(ValueError, match="'median'"):
        client_weights("median", num_examples=[1])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Layer pairing and key checks
# ---------------------------------------------------------------------------


def test_lora_pairs_match_prefixes() -> None:
    """A and B keys are paired by their common prefix."""
    pairs = lora_pairs({**adapter([[1.0, 0.0]], [[1.0], [0.0]]), "x.bias": t([[0.0]])})
    assert list(pairs) == [PREFIX]
    assert (pairs[PREFIX].a_key, pairs[PREFIX].b_key) == (A, B)


def test_lora_pairs_reject_orphan_b() -> None:
    """A B without its A is an error naming the missing key."""
    with pytest.raises(ValueError, match="lora_A"):
        lora_pairs({B: t([[1.0]])})


def test_client_with_missing_key_is_named() -> None:
    """In fedit every client needs every global key."""
    g = adapter([[0.0, 0.0]], [[0.0], [0.0]])
    with pytest.raises(ValueError, match="client 1 .*missing"):
        aggregate(g, [g, {B: g[B]}], [0.5, 0.5], mode="fedit")


def test_weights_must_sum_to_one() -> None:
    """Unnormalised weights are rejected."""
    g = adapter([[0.0, 0.0]], [[0.0], [0.0]])
    with pytest.raises(ValueError, match="sum to 1"):
        aggregate(g, [g, g], [0.5, 0.6])


# ---------------------------------------------------------------------------
# fedit
# ---------------------------------------------------------------------------


def test_fedit_averages_factors_and_reports_error() -> None:
    """FedIT averages A and B separately; its error matches the hand formula."""
    # Prepare: B1 A1 = [[1,0],[0,0]], B2 A2 = [[0,0],[0,1]], w = (0.5, 0.5)
    g = adapter([[3.0, 3.0]], [[3.0], [3.0]])  # drops out without FedNova
    c1 = adapter([[1.0, 0.0]], [[1.0], [0.0]])
    c2 = adapter([[0.0, 1.0]], [[0.0], [1.0]])
    # Execute
    result = aggregate(g, [c1, c2], [0.5, 0.5], mode="fedit")
    # Assert: A_avg = [[0.5, 0.5]], B_avg = [[0.5], [0.5]]
    assert torch.allclose(result.adapter[A], t([[0.5, 0.5]]))
    assert torch.allclose(result.adapter[B], t([[0.5], [0.5]]))
    # M = diag(0.5, 0.5), ||M|| = sqrt(0.5); B_avg A_avg = 0.25 * ones(2, 2)
    # M - BA = [[0.25, -0.25], [-0.25, 0.25]], ||.|| = sqrt(4 * 0.0625) = 0.5
    # error = 0.5 / sqrt(0.5) = sqrt(0.5)
    assert result.fedit_error == pytest.approx(math.sqrt(0.5), rel=1e-9)
    assert result.svd_truncation_error is None
    assert result.layers[PREFIX].error_norm == pytest.approx(0.5, rel=1e-9)


def test_fedit_error_is_zero_when_reference_is_zero() -> None:
    """0/0 is reported as 0."""
    g = adapter([[0.0, 0.0]], [[0.0], [0.0]])
    assert aggregate(g, [g, g], [0.5, 0.5]).fedit_error == 0.0


def test_fedit_error_joint_over_layers_matches_dense_reference() -> None:
    """The factored norms equal a dense computation on random layers."""
    gen = torch.Generator().manual_seed(0)

    def rand_adapter() -> dict[str, torch.Tensor]:
        return {
            "l0.lora_A.weight": torch.randn(3, 6, generator=gen),
            "l0.lora_B.weight": torch.randn(5, 3, generator=gen),
            "l1.lora_A.weight": torch.randn(3, 4, generator=gen),
            "l1.lora_B.weight": torch.randn(7, 3, generator=gen),
        }

    g, clients, w = rand_adapter(), [rand_adapter() for _ in range(3)], [0.2, 0.3, 0.5]
    result = aggregate(g, clients, w, mode="fedit")
    num = den = 0.0
    for layer in ("l0", "l1"):
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        m = sum(wk * c[b].double() @ c[a].double() for wk, c in zip(w, clients))
        b_avg = sum(wk * c[b].double() for wk, c in zip(w, clients))
        a_avg = sum(wk * c[a].double() for wk, c in zip(w, clients))
        num += float(((m - b_avg @ a_avg) ** 2).sum())
        den += float((m**2).sum())
    assert result.fedit_error == pytest.approx(math.sqrt(num / den), rel=1e-6)


# ---------------------------------------------------------------------------
# ffa
# ---------------------------------------------------------------------------


def test_ffa_averages_b_only_and_is_exact() -> None:
    """FFA keeps the global A and averages B; the product error is 0."""
    # Prepare: frozen A = [[1, 2]]; clients send B only.
    g = adapter([[1.0, 2.0]], [[0.0], [0.0]])
    c1, c2 = {B: t([[1.0], [0.0]])}, {B: t([[0.0], [2.0]])}
    # Execute
    result = aggregate(g, [c1, c2], [0.25, 0.75], mode="ffa")
    # Assert: B = 0.25 * [1, 0] + 0.75 * [0, 2] = [0.25, 1.5]
    assert torch.equal(result.adapter[A], g[A])
    assert torch.allclose(result.adapter[B], t([[0.25], [1.5]]))
    assert result.fedit_error is not None and result.fedit_error < 1e-6


def test_ffa_accepts_a_rounded_through_bf16() -> None:
    """A client A equal to the global A up to bf16 rounding is accepted."""
    g = adapter([[1.1, 2.3]], [[0.0], [0.0]])
    sent = {A: g[A].to(torch.bfloat16), B: t([[1.0], [1.0]])}
    result = aggregate(g, [sent], [1.0], mode="ffa")
    assert torch.equal(result.adapter[A], g[A])


def test_ffa_rejects_a_changed_by_client() -> None:
    """A client that trained A violates FFA."""
    g = adapter([[1.0, 2.0]], [[0.0], [0.0]])
    sent = {A: t([[1.0, 2.5]]), B: t([[1.0], [1.0]])}
    with pytest.raises(ValueError, match="client 0 sent .*lora_A"):
        aggregate(g, [sent], [1.0], mode="ffa")


# ---------------------------------------------------------------------------
# svd
# ---------------------------------------------------------------------------

# Two clients whose products have rank 1 each, in a rank-2 adapter:
# B1 A1 = [[2,0,0],[0,0,0]], B2 A2 = [[0,0,0],[0,4,0]]; w = (0.5, 0.5)
# M = [[1,0,0],[0,2,0]]: singular values 2 (u = e2, v = e2) and 1 (u = e1, v = e1).
SVD_GLOBAL = adapter([[0.0] * 3, [0.0] * 3], [[0.0, 0.0], [0.0, 0.0]])
SVD_C1 = adapter([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]])
SVD_C2 = adapter([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0], [4.0, 0.0]])


def test_svd_is_exact_when_ranks_fit() -> None:
    """Rank(M) <= r: B A == M and the truncation error is ~0."""
    result = aggregate(SVD_GLOBAL, [SVD_C1, SVD_C2], [0.5, 0.5], mode="svd")
    # The global A is 0, so its row scale falls back to 1:
    # B = U S = [[0, 1], [2, 0]], A = V^T = [[0, 1, 0], [1, 0, 0]]
    assert torch.allclose(result.adapter[B], t([[0.0, 1.0], [2.0, 0.0]]), atol=1e-6)
    expected_a = t([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(result.adapter[A], expected_a, atol=1e-6)
    product = result.adapter[B] @ result.adapter[A]
    assert torch.allclose(product, t([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), atol=1e-6)
    assert result.svd_truncation_error == pytest.approx(0.0, abs=1e-7)
    assert result.fedit_error is None


def test_svd_truncation_error_when_rank_is_cut() -> None:
    """Keeping 1 of 2 singular values (2, 1) loses 1/sqrt(5)."""
    result = aggregate(SVD_GLOBAL, [SVD_C1, SVD_C2], [0.5, 0.5], mode="svd", rank=1)
    # kept: sigma = 2 -> B = [[0, 0], [2, 0]], A = [[0, 1, 0], [0, 0, 0]]
    assert torch.allclose(result.adapter[B], t([[0.0, 0.0], [2.0, 0.0]]), atol=1e-6)
    assert torch.allclose(result.adapter[A], t([[0.0, 1.0, 0.0], [0.0] * 3]), atol=1e-6)
    # error = sqrt(1^2) / sqrt(2^2 + 1^2) = 1 / sqrt(5)
    assert result.svd_truncation_error == pytest.approx(1 / math.sqrt(5), rel=1e-9)


def test_svd_error_positive_when_sum_of_ranks_exceeds_r() -> None:
    """Two rank-1 clients in a rank-1 adapter: M = diag(0.75, 0.25) is cut."""
    g = adapter([[0.0, 0.0]], [[0.0], [0.0]])
    c1 = adapter([[1.0, 0.0]], [[1.0], [0.0]])
    c2 = adapter([[0.0, 1.0]], [[0.0], [1.0]])
    result = aggregate(g, [c1, c2], [0.75, 0.25], mode="svd")
    # sigma = (0.75, 0.25); keep 0.75: B = [[0.75], [0]], A = [[1, 0]] (global A = 0)
    assert torch.allclose(result.adapter[B], t([[0.75], [0.0]]), atol=1e-6)
    assert torch.allclose(result.adapter[A], t([[1.0, 0.0]]), atol=1e-6)
    # error = 0.25 / sqrt(0.75^2 + 0.25^2) = 0.25 / sqrt(0.625) = 1 / sqrt(10)
    assert result.svd_truncation_error == pytest.approx(1 / math.sqrt(10), rel=1e-9)


def test_svd_matches_dense_singular_values_and_is_deterministic() -> None:
    """The truncation error equals the dense spectrum's tail; signs are fixed."""
    gen = torch.Generator().manual_seed(1)
    clients = [
        {
            "l.lora_A.weight": torch.randn(2, 9, generator=gen),
            "l.lora_B.weight": torch.randn(8, 2, generator=gen),
        }
        for _ in range(3)
    ]
    g = {k: torch.zeros_like(v) for k, v in clients[0].items()}
    w = [0.5, 0.3, 0.2]
    first = aggregate(g, clients, w, mode="svd")
    second = aggregate(g, clients, w, mode="svd")
    m = sum(
        wk * c["l.lora_B.weight"].double() @ c["l.lora_A.weight"].double()
        for wk, c in zip(w, clients)
    )
    s = torch.linalg.svdvals(m)
    expected = math.sqrt(float((s[2:] ** 2).sum() / (s**2).sum()))
    assert first.svd_truncation_error == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(first.adapter[k], second.adapter[k]) for k in g)
    b = first.adapter["l.lora_B.weight"]
    pivots = b.abs().argmax(dim=0)
    assert bool((b[pivots, torch.arange(2)] > 0).all())


def test_svd_keeps_a_at_the_global_row_scale() -> None:
    """A = a V^T with a = the global A's row norm (0.6), B = U S / a: B A = M exactly."""
    g = adapter([[0.6, 0.0, 0.0], [0.0, 0.0, 0.6]], [[0.0, 0.0], [0.0, 0.0]])
    result = aggregate(g, [SVD_C1, SVD_C2], [0.5, 0.5], mode="svd")
    # M = [[1, 0, 0], [0, 2, 0]] as above (B_g = 0): A = 0.6 [[0, 1, 0], [1, 0, 0]],
    # B = [[0, 1], [2, 0]] / 0.6. (sqrt(S) V^T gave rows of norm sqrt2 and 1.)
    expected_a = t([[0.0, 0.6, 0.0], [0.6, 0.0, 0.0]])
    assert torch.allclose(result.adapter[A], expected_a, atol=1e-6)
    assert torch.allclose(
        result.adapter[B], t([[0.0, 1 / 0.6], [2 / 0.6, 0.0]]), atol=1e-6
    )
    product = result.adapter[B] @ result.adapter[A]
    assert torch.allclose(product, t([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), atol=1e-6)


def test_svd_of_a_small_update_keeps_the_initial_a_scale() -> None:
    """From a PEFT-style init (row norms ~ 1/sqrt(3)) A's rows keep that RMS norm."""
    gen = torch.Generator().manual_seed(0)
    r, n_in, n_out = 4, 32, 16
    a0 = (torch.rand(r, n_in, generator=gen) * 2 - 1) / math.sqrt(
        n_in
    )  # U(+-1/sqrt(in))
    g = {"l.lora_A.weight": a0, "l.lora_B.weight": torch.zeros(n_out, r)}
    a1 = a0 + 1e-3 * torch.randn(r, n_in, generator=gen)  # one A: M has rank <= r
    clients = [
        {
            "l.lora_A.weight": a1,
            "l.lora_B.weight": 1e-2 * torch.randn(n_out, r, generator=gen),
        }
        for _ in range(2)
    ]
    result = aggregate(g, clients, [0.5, 0.5], mode="svd")
    scale = a_row_scale(a0)  # sqrt(mean of squared row norms) ~ sqrt(1/3)
    assert scale == pytest.approx(1 / math.sqrt(3), rel=0.15)
    norms = result.adapter["l.lora_A.weight"].double().norm(dim=1)
    assert torch.allclose(
        norms, torch.full((r,), scale, dtype=torch.float64), rtol=1e-5
    )
    exact = sum(
        0.5 * c["l.lora_B.weight"].double() @ c["l.lora_A.weight"].double()
        for c in clients
    )
    product = (
        result.adapter["l.lora_B.weight"].double()
        @ result.adapter["l.lora_A.weight"].double()
    )
    assert torch.allclose(product, exact, atol=1e-6)


def test_a_row_scale_ignores_zero_rows() -> None:
    """RMS over the non-zero rows (norms 3 and 4 -> sqrt(12.5)); all zero -> 1."""
    assert a_row_scale(t([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0]])) == pytest.approx(
        math.sqrt(12.5)
    )
    assert a_row_scale(torch.zeros(2, 3)) == 1.0


def test_ffa_learns_from_a_zero_b() -> None:
    """With A frozen and non-zero, B = 0 gets a non-zero gradient at the first step."""
    a = t([[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]])  # (r, in), frozen
    b = torch.zeros(2, 2, requires_grad=True)  # (out, r), PEFT's zero init
    x = t([[1.0, 2.0, 3.0]])  # (1, in)
    loss = ((x @ a.T @ b.T) - t([[1.0, -1.0]])).square().sum()
    loss.backward()
    assert b.grad is not None and float(b.grad.abs().sum()) > 0


def test_svd_rank_above_adapter_rank_raises() -> None:
    """rank must not exceed the layer's r."""
    with pytest.raises(ValueError, match="`rank`=3"):
        aggregate(SVD_GLOBAL, [SVD_C1], [1.0], mode="svd", rank=3)


def test_result_keeps_global_dtype_with_low_precision_clients() -> None:
    """bf16 global and fp16 clients: the result stays bf16 with the same shapes."""
    g = {k: v.to(torch.bfloat16) for k, v in SVD_GLOBAL.items()}
    clients = [{k: v.half() for k, v in c.items()} for c in (SVD_C1, SVD_C2)]
    for mode in ("fedit", "svd"):
        result = aggregate(g, clients, [0.5, 0.5], mode=mode)
        assert list(result.adapter) == list(g)
        assert all(result.adapter[k].dtype == torch.bfloat16 for k in g)
        assert all(result.adapter[k].shape == g[k].shape for k in g)


# ---------------------------------------------------------------------------
# FedNova
# ---------------------------------------------------------------------------

BIAS = "base_model.model.score.bias"


def test_fednova_linear_by_hand() -> None:
    """new = g + tau_eff * sum_k w_k (x_k - g) / tau_k."""
    g = {BIAS: t([[1.0]])}
    clients = [{BIAS: t([[3.0]])}, {BIAS: t([[0.0]])}]
    # tau_eff = 0.5 * 1 + 0.5 * 4 = 2.5
    # new = 1 + 2.5 * (0.5 * (3 - 1) / 1 + 0.5 * (0 - 1) / 4) = 1 + 2.5 * 0.875 = 3.1875
    result = aggregate(g, clients, [0.5, 0.5], fednova=True, local_steps=[1, 4])
    assert result.adapter[BIAS].item() == pytest.approx(3.1875)
    # without FedNova: 0.5 * 3 + 0.5 * 0 = 1.5
    plain = aggregate(g, clients, [0.5, 0.5], local_steps=[1, 4])
    assert plain.adapter[BIAS].item() == pytest.approx(1.5)


def test_fednova_svd_uses_products_in_delta_form() -> None:
    """M = B_g A_g + tau_eff * sum_k w_k (B_k A_k - B_g A_g) / tau_k."""
    # 1x1 factors: B_g A_g = 1 * 1 = 1, B_1 A_1 = 3 * 1 = 3, B_2 A_2 = 0 * 5 = 0
    g = adapter([[1.0]], [[1.0]])
    c1, c2 = adapter([[1.0]], [[3.0]]), adapter([[5.0]], [[0.0]])
    result = aggregate(
        g, [c1, c2], [0.5, 0.5], mode="svd", fednova=True, local_steps=[1, 4]
    )
    # M = 1 + 2.5 * (0.5 * (3 - 1) / 1 + 0.5 * (0 - 1) / 4) = 3.1875 = B A; A keeps
    # the global A's scale 1, so A = 1 and B = 3.1875
    assert result.adapter[B].item() == pytest.approx(3.1875, rel=1e-6)
    assert result.adapter[A].item() == pytest.approx(1.0, rel=1e-6)
    assert result.svd_truncation_error == pytest.approx(0.0, abs=1e-7)


def test_fednova_with_equal_steps_is_plain_average() -> None:
    """Equal tau_k make FedNova's coefficients the weights themselves."""
    clients = [SVD_C1, SVD_C2]
    nova = aggregate(SVD_GLOBAL, clients, [0.3, 0.7], fednova=True, local_steps=[5, 5])
    plain = aggregate(SVD_GLOBAL, clients, [0.3, 0.7])
    for key in SVD_GLOBAL:
        assert torch.allclose(nova.adapter[key], plain.adapter[key])


def test_fednova_needs_local_steps() -> None:
    """FedNova without local steps is an error, not a silent fallback."""
    with pytest.raises(ValueError, match="local_steps"):
        aggregate(SVD_GLOBAL, [SVD_C1], [1.0], fednova=True)


# ---------------------------------------------------------------------------
# update_norm
# ---------------------------------------------------------------------------


def test_update_norm_over_shared_keys() -> None:
    """||(4, 6) - (1, 2)|| = ||(3, 4)|| = 5; the unshared key is ignored."""
    g = {"x": t([[1.0, 2.0]]), "y": t([[7.0]])}
    assert update_norm(g, {"x": t([[4.0, 6.0]])}) == pytest.approx(5.0)


def test_update_norm_restricted_to_keys() -> None:
    """Only the named keys count (e.g. B in ffa)."""
    g = adapter([[1.0, 2.0]], [[0.0], [0.0]])
    c = adapter([[1.0, 3.0]], [[0.0], [2.0]])
    # B diff = (0, 2) -> 2; A diff (0, 1) is left out
    assert update_norm(g, c, keys=[B]) == pytest.approx(2.0)
    # all shared: sqrt(2^2 + 1^2) = sqrt(5)
    assert update_norm(g, c) == pytest.approx(math.sqrt(5.0))


@pytest.mark.parametrize("mode", ["fedit", "ffa"])
def test_layer_norms_match_the_dense_products(mode: str) -> None:
    """Per-layer ||M|| and ||M - B A|| from thin-factor products equal the dense (out, in) ones."""
    gen = torch.Generator().manual_seed(7)
    r, d_in, d_out, hospitals = 4, 11, 9, 3
    g = {A: torch.randn(r, d_in, generator=gen), B: torch.randn(d_out, r, generator=gen)}
    clients = [
        {A: g[A] if mode == "ffa" else torch.randn(r, d_in, generator=gen),
         B: torch.randn(d_out, r, generator=gen)}
        for _ in range(hospitals)
    ]
    sent = [{B: c[B]} for c in clients] if mode == "ffa" else clients
    weights = [0.5, 0.3, 0.2]
    result = aggregate(g, sent, weights, mode=mode, scaling=2.0)

    d = torch.float64
    # Weights summing to 1 (no FedNova): M = sum_k w_k B_k A_k, the global's own factors weigh 0.
    dense = sum(w * c[B].to(d) @ c[A].to(d) for w, c in zip(weights, clients, strict=True))
    merged = result.adapter[B].to(d) @ result.adapter[A].to(d)
    report = result.layers[PREFIX]
    assert report.reference_norm == pytest.approx(2.0 * float(dense.norm()), rel=1e-6)
    assert report.error_norm == pytest.approx(2.0 * float((dense - merged).norm()), rel=1e-5, abs=1e-6)
    if mode == "ffa":
        assert report.error_norm == 0.0
    else:
        assert report.error_norm > 0.1 * report.reference_norm  # averaging A and B apart is not exact here
