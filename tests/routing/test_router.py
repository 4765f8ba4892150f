"""Dense while any expert is new, sparse once all are mature; growing the gate keeps old logits."""

from __future__ import annotations

import pytest
import torch

from dylora_moe.events import ROUTING_STRATEGY_CHANGED
from dylora_moe.routing import DENSE, SPARSE, DynamicHybridRouter


def router_with(n: int, **kw) -> DynamicHybridRouter:
    torch.manual_seed(0)
    r = DynamicHybridRouter(16, **kw)
    for _ in range(n):
        r.add_expert()
    return r


def test_strategy_follows_maturity():
    r = router_with(3, top_k=2)
    h = torch.randn(5, 16)
    out = r(h)
    assert out.strategy == DENSE and out.indices is None
    assert (out.weights > 0).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(5))
    r.set_maturity(0)
    r.set_maturity(1)
    assert r(h).strategy == DENSE  # one expert is still new
    r.set_maturity(2)
    out = r(h)
    assert out.strategy == SPARSE
    assert ((out.weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(5))
    # the kept experts are the two largest logits, weighted by a softmax over those two only
    top, idx = out.logits.topk(2, dim=-1)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.topk_weights, torch.softmax(top, -1))
    r.add_expert()  # a new immature expert switches back to dense
    assert r(h).strategy == DENSE


def test_temperature_scales_logits():
    r = router_with(3, temperature=2.0)
    h = torch.randn(4, 16)
    out = r(h)
    torch.testing.assert_close(out.weights, torch.softmax(out.logits / 2.0, -1))


def test_add_expert_leaves_old_logits_unchanged():
    r = router_with(3)
    h = torch.randn(7, 16)
    before = r(h).logits
    r.add_expert()
    after = r(h).logits
    assert after.shape == (7, 4)
    torch.testing.assert_close(after[:, :3], before, rtol=0, atol=1e-6)
    assert r.expert_maturity.tolist() == [0, 0, 0, 0]


def test_per_token_routing_shapes():
    r = router_with(4, top_k=1)
    for c in range(4):
        r.set_maturity(c)
    out = r(torch.randn(2, 5, 16))
    assert out.weights.shape == (2, 5, 4) and out.indices.shape == (2, 5, 1)


def test_strategy_change_is_logged_once_per_change():
    r = router_with(2)
    r.set_maturity(0)
    r.set_maturity(1)
    r.set_maturity(1)
    r.add_expert()
    changes = [(e["previous"], e["strategy"]) for e in r.events.of(ROUTING_STRATEGY_CHANGED)]
    assert changes == [(DENSE, SPARSE), (SPARSE, DENSE)]


def test_state_round_trip_into_a_fresh_router():
    r = router_with(3, top_k=2)
    r.set_maturity(0)
    h = torch.randn(4, 16)
    fresh = DynamicHybridRouter(16, top_k=2)
    fresh.load_state_dict(r.state_dict())
    assert fresh.num_experts == 3
    assert fresh.expert_maturity.tolist() == [1, 0, 0]
    torch.testing.assert_close(fresh(h).weights, r(h).weights)


def test_remove_expert_drops_its_column():
    r = router_with(3)
    h = torch.randn(4, 16)
    before = r(h).logits
    r.remove_expert(1)
    torch.testing.assert_close(r(h).logits, before[:, [0, 2]], rtol=0, atol=1e-6)


def test_fit_gate_learns_labelled_features_and_keeps_old_classes():
    from dylora_moe.routing.fit import fit_gate

    torch.manual_seed(0)
    r = router_with(3)
    centers = torch.randn(3, 16) * 3
    labels = torch.arange(3).repeat_interleave(20)
    feats = centers[labels] + torch.randn(60, 16) * 0.5 + 10.0  # offset: fitting must cope with uncentred input
    losses = fit_gate(r, feats, labels, steps=100)
    assert losses[-1] < 0.1 * losses[0]
    assert (r(feats).weights.argmax(-1) == labels).float().mean() == 1.0
    with pytest.raises(ValueError, match="one target column"):
        fit_gate(r, feats, labels[:5])


def test_fit_gate_of_no_steps_returns_no_losses_and_keeps_the_gate():
    from dylora_moe.routing.fit import fit_gate

    r = router_with(3)
    before = {k: v.clone() for k, v in r.gate.state_dict().items()}
    feats, labels = torch.randn(6, 16) + 50.0, torch.tensor([0, 1, 2, 0, 1, 2])
    assert fit_gate(r, feats, labels, steps=0) == []
    for k, v in r.gate.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="steps must be >= 0"):
        fit_gate(r, feats, labels, steps=-1)


@pytest.mark.parametrize("offset", [0.0, 50.0, 500.0])
def test_fit_gate_copes_with_features_far_from_the_origin(offset):
    # A fresh column's random weights times a large common offset gave logits of hundreds: a warm start that
    # Adam could not undo in 200 steps (at 500, one class for every row, loss 180 after the fit).
    from dylora_moe.routing.fit import fit_gate

    torch.manual_seed(0)
    r = router_with(3)
    centers = torch.randn(3, 16) * 3
    labels = torch.arange(3).repeat_interleave(20)
    feats = centers[labels] + torch.randn(60, 16) * 0.5 + offset
    losses = fit_gate(r, feats, labels, steps=200)
    assert losses[-1] < 0.05
    assert (r(feats).weights.argmax(-1) == labels).all()


