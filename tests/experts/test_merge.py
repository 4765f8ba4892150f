"""Merging two experts: peft's add_weighted_adapter, the gate column, the skills and the routing memory."""

from __future__ import annotations

import pytest
import torch

from dylora_moe.events import EXPERTS_MERGED
from dylora_moe.experts.manager import merge_weights
from dylora_moe.training.rehearsal import RoutingMemory
from tests.conftest import batch, decide_by_cosine, randomise_experts, tiny_llama
from tests.experts.test_fused import grown, naive_logits


def test_cat_merge_with_equal_weights_is_the_average_of_the_two_deltas():
    model = grown(n_experts=3)
    inputs = batch(bsz=2, t=8)
    average = torch.zeros(2, 3)
    average[:, 0] = average[:, 2] = 0.5
    expected = naive_logits(model, inputs, average)
    merged = model.merge_experts(0, 2)
    assert model.experts.expert_ids == [1, merged] and model.experts.ranks[merged] == 8  # 4 + 4
    with torch.no_grad(), model.force_expert(merged):
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    assert model.events.of(EXPERTS_MERGED)[-1]["merged_from"] == [0, 2]


def test_svd_merge_keeps_the_rank_and_approximates_the_average_of_two_similar_experts():
    model = grown(n_experts=2)
    with torch.no_grad():  # expert 1 is expert 0 slightly moved: two experts of one skill
        for a, b in zip(model.experts.parameters(0), model.experts.parameters(1), strict=True):
            b.copy_(a + 0.1 * a.std() * torch.randn_like(a))
    model.experts.touch()
    inputs = batch(bsz=2, t=8)
    expected = naive_logits(model, inputs, torch.full((2, 2), 0.5))
    with torch.no_grad(), model.force_expert(None):
        frozen = model(**inputs).logits
    merged = model.merge_experts(0, 1, method="svd")
    assert model.experts.ranks[merged] == 4
    with torch.no_grad(), model.force_expert(merged):
        got = model(**inputs).logits
    # rank 4 cannot hold a rank-8 sum exactly, but for two similar experts it comes close
    assert (got - expected).norm() < 0.1 * (frozen - expected).norm()


def test_merge_moves_skills_memory_and_maturity_to_the_new_expert():
    model = grown(n_experts=0, top_k=1)
    decide_by_cosine(model, 1.0)
    first = model.add_new_skill(["abc def", "ghi jkl"], name="letters")
    second = model.add_new_skill(["abd deg", "ghk jkm"], name="letters-again")
    third = model.add_new_skill(["0123 4567", "89 01"], name="digits")
    randomise_experts(model)
    for e in model.experts.expert_ids:
        model.mark_mature(e)
    memory = RoutingMemory()
    for r in (first, second, third):
        memory.add(r.skill_id, r.expert_id, torch.randn(4, model.backbone.config.hidden_size))
    merged = model.merge_experts(first.expert_id, second.expert_id)
    memory.reassign(first.expert_id, merged)
    memory.reassign(second.expert_id, merged)
    assert {s.name: s.expert_id for s in model.library.skills.values()} == \
        {"letters": merged, "letters-again": merged, "digits": third.expert_id}
    assert {e for e, _ in memory.skills.values()} == {merged, third.expert_id}
    assert model.router.strategy == "sparse" and model.router.num_experts == 2
    _, columns = memory.batch(model.experts.expert_ids)
    assert sorted(set(columns.tolist())) == [0, 1]


def test_merge_refuses_unknown_or_identical_experts():
    model = grown(n_experts=2)
    with pytest.raises(KeyError):
        model.merge_experts(0, 9)
    with pytest.raises(ValueError, match="itself"):
        model.merge_experts(1, 1)


@pytest.mark.parametrize("method, density", [
    ("svd", None), ("ties_svd", 1.0), ("dare_ties_svd", 1.0), ("dare_linear_svd", 1.0),
    ("linear", None), ("dare_linear", 1.0), ("magnitude_prune", 1.0), ("ties", 1.0), ("dare_ties", 1.0)])
