"""Generation through the fused mixture, checked against peft's single-expert generation and a hand-run greedy
loop: beam search and several returns per prompt at batch > 1, and text completion."""

from __future__ import annotations

import pytest
import torch

from dylora_moe import generation
from tests.conftest import batch, build, char_tokenizer, randomise_experts, tiny_gpt2

# where the gate reads: the embeddings inline, the final states, layer 1 inline, layer 1 from a prefix pass
GATE_INPUTS = [dict(), dict(route_layer=None), dict(route_layer=1), dict(route_layer=1, route_pass="separate")]


def grown(backbone=None, **router):
    model = build(backbone, **router)
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    for e in model.experts.expert_ids:
        model.mark_mature(e)
    with torch.no_grad():
        model.router.gate.weight.normal_(0, 5.0)  # spread the prompts over the experts
    return model


def peft_generate(model, inputs, experts, **kwargs):
    """Each prompt alone, through peft's adapter path with its expert: the independent reference."""
    rows = []
    for i, expert_id in enumerate(experts):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        with model.routing.plain(), model.single_expert(expert_id):
            rows.append(model.backbone.generate(**one, **kwargs))
    return torch.cat(rows)


MODES = {
    "beams": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "sampling": dict(do_sample=True, num_return_sequences=2, top_k=0),
    "greedy-returns": dict(num_beams=2, num_return_sequences=1, do_sample=False),
}


@pytest.mark.parametrize("router", GATE_INPUTS)
@pytest.mark.parametrize("mode", MODES)
def test_generation_expands_routing_for_beams_and_returns(mode, router):
    model = grown(top_k=1, **router)
    inputs = batch(bsz=2, t=6, seed=5)
    inputs["attention_mask"][0, :3] = 1  # the pad-free prompts peft generates one by one
    experts = [model.experts.expert_ids[c] for c in model.route(**inputs).weights.argmax(-1).tolist()]
    kwargs = dict(max_new_tokens=5, pad_token_id=0, **MODES[mode])
    torch.manual_seed(7)
    ours = model.generate(**inputs, **kwargs)
    if mode == "sampling":  # peft draws per prompt; draw ours per prompt too so both use the same numbers
        rows = []
        torch.manual_seed(7)
        for i in range(2):
            rows.append(model.generate(**{k: v[i : i + 1] for k, v in inputs.items()}, **kwargs))
        ours = torch.cat(rows)
        torch.manual_seed(7)
        reference = torch.cat([peft_generate(model, {k: v[i : i + 1] for k, v in inputs.items()}, [e], **kwargs)
                               for i, e in enumerate(experts)])
    else:
        reference = peft_generate(model, inputs, experts, **kwargs)
    assert ours.shape[0] == 2 * kwargs["num_return_sequences"]
    assert torch.equal(ours, reference)


def test_sampled_batch_with_several_returns_routes_each_row_on_its_prompt():
    """At batch 2 the expanded rows keep their prompt's routing: the first backbone pass routes rows 2i and
    2i+1 like prompt i."""
    model = grown(top_k=1)
    inputs = batch(bsz=2, t=6, seed=5)
    routed = []
    handle = model.backbone.register_forward_hook(
        lambda module, args, output: routed.append(model.mixture.plan) if not routed else None)
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2, pad_token_id=0)
    finally:
        handle.remove()
    chosen = model.route(**inputs).weights.argmax(-1)  # [2]
    plan = routed[0]
    picked = plan.weights.argmax(-1) if plan.indices is None else plan.indices[:, 0]
    expected = torch.tensor([model.experts.names().index(plan.active[int(p)]) for p in picked])
    assert torch.equal(expected, chosen.repeat_interleave(2))


def greedy_by_hand(model, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, no KV cache: each step re-runs the whole sequence with the prompt's routing."""
    tok = model.tokenizer
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    for _ in range(max_new_tokens):
        labels = torch.full_like(ids, -100)
        labels[:, n:] = ids[:, n:]  # the generated part is the response: routing reads the prompt only
        with torch.no_grad():
            logits = model(input_ids=ids, labels=labels).logits
        token = logits[0, -1].argmax()
        if token.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, token.view(1, 1)], 1)
    return tok.decode(ids[0, n:], skip_special_tokens=True)


@pytest.mark.parametrize("router", [dict(route_layer=None), dict(route_layer=1, route_pass="separate")])
def test_a_routing_pass_of_its_own_numbers_left_padded_prompts_as_the_routed_pass_does(router):
    # GPT-2's positions are absolute: a routing pass that numbered a left-padded prompt from its first pad would
    # read other hidden states than the routed pass, and route the prompt differently from the prompt alone.
    model = grown(tiny_gpt2(), top_k=1, **router)
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), generation.routed(model) as scope:
        model.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    alone = model.route(ids[:1, 3:]).logits  # [1, E]
    torch.testing.assert_close(scope.routing.logits[:1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model.route(ids[:1], mask[:1]).logits, alone, atol=1e-3)  # the numbering matters


@pytest.mark.parametrize("router", [dict(), dict(top_k=1)])
def test_complete_matches_a_greedy_loop_by_hand(router):
    model = grown(**router) if router else build()
    if not router:
        for _ in range(3):
            model.create_expert()
        randomise_experts(model)
    prompts = ["abc", "hello world"]
    texts = model.complete(prompts, max_new_tokens=4, chat=False)
    assert texts == [greedy_by_hand(model, p, 4) for p in prompts]
    assert model.complete(prompts, max_new_tokens=4, chat=False, batch_size=1) == texts
    assert model.tokenizer.padding_side == char_tokenizer().padding_side  # the shared tokenizer is not touched


def test_complete_names_prompts_without_tokens_and_a_prompt_cap_below_one():
    model = build()  # the test tokenizer adds no start token, as GPT-2's does not
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] have no tokens"):
        model.complete(["1+1=", ""], max_new_tokens=2, chat=False)
    with pytest.raises(ValueError, match="max_prompt_tokens must be >= 1"):
        model.complete(["1+1="], max_new_tokens=2, chat=False, max_prompt_tokens=0)
