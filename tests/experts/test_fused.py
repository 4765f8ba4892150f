"""The fused mixture equals a naive per-expert loop, and top-1 equals the spec's output-level mixing."""

from __future__ import annotations

import pytest
import torch

from dylora_moe.experts.manager import expert_name
from tests.conftest import batch, build, randomise_experts, tiny_gpt2, tiny_llama


def naive_logits(model, inputs, weights):
    """Independent oracle: peft's own lora_A/lora_B modules, one expert at a time, summed in every layer.

    weights: [B, E] or [B, T, E] routing weights over the model's experts (zeros where unselected).
    """
    names = [expert_name(e) for e in model.experts.expert_ids]

    def hook(layer, args, output):
        total = output
        for col, name in enumerate(names):
            if name not in layer.lora_A:
                continue
            x = args[0].to(layer.lora_A[name].weight.dtype)  # peft runs adapters in their own dtype
            w = weights[..., col]
            w = w[:, None, None] if w.dim() == 1 else w[..., None]
            total = total + w * layer.scaling[name] * layer.lora_B[name](layer.lora_A[name](x))
        return total.to(output.dtype)

    handles = [layer.register_forward_hook(hook) for layer in model.experts.layers()]
    try:
        with torch.no_grad(), model.routing.plain():
            return model.backbone(**inputs).logits
    finally:
        for h in handles:
            h.remove()


def grown(n_experts=4, mature=False, ranks=None, backbone=None, **router):
    model = build(backbone, **router)
    for i in range(n_experts):
        model.create_expert(ranks[i] if ranks else None)
    randomise_experts(model)
    if mature:
        for e in model.experts.expert_ids:
            model.mark_mature(e)
    return model