def test_merging_two_identical_experts_gives_that_expert_back_with_the_default_weights(method, density):
    # the TIES methods average through their disjoint merge: at weights 0.5 they would halve the delta; the
    # methods that combine A and B one by one (linear, dare_linear, ...) weigh each by the weight's root: at 0.5
    # they would double it
    model = grown(n_experts=2)
    with torch.no_grad():
        for a, b in zip(model.experts.parameters(0), model.experts.parameters(1), strict=True):
            b.copy_(a)
    model.experts.touch()
    inputs = batch(bsz=2, t=8)
    with torch.no_grad(), model.force_expert(0):
        expected = model(**inputs).logits
    merged = model.merge_experts(0, 1, method=method, density=density)
    with torch.no_grad(), model.force_expert(merged):
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_pruning_merge_without_density_is_refused_before_anything_changes():
    model = grown(n_experts=2)
    with pytest.raises(ValueError, match="density"):
        model.merge_experts(0, 1, method="ties_svd")
    assert model.experts.expert_ids == [0, 1] and model.router.num_experts == 2


@pytest.mark.parametrize("method, rank, density, message", [
    ("svd", 17, None, "rank must be in"),  # wider than the 16-wide key/value projections
    ("svd", 0, None, "rank must be in"),
    ("cat", 4, None, "takes no rank"),
    ("ties_svd", None, 0.0, "in \\(0, 1\\]"),  # keeps nothing of either expert
    ("ties_svd", None, 2.0, "in \\(0, 1\\]"),
    ("cat", None, 0.5, "takes no density"),
])
def test_merge_options_a_method_would_ignore_or_break_on_are_refused(method, rank, density, message):
    model = grown(n_experts=2)
    with pytest.raises(ValueError, match=message):
        model.merge_experts(0, 1, method=method, rank=rank, density=density)
    assert model.experts.expert_ids == [0, 1] and model.router.num_experts == 2


@pytest.mark.parametrize("method, density, message", [
    ("linear", None, "ranks \\[4, 8\\]: use svd"),
    ("ties", 0.5, "ranks \\[4, 8\\]: use ties_svd"),
    ("dare_linear", 0.5, "use dare_linear_svd"),
    ("magnitude_prune", 0.5, "use magnitude_prune_svd"),
    ("lineal", None, "unknown merge method 'lineal'; the methods are cat, linear, svd"),
])
def test_a_merge_method_that_cannot_combine_the_experts_is_refused_with_the_one_that_can(method, density, message):
    model = grown(n_experts=2, ranks=[4, 8])
    with pytest.raises(ValueError, match=message):
        model.merge_experts(0, 1, method=method, density=density)
    assert model.experts.expert_ids == [0, 1] and model.router.num_experts == 2
    svd = "svd" if method in ("linear", "lineal") else f"{method}_svd"
    merged = model.merge_experts(0, 1, method=svd, density=density)
    assert model.experts.ranks[merged] == 8


def test_a_merge_that_fails_inside_peft_leaves_nothing_a_later_merge_would_pick_up():
    """An svd merge of an expert gone non-finite fails in the middle of peft's add_weighted_adapter; the half-made
    adapter must go, or the next merge (peft returns at once for a name it knows) would serve it as its result."""
    model = grown(n_experts=2)
    weight = next(iter(model.experts.parameters(1)))
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("nan"))
    model.experts.touch()
    with pytest.raises(ValueError, match=r"(?s)non-finite.*merge with 'cat'"):  # named, with the way out
        model.merge_experts(0, 1, method="svd")
    assert list(model.experts.peft_model.peft_config) == ["expert_0", "expert_1"]
    assert model.experts.expert_ids == [0, 1] and model.router.num_experts == 2
    with torch.no_grad():
        weight.copy_(kept)
    model.experts.touch()
    inputs = batch(bsz=2, t=8)
    expected = naive_logits(model, inputs, torch.full((2, 2), 0.5))
    merged = model.merge_experts(0, 1)
    assert model.experts.ranks[merged] == 8  # cat: the sum of the ranks, not the failed svd's 4
    with torch.no_grad(), model.force_expert(merged):
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