def test_fit_gate_keeps_a_good_warm_start_and_fits_a_bf16_gate_in_fp32():
    from dylora_moe.routing.fit import fit_gate

    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 3
    labels = torch.arange(3).repeat_interleave(20)
    feats = centers[labels] + torch.randn(60, 16) * 0.5 + 10.0
    r = router_with(3)
    first = fit_gate(r, feats, labels, steps=100)
    again = fit_gate(r, feats, labels, steps=1)
    assert again[0] == pytest.approx(first[-1], rel=0.05)  # started where the first fit ended, not from zero
    half = router_with(3).to(torch.bfloat16)
    fit_gate(half, feats.bfloat16(), labels, steps=100)
    assert half.gate.weight.dtype == torch.bfloat16
    assert (half(feats.bfloat16()).weights.argmax(-1) == labels).all()


def test_dense_top_m_mixes_every_new_expert_with_each_samples_top_m_mature_ones():
    full, limited = router_with(6), router_with(6, dense_top_m=2)
    for r in (full, limited):
        for column in range(5):  # five mature experts, one new
            r.set_maturity(column)
    hidden = torch.randn(4, 16)
    out, ref = limited(hidden), full(hidden)
    assert out.strategy == DENSE and limited.dense_restricted
    nonzero = out.weights > 0
    assert nonzero[:, 5].all() and (nonzero[:, :5].sum(-1) == 2).all()
    top = ref.weights[:, :5].topk(2, dim=-1).indices  # the mature experts the whole pool ranks highest
    assert torch.equal(nonzero[:, :5].nonzero()[:, 1].view(4, 2).sort(-1).values, top.sort(-1).values)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(4))
    kept = out.weights > 0  # renormalised over the kept experts: ratios of the full softmax are unchanged
    torch.testing.assert_close(out.weights[kept] / out.weights[:, 5].repeat_interleave(3),
                               ref.weights[kept] / ref.weights[:, 5].repeat_interleave(3))


def test_dense_top_m_changes_nothing_while_the_pool_is_small():
    full, limited = router_with(3), router_with(3, dense_top_m=2)
    for r in (full, limited):
        r.set_maturity(0)
        r.set_maturity(1)
    hidden = torch.randn(4, 16)
    assert not limited.dense_restricted
    torch.testing.assert_close(limited(hidden).weights, full(hidden).weights)


def test_a_penalised_gate_fit_lands_on_one_gate_whatever_it_starts_from():
    # Unpenalised, a separable memory has no best gate: the fit ends wherever its start and step count leave it,
    # so every refit moves the boundaries that held-out prompts sit near. The L2 penalty gives it one optimum.
    from dylora_moe.routing.fit import fit_gate

    torch.manual_seed(0)
    centers = torch.randn(3, 16)
    labels = torch.arange(3).repeat_interleave(20)
    feats = centers[labels] + torch.randn(60, 16) * 0.3
    probe = centers[torch.arange(3).repeat_interleave(50)] + torch.randn(150, 16) * 0.6  # held-out-like rows
    spread = {}
    for decay in (0.0, 1e-2):
        probs = []
        for seed in (1, 2):
            r = router_with(3)
            torch.manual_seed(seed)
            with torch.no_grad():  # two quite different starting gates, each a better fit than the uniform gate
                r.gate.weight.copy_(centers + torch.randn_like(r.gate.weight) * 1.5)
            fit_gate(r, feats, labels, steps=2000, weight_decay=decay)
            assert (r(feats).weights.argmax(-1) == labels).all()
            probs.append(torch.softmax(r(probe).logits, -1))
        spread[decay] = float((probs[0] - probs[1]).abs().max())
    assert spread[1e-2] < 1e-3 and spread[0.0] > 0.5


@pytest.mark.parametrize("mature", [False, True])
def test_routing_is_float32_under_bf16_autocast(mature):
    """Autocast would run the gate's matmul and softmax in bf16: the router computes outside it, so its
    logits and weights are the float32 ones (a near-tie between two skills is not decided by rounding)."""
    r = router_with(4, top_k=2)
    for column in range(4):
        r.set_maturity(column, mature)
    h = torch.randn(6, 16)
    expected = r(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(h)
    assert out.logits.dtype == out.weights.dtype == torch.float32
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.weights, expected.weights, rtol=0, atol=0)


def test_a_bf16_gate_routes_in_float32():
    r = router_with(3).to(torch.bfloat16)
    h = torch.randn(4, 16, dtype=torch.bfloat16)
    out = r(h)
    assert out.logits.dtype == out.weights.dtype == torch.float32
    by_hand = h.float() @ r.gate.weight.float().T + r.gate.bias.float()
    torch.testing.assert_close(out.logits, by_hand)