CASES = {
    "dense-sequence": dict(mature=False),
    "dense-token": dict(mature=False, granularity="token"),
    "top1-sequence": dict(mature=True, top_k=1),
    "top2-sequence": dict(mature=True, top_k=2),
    "top2-token": dict(mature=True, top_k=2, granularity="token"),
    "dense-final-hidden": dict(mature=False, route_layer=None),
    "top1-layer1": dict(mature=True, route_layer=1),
    "top1-layer1-separate": dict(mature=True, route_layer=1, route_pass="separate"),
    "dense-layer1-separate": dict(mature=False, route_layer=1, route_pass="separate"),
    "mixed-ranks-dense": dict(mature=False, ranks=[2, 4, 8, 4]),
    "mixed-ranks-top2": dict(mature=True, top_k=2, ranks=[2, 4, 8, 4]),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_equals_naive_loop(case):
    model = grown(**CASES[case])
    inputs = batch(bsz=4, t=12)
    with torch.no_grad():
        out = model(**inputs)
    expected = naive_logits(model, inputs, out.routing_weights)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    if CASES[case].get("mature"):
        assert out.routing_strategy == "sparse"
        k = CASES[case].get("top_k", 1)
        assert ((out.routing_weights > 0).sum(-1) <= k).all()


def test_sparse_batch_routes_samples_to_different_experts():
    model = grown(mature=True, top_k=1)
    inputs = batch(bsz=6, t=12, seed=3)
    with torch.no_grad():
        model.router.gate.weight.normal_(0, 5.0)  # spread the samples over the experts
        out = model(**inputs)
    chosen = out.routing_weights.argmax(-1)
    assert chosen.unique().numel() > 1, "the test batch should mix experts"
    torch.testing.assert_close(out.logits, naive_logits(model, inputs, out.routing_weights), rtol=1e-5, atol=1e-5)


def test_sparse_plan_stacks_only_selected_experts():
    model = grown(n_experts=6, mature=True, top_k=1)
    inputs = batch(bsz=2, t=8)
    with torch.no_grad():
        out = model(**inputs)
        model.routing.apply(model.route(**inputs))
    selected = {model.experts.expert_ids[c] for c in out.routing_weights.argmax(-1).tolist()}
    assert {int(n.split("_")[1]) for n in model.mixture.plan.active} == selected
    model.mixture.set_plan(None)


# Per-token top-1 is not in this list on purpose: there a token's expert differs from its neighbours', and
# attention mixes their hidden states, which one-expert-per-pass output mixing cannot express.
@pytest.mark.parametrize("router", [dict(top_k=1), dict(top_k=1, route_layer=None), dict(top_k=1, route_layer=1),
                                    dict(top_k=1, route_layer=1, route_pass="separate")])
def test_top1_fused_equals_reference_mode(router):
    model = grown(mature=True, **router)
    inputs = batch(bsz=4, t=12, seed=1)
    with torch.no_grad():
        fused = model(**inputs)
        model.config.mixing = "reference"
        reference = model(**inputs)
    torch.testing.assert_close(fused.routing_weights, reference.routing_weights)
    torch.testing.assert_close(fused.logits, reference.logits, rtol=1e-5, atol=1e-5)


def test_fused_on_gpt2():
    model = grown(backbone=tiny_gpt2())
    assert model.experts.target_modules == ["attn.c_attn", "attn.c_proj"]
    inputs = batch(bsz=3, t=9)
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out.logits, naive_logits(model, inputs, out.routing_weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mature", [False, True], ids=["dense", "top1-mixed-batch"])
def test_fused_gradients_match_naive(mature):
    model = grown(n_experts=3, mature=mature)
    model.set_trainable([model.experts.expert_ids[-1]], router=True)
    inputs = batch(bsz=3, t=8)
    if mature:  # samples of the batch go to different experts: the padded (gathered) path
        model.router.gate.bias.data[:] = 0
        model.router.gate.weight.data[:] = torch.randn_like(model.router.gate.weight) * 5
        assert model.route(**inputs).indices.unique().numel() > 1
    labels = inputs["input_ids"].clone()
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "gate" in n) != mature  # top-1 weight is 1: no grad
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora" in n)
    model.zero_grad()
    weights = model.route(**inputs).weights
    logits = naive_logits_with_grad(model, inputs, weights)
    loss = model.backbone.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def naive_logits_with_grad(model, inputs, weights):
    with torch.enable_grad():
        names = [expert_name(e) for e in model.experts.expert_ids]

        def hook(layer, args, output):
            for col, name in enumerate(names):
                w = weights[..., col][:, None, None]
                output = output + w * layer.scaling[name] * layer.lora_B[name](layer.lora_A[name](args[0]))
            return output

        handles = [layer.register_forward_hook(hook) for layer in model.experts.layers()]
        try:
            with model.routing.plain():
                return model.backbone(**inputs).logits
        finally:
            for h in handles:
                h.remove()


def test_bf16_backbone_adds_the_delta_as_peft_does():
    """On a bf16 backbone peft adds the fp32 delta before rounding; the fused path must do the same (rounding
    the delta first gave logit differences of 1e-2)."""
    model = grown(n_experts=2, mature=True, top_k=1, backbone=tiny_llama().to(torch.bfloat16))
    inputs = batch(bsz=3, t=10)
    for expert_id in model.experts.expert_ids:
        with torch.no_grad():
            with model.force_expert(expert_id):
                fused = model(**inputs).logits
            with model.routing.plain(), model.single_expert(expert_id):
                peft = model.backbone(**inputs).logits
        assert fused.dtype == torch.bfloat16
        torch.testing.assert_close(fused, peft, rtol=0, atol=2e-3)


@pytest.mark.parametrize("case", ["dense-sequence", "top2-sequence", "mixed-ranks-dense"])
def test_bf16_fused_equals_naive_loop(case):
    model = grown(backbone=tiny_llama().to(torch.bfloat16), **CASES[case])
    inputs = batch(bsz=4, t=12)
    with torch.no_grad():
        out = model(**inputs)
    expected = naive_logits(model, inputs, out.routing_weights)
    torch.testing.assert_close(out.logits.float(), expected.float(), rtol=0.02, atol=0.02)


def test_dropout_mask_is_shared_by_the_experts_of_a_layer():
    """With dropout 0.1 in training mode, the fused output equals the naive loop that draws one dropout mask per
    layer (in the same order) and feeds it to every expert; in eval mode dropout is off."""
    model = grown(n_experts=3)
    model.experts.config.dropout = 0.1
    for layer in model.experts.layers():  # the experts were built with dropout 0: give them peft's dropout
        for name in layer.lora_dropout:
            layer.lora_dropout[name] = torch.nn.Dropout(0.1)
    inputs = batch(bsz=3, t=10)
    names = [expert_name(e) for e in model.experts.expert_ids]
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        fused = model(**inputs)

        def hook(layer, args, output):
            x = layer.lora_dropout[names[0]](args[0])  # one draw per layer
            for col, name in enumerate(names):
                w = fused.routing_weights[:, col][:, None, None]
                output = output + w * layer.scaling[name] * layer.lora_B[name](layer.lora_A[name](x))
            return output

        handles = [layer.register_forward_hook(hook) for layer in model.experts.layers()]
        try:
            torch.manual_seed(0)
            with model.routing.plain():
                shared = model.backbone(**inputs).logits
        finally:
            for h in handles:
                h.remove()
        torch.manual_seed(1)
        other_draw = model(**inputs).logits
        model.eval()
        off = model(**inputs).logits
    torch.testing.assert_close(fused.logits, shared, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused.logits, other_draw)  # dropout is active in training mode
    torch.testing.assert_close(off, naive_logits(model, inputs, fused.routing_weights), rtol=1e-5, atol=1e-5)


def test_dense_top_m_fused_equals_naive_and_stacks_only_the_mixed_experts():
    model = grown(n_experts=6, dense_top_m=2)
    for e in model.experts.expert_ids[:5]:
        model.mark_mature(e)
    inputs = batch(bsz=2, t=8)
    weights = model.route(**inputs).weights  # [B, E]: 3 non-zero per row
    assert ((weights > 0).sum(-1) == 3).all()
    plans, set_plan = [], model.mixture.set_plan
    model.mixture.set_plan = lambda plan: plans.append(plan) or set_plan(plan)
    with torch.no_grad():
        fused = model(**inputs).logits
    torch.testing.assert_close(fused, naive_logits(model, inputs, weights), rtol=1e-4, atol=1e-5)
    active = [p.active for p in plans if p is not None]
    assert active and len(active[0]) == int((weights > 0).any(0).sum()) < 6


def test_training_caches_the_frozen_experts_and_sees_every_update_of_the_trained_one(monkeypatch):
    import dylora_moe.experts.fused as fused

    model = grown(n_experts=4)
    trained = model.experts.expert_ids[-1]
    model.set_trainable([trained], router=False)
    calls, indices, stacks = [], [], []
    real, index, stacked = fused.stack_concat, fused.concat_index, fused.concat_weights
    monkeypatch.setattr(fused, "stack_concat", lambda layer, names, only=None: calls.append(only) or
                        real(layer, names, only))
    monkeypatch.setattr(fused, "concat_index", lambda layer, names, only=None: indices.append(only) or
                        index(layer, names, only))
    monkeypatch.setattr(fused, "concat_weights", lambda layer, names, only=None: stacks.append(only) or
                        stacked(layer, names, only))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = batch(bsz=2, t=8)
    for _ in range(3):
        optimizer.zero_grad()
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        optimizer.step()
    layers, mine = len(model.experts.layers()), frozenset({expert_name(trained)})
    others = frozenset(expert_name(e) for e in model.experts.expert_ids if e != trained)
    assert calls == [others] * layers  # the frozen experts' stack: once per layer, not once per step
    # the trained expert: its owner/scale indices once per layer (no host-to-device copy per layer and step),
    # its weights stacked with autograd at every step
    assert [o for o in indices if o == mine] == [mine] * layers
    assert [o for o in stacks if o == mine] == [mine] * 3 * layers
    model.set_trainable([], router=False)
    with torch.no_grad():  # the optimizer's updates reach the output: nothing stale was cached
        weights = model.route(**inputs).weights
        torch.testing.assert_close(model(**inputs).logits, naive_logits(model, inputs, weights), rtol=1e-4,
                                   atol=1e-5)


def test_passes_alternating_between_two_plans_build_each_stack_once(monkeypatch):
    """A training step's routed pass and its KL pass forced to one expert (or a served batch and a joining
    request's prefill) alternate plans: each layer keeps both stacks instead of rebuilding them every pass."""
    from dylora_moe.experts import fused

    model = grown(n_experts=3)
    model.eval()
    built = []
    real = fused.stack_concat
    monkeypatch.setattr(fused, "stack_concat", lambda *a, **k: built.append(1) or real(*a, **k))
    inputs = batch(bsz=2, t=8)
    with torch.no_grad():
        for _ in range(3):
            with model.force_expert(0):
                model(**inputs)
            with model.force_expert(1):
                model(**inputs)
    layers = len(model.experts.layers())
    assert len(built) == 2 * layers  # one stack per plan and layer, at the first pass of each
