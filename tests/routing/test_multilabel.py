"""Multi-skill routing: soft-target gate fit, the cumulative-weight k rule, multi-label routing memory rows."""

from __future__ import annotations

import math

import pytest
import torch

from dylora_moe.config import RouterConfig
from dylora_moe.routing.fit import fit_gate
from dylora_moe.routing.losses import rehearsal_loss
from dylora_moe.routing.router import DynamicHybridRouter
from dylora_moe.training.rehearsal import RoutingMemory, mixture_key
from tests.conftest import build, randomise_experts


def mature_router(num_experts: int = 3, **kwargs) -> DynamicHybridRouter:
    router = DynamicHybridRouter(4, num_experts, **kwargs)
    for column in range(num_experts):
        router.set_maturity(column)
    return router


def set_logits(router: DynamicHybridRouter, probs: list[float]) -> torch.Tensor:
    """Gate weights that map the one-hot input of row i to log-probabilities ``probs`` (one row per call)."""
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.copy_(torch.tensor(probs).log())
    return torch.zeros(1, router.hidden_size)


def test_cumulative_rule_keeps_one_expert_when_the_gate_is_sure_and_two_when_it_is_split():
    router = mature_router(top_k=2, cumulative_weight=0.8)
    sure = router(set_logits(router, [0.9, 0.06, 0.04]))
    assert sure.weights.tolist() == [[1.0, 0.0, 0.0]]
    split = router(set_logits(router, [0.45, 0.43, 0.12]))
    assert torch.allclose(split.weights, torch.tensor([[0.45 / 0.88, 0.43 / 0.88, 0.0]]))
    assert split.indices.tolist() == [[0, 1]]


def test_cumulative_rule_is_capped_at_top_k_and_off_by_default():
    probs = [0.34, 0.33, 0.33]
    capped = mature_router(top_k=2, cumulative_weight=1.0)
    assert (capped(set_logits(capped, probs)).weights > 0).sum() == 2
    fixed = mature_router(top_k=2)  # no cumulative weight: always top-k, as before
    weights = fixed(set_logits(fixed, [0.9, 0.06, 0.04])).weights
    assert torch.allclose(weights, torch.tensor([[0.9 / 0.96, 0.06 / 0.96, 0.0]]))
    assert RouterConfig().cumulative_weight is None
    with pytest.raises(ValueError, match="cumulative_weight"):
        RouterConfig(cumulative_weight=0.0)


def test_cumulative_rule_per_token():
    router = mature_router(top_k=2, cumulative_weight=0.8)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 0, 0.0]]))
        router.gate.bias.zero_()
    hidden = torch.tensor([[[1.0, 0, 0, 0], [1.0, 1.0, 0, 0]]])  # [B=1, T=2, H]: a sure token, a split one
    kept = (router(hidden).weights > 0).sum(-1)  # [1, 2]
    assert kept.tolist() == [[1, 2]]


def test_soft_targets_teach_the_gate_to_split_composed_inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 4, generator=g) * 0.3 + torch.tensor([3.0, 0, 0, 0])
    b = torch.randn(40, 4, generator=g) * 0.3 + torch.tensor([0, 3.0, 0, 0])
    ab = torch.randn(40, 4, generator=g) * 0.3 + torch.tensor([1.5, 1.5, 0, 0])
    c = torch.randn(40, 4, generator=g) * 0.3 + torch.tensor([0, 0, 3.0, 0])
    features = torch.cat([a, b, ab, c])
    targets = torch.zeros(160, 3)
    targets[:40, 0] = targets[40:80, 1] = targets[120:, 2] = 1.0
    targets[80:120, :2] = 0.5
    router = mature_router(top_k=2, cumulative_weight=0.8)
    losses = fit_gate(router, features, targets, steps=300)
    assert losses[-1] < losses[0]
    probs = torch.softmax(router.gate(features), -1)
    assert probs[:40, 0].min() > 0.9 and probs[120:, 2].min() > 0.9
    composed = probs[80:120, :2]
    assert composed.sum(1).min() > 0.95 and (composed.mean(0) - 0.5).abs().max() < 0.1  # split between a and b
    kept = (router(features).weights > 0).sum(-1)
    assert kept[:80].eq(1).all() and kept[80:120].eq(2).float().mean() > 0.75

    # hard columns and one-hot distributions are the same fit
    hard, soft = mature_router(), mature_router()
    soft.load_state_dict(hard.state_dict())
    columns = torch.cat([torch.full((40,), 0), torch.full((40,), 1)])
    fit_gate(hard, features[:80], columns, steps=20)
    fit_gate(soft, features[:80], torch.nn.functional.one_hot(columns, 3).float(), steps=20)
    assert torch.allclose(hard.gate.weight, soft.gate.weight, atol=1e-5)
    with pytest.raises(ValueError, match="sum to 1"):
        fit_gate(soft, features[:2], torch.ones(2, 3))


def test_rehearsal_loss_takes_target_distributions():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([[0.5, 0.5, 0.0]])
    expected = -(0.5 * torch.log_softmax(logits, -1)[0, 0] + 0.5 * torch.log_softmax(logits, -1)[0, 1])
    assert math.isclose(float(rehearsal_loss(logits, target)), float(expected), rel_tol=1e-6)


def test_routing_memory_keeps_multi_label_rows():
    memory = RoutingMemory(per_skill=8)
    memory.add(0, 10, torch.ones(2, 4))
    memory.add(1, 11, torch.zeros(3, 4))
    _, columns = memory.batch([10, 11, 12])
    assert columns.dtype == torch.long and columns.tolist() == [0, 0, 1, 1, 1]  # single-label: as before
    key = mixture_key([1, 0])
    assert key < 0 and key == mixture_key([0, 1])
    memory.add(key, [11, 10], torch.full((2, 4), 0.5))
    _, targets = memory.batch([10, 11, 12])
    assert targets.shape == (7, 3) and targets[:2].tolist() == [[1.0, 0.0, 0.0]] * 2
    assert targets[5:].tolist() == [[0.5, 0.5, 0.0]] * 2

    restored = RoutingMemory(per_skill=8)
    restored.load_tensors(memory.tensors())
    assert restored.skills[key][0] == (10, 11)
    assert torch.equal(restored.batch([10, 11, 12])[1], targets)

    memory.drop_expert(11)  # the mixture keeps expert 10 alone
    assert memory.skills[key][0] == 10 and 1 not in memory.skills
    memory.add(key, [10, 12], torch.full((1, 4), 0.5))
    memory.reassign(12, 10)  # both labels merged into one expert: a single-label row
    assert memory.skills[key][0] == 10

    small = RoutingMemory(per_skill=4)  # a mixture's rows are sampled down like a skill's (negative key seeds)
    small.add(key, [10, 11], torch.randn(10, 4))
    assert small.skills[key][1].shape == (4, 4)


def test_a_multi_label_rehearsal_batch_runs_through_the_model():
    model = build(top_k=2, cumulative_weight=0.8)
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    for expert_id in model.experts.expert_ids:
        model.mark_mature(expert_id)
    features = torch.randn(4, 32)
    targets = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    ids = torch.randint(4, 100, (2, 8))
    out = model(input_ids=ids, rehearsal=(features, targets))
    assert out.rehearsal_loss is not None and torch.isfinite(out.rehearsal_loss)
    assert model.router.cumulative_weight == 0.8 and out.routing_strategy == "sparse"