def test_an_svd_merge_at_the_narrowest_layers_width_saves_and_loads(tmp_path):
    from dylora_moe import DyLoRAMoE
    from tests.conftest import char_tokenizer

    model = grown(n_experts=2)
    widest = min(min(layer.in_features, layer.out_features) for layer in model.experts.layers())
    merged = model.merge_experts(0, 1, method="svd", rank=widest)
    model.save_pretrained(tmp_path / "system")
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    assert loaded.experts.ranks[merged] == widest
    inputs = batch(bsz=2, t=8)
    with torch.no_grad(), model.force_expert(merged), loaded.force_expert(merged):
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_a_merged_expert_of_a_bf16_backbone_keeps_the_sources_dtype_and_serves_alone(method):
    """peft keeps adapters of a half-precision backbone in float32; its merge writes the new adapter in the
    backbone's dtype. The merged expert takes its sources' dtype, so the fused mixture (float32 gate weights)
    can run it alone and training it keeps float32 master weights."""
    model = grown(n_experts=2, mature=True, top_k=1, backbone=tiny_llama().to(torch.bfloat16))
    source = {p.dtype for p in model.experts.parameters(0)}
    merged = model.merge_experts(0, 1, method=method)
    assert {p.dtype for p in model.experts.parameters(merged)} == source == {torch.float32}
    assert model.experts.expert_ids == [merged]  # the sources are gone: the merged expert serves alone
    with torch.no_grad():
        logits = model(**batch(bsz=2, t=8)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_a_cat_merge_of_a_bf16_backbone_is_still_the_exact_average_of_the_deltas():
    """peft fills a cat merge in the backbone's dtype; rounded to bf16, the merged delta would be off the average
    by a few thousandths."""
    model = grown(n_experts=2, backbone=tiny_llama().to(torch.bfloat16))
    layers = model.experts.layers()

    def delta(layer, name):
        return layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight

    average = [(delta(layer, "expert_0") + delta(layer, "expert_1")) / 2 for layer in layers]
    merged = model.merge_experts(0, 1)
    for layer, expected in zip(layers, average, strict=True):
        torch.testing.assert_close(delta(layer, f"expert_{merged}"), expected, rtol=1e-5, atol=1e-6)


def test_a_merge_leaves_every_expert_outside_the_trainable_set_frozen():
    """peft activates another adapter when the active one is deleted, which makes it require grad: the manager
    puts the trainable set back, so an optimizer built from ``requires_grad`` trains nothing it was not asked to."""
    model = grown(4)
    model.set_trainable([3], router=False)
    model.merge_experts(0, 1)
    trained = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"expert_3"}
    model.set_trainable([], router=False)
    model.merge_experts(2, 3)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_a_merge_leaves_offloaded_experts_offloaded_and_merges_the_same_weights(method):
    """A merge brought its offloaded sources back for peft to read them and left them there, and the new expert
    stayed resident: every merge undid offloading. The sources stay where they were (also when the merge fails),
    the merged expert is offloaded as a created one, and its weights are those of the merge of a resident pool."""
    model = grown(n_experts=3)
    manager = model.experts
    manager.config.offload_device = "cpu"
    reference = manager.merge_experts([0, 1], merge_weights(method), method)  # every expert resident
    manager.offload([0, 2])
    merged = manager.merge_experts([0, 1], merge_weights(method), method)
    assert [manager.is_resident(e) for e in (0, 1, 2, merged)] == [False, True, False, False]
    assert all(p.device.type == "meta" for e in (0, 2, merged) for p in manager.parameters(e))
    manager.onload([reference, merged])
    assert not any(p.requires_grad for p in manager.parameters(merged))
    for mine, theirs in zip(manager.parameters(reference), manager.parameters(merged), strict=True):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)
    with torch.no_grad():
        next(iter(manager.parameters(1))).fill_(float("nan"))
    manager.touch()
    with pytest.raises(ValueError, match="non-finite"):
        manager.merge_experts([0, 1], merge_weights("svd"), "svd")
    assert [manager.is_resident(e) for e in (0, 1, 2)] == [False, True, False]
