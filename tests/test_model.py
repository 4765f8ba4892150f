"""The whole system on tiny models: frozen backbone under training, routing API, KV-cache generation."""

from __future__ import annotations

import pytest
import torch

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.experts.targets import decoder_layers
from tests.conftest import HostReads, batch, build, char_tokenizer, randomise_experts, tiny_gpt2, tiny_llama

# where the gate reads: the embeddings inline, the final states, layer 1 inline, layer 1 from a prefix pass
GATE_INPUTS = [dict(), dict(route_layer=None), dict(route_layer=1), dict(route_layer=1, route_pass="separate")]


def grown(backbone=None, n=3, **router):
    model = build(backbone, **router)
    for _ in range(n):
        model.create_expert()
    randomise_experts(model)
    return model


@pytest.mark.parametrize("mixing", ["fused", "reference"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_training_changes_only_the_new_expert_and_the_gate(make, mixing):
    model = grown(make())
    model.config.mixing = mixing
    new = model.experts.expert_ids[-1]
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "lora_" not in n}
    experts_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "lora_" in n}
    gate_before = model.router.gate.weight.detach().clone()
    model.set_trainable([new], router=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(bsz=4, t=12)
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
        else:
            changed = not torch.equal(p, experts_before[n])
            assert changed == (f"expert_{new}" in n), n
    assert not torch.equal(model.router.gate.weight, gate_before)


def test_eval_after_training_sees_the_updated_weights():
    """Stacked-weight caches must not serve weights from before an optimizer step."""
    model = grown(top_k=1)
    for e in model.experts.expert_ids:
        model.mark_mature(e)  # top-1, where the reference mode is exact
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits
    model.set_trainable(model.experts.expert_ids, router=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(**inputs).logits
        model.config.mixing = "reference"
        reference = model(**inputs).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_force_expert_runs_exactly_one_expert_or_none(granularity):
    model = grown(granularity=granularity)
    inputs = batch()
    chosen = model.experts.expert_ids[1]
    with torch.no_grad():
        with model.force_expert(chosen):
            forced = model(**inputs)
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with model.routing.plain(), model.single_expert(chosen):
            alone = model.backbone(**inputs).logits
            alone_generated = model.backbone.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with model.force_expert(None):
            nothing = model(**inputs).logits
        with model.routing.plain():
            plain = model.backbone(**inputs).logits
        routed = model(**inputs).logits
    torch.testing.assert_close(forced.logits, alone, rtol=1e-5, atol=1e-5)
    assert forced.routing_weights[..., 1].eq(1).all() and forced.routing_weights.sum(-1).eq(1).all()
    torch.testing.assert_close(nothing, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(routed, forced.logits)  # the gate is back outside the block
    assert torch.equal(generated, alone_generated)  # per-token routing too: every new token gets the same expert
    with pytest.raises(KeyError, match="no expert with id 99"), model.force_expert(99):
        pass


@pytest.mark.parametrize("router", [dict(route_layer=None), dict(route_layer=1, route_pass="separate")])
def test_a_forced_expert_runs_no_gate_pass(router):
    """The KL's frozen and forced forwards run every training step: a forced routing reads no hidden state, so
    the gate's own pass (the frozen final states, or a prefix up to ``route_layer``) is skipped."""
    model = grown(**router)
    inputs = batch()
    first_layer = decoder_layers(model.backbone)[0]
    calls = []
    hook = first_layer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            model(**inputs)
            assert len(calls) == 2  # the gate's pass, then the routed pass
            for expert in (model.experts.expert_ids[1], None):
                calls.clear()
                with model.force_expert(expert):
                    model(**inputs)
                assert len(calls) == 1
    finally:
        hook.remove()


def gate_input_by_hand(model, inputs):
    """The hidden states the gate should read, from the plain backbone's own hidden-state outputs."""
    with torch.no_grad(), model.routing.plain():
        states = model.backbone(**inputs, output_hidden_states=True).hidden_states  # embeddings, then each layer
    layer = model.config.router.route_layer
    return states[-1] if layer is None else states[layer]  # the input of decoder layer ``layer``


def pooled_by_hand(hidden, mask):
    m = mask.float().unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("router", GATE_INPUTS)
def test_route_matches_the_forward_routing(router):
    model = grown(**router)
    inputs = batch()
    expected = torch.softmax(model.router.gate(pooled_by_hand(gate_input_by_hand(model, inputs),
                                                              inputs["attention_mask"])), -1)
    with torch.no_grad():
        torch.testing.assert_close(model.route(**inputs).weights, expected)
        torch.testing.assert_close(model(**inputs).routing_weights, expected)


def test_no_experts_is_the_plain_backbone():
    model = build()
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model.backbone(**inputs).logits)


@pytest.mark.parametrize("router", [
    dict(), dict(top_k=1, mature=True), dict(granularity="token"), dict(route_layer=None),
    dict(route_layer=1, top_k=2, mature=True), dict(route_layer=1, route_pass="separate"),
])
def test_generation_with_cache_equals_without(router):
    mature = router.pop("mature", False)
    model = grown(**router)
    if mature:
        for e in model.experts.expert_ids:
            model.mark_mature(e)
    inputs = batch(bsz=3, t=6, seed=2)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**inputs, use_cache=True, **kwargs)
    without = model.generate(**inputs, use_cache=False, **kwargs)
    assert with_cache.shape == (3, 14)
    assert torch.equal(with_cache, without)
    # the experts matter: the plain backbone continues differently
    plain = model.backbone.generate(**inputs, **kwargs)
    assert not torch.equal(plain, with_cache)


def test_first_token_of_generation_matches_forward():
    model = grown()
    inputs = batch(bsz=2, t=7, seed=4)
    with torch.no_grad():
        expected = model(**inputs).logits[:, -1].argmax(-1)
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, -1], expected)


def test_trainable_lm_head_is_untied_and_trainable():
    model = DyLoRAMoE(tiny_llama(), char_tokenizer(), DyLoRAConfig(model="tiny", trainable_lm_head=True))
    head = model.backbone.get_output_embeddings()
    assert head.weight.requires_grad
    assert head.weight.data_ptr() != model.backbone.get_input_embeddings().weight.data_ptr()


def test_route_layer_beyond_the_model_is_rejected():
    with pytest.raises(ValueError, match="decoder layers"):
        build(route_layer=5)


@pytest.mark.parametrize("router", GATE_INPUTS)
def test_routing_features_feed_the_gate(router):
    model = grown(**router)
    inputs = batch()
    with torch.no_grad():
        features = model.routing_features(**inputs)
    torch.testing.assert_close(features, pooled_by_hand(gate_input_by_hand(model, inputs), inputs["attention_mask"]))


def gate_by_hand(model, input_ids, pool_mask):
    """Independent routing of route_layer=0: the gate of the masked mean token embedding, softmaxed."""
    with torch.no_grad():
        hidden = model.backbone.get_input_embeddings()(input_ids)  # [B, T, H]: the input of decoder layer 0
        m = pool_mask.float().unsqueeze(-1)
        pooled = (hidden * m).sum(1) / m.sum(1)
        return torch.softmax(model.router.gate(pooled) / model.router.temperature, -1)


def test_sequence_routing_reads_the_prompt_and_never_the_answer():
    model = grown()
    inputs = batch(bsz=3, t=10)
    labels = inputs["input_ids"].clone()
    labels[:, :6] = -100  # a 6-token prompt (row 0: 3 of them padding), then the response
    other = inputs["input_ids"].clone()
    other[:, -1] = 4 + (other[:, -1] + 50) % 120  # another last response token
    with torch.no_grad():
        a = model(**inputs, labels=labels).routing_weights
        b = model(input_ids=other, attention_mask=inputs["attention_mask"], labels=labels).routing_weights
        prompt_only = model.route(inputs["input_ids"][:, :6], inputs["attention_mask"][:, :6]).weights
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, prompt_only)
    prompt = inputs["attention_mask"].clone()
    prompt[:, 6:] = 0
    torch.testing.assert_close(a, gate_by_hand(model, inputs["input_ids"], prompt))


def test_route_on_text_keeps_the_whole_sequence_routing():
    model = grown(route_on="text")
    inputs = batch(bsz=3, t=10)
    labels = inputs["input_ids"].clone()
    labels[:, :6] = -100
    with torch.no_grad():
        routed = model(**inputs, labels=labels).routing_weights
    torch.testing.assert_close(routed, gate_by_hand(model, inputs["input_ids"], inputs["attention_mask"]))


@pytest.mark.parametrize("chat", [True, False])
def test_training_batches_route_as_generation_does(chat):
    """Through the data pipeline (chat-templated or plain), a training batch is routed exactly like its prompt
    alone, which is what generation routes on."""
    from dylora_moe.data.preprocess import build_dataset, render_prompt
    from dylora_moe.data.sources import Example
    from dylora_moe.training.measure import collator

    model = grown()
    if chat:
        model.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    examples = [Example("1+1=", "2"), Example("what is up", "the sky, mostly")]
    data = build_dataset(model.tokenizer, examples, max_length=64, chat=chat)
    inputs = collator(model)([data[i] for i in range(len(data))])
    prompts = [render_prompt(model.tokenizer, e.prompt, chat) for e in examples]
    with torch.no_grad():
        trained = model(**inputs).routing_weights
        alone = torch.cat([model.route(**model.tokenizer([p], return_tensors="pt", add_special_tokens=False)).weights
                           for p in prompts])
    torch.testing.assert_close(trained, alone)


def test_training_forward_builds_no_kv_cache():
    model = grown()
    inputs = batch()
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.past_key_values is None
    model.eval()
    with torch.no_grad():
        assert model(**inputs).past_key_values is not None  # inference keeps the backbone's default


@pytest.mark.parametrize("device_map", [{"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1},
                                        {"model": "cpu", "lm_head": "disk"}])
def test_a_backbone_dispatched_over_devices_is_refused_with_the_fix(device_map):
    backbone = tiny_llama()
    backbone.hf_device_map = device_map
    with pytest.raises(ValueError, match=r"device_map.*offload_device"):
        build(backbone=backbone)
    one = tiny_llama()
    one.hf_device_map = {"": "cpu"}  # one device: as if loaded without a map
    assert build(backbone=one).num_experts == 0


@pytest.mark.parametrize("mature", [False, True])
@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_a_system_cast_to_bf16_mixes_its_float32_routing(mature, granularity):
    """``model.to(torch.bfloat16)`` casts the adapters and the gate; routing stays float32 and the fused
    mixture scales the bf16 ranks with it cast to their dtype (a bf16 @ fp32 matmul would raise); at top-1 it
    matches one bf16 pass of the routed expert (the reference mixing)."""
    model = grown(top_k=1, granularity=granularity).to(torch.bfloat16)
    for e in model.experts.expert_ids:
        model.mark_mature(e, mature)
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs)
        assert out.routing_weights.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
    if mature and granularity == "sequence":  # top-1, where the reference mixing is exact
        model.config.mixing = "reference"
        with torch.no_grad():
            reference = model(**inputs).logits
        torch.testing.assert_close(out.logits.float(), reference.float(), rtol=0.05, atol=0.05)


def test_rehearsal_loss_under_bf16_autocast_is_the_float32_one():
    model = grown()
    features, columns = torch.randn(8, model.router.hidden_size), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    inputs = batch()
    expected = model(**inputs, rehearsal=(features, columns)).rehearsal_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(**inputs, rehearsal=(features, columns)).rehearsal_loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mature", [False, True])
def test_reference_mixing_reads_the_routing_once_per_forward_not_once_per_expert(mature):
    model = grown(n=4, top_k=2)
    for e in model.experts.expert_ids:
        model.mark_mature(e, mature)
    model.config.mixing = "reference"
    with torch.no_grad(), HostReads("dylora_moe/model.py") as reads:
        model(**batch())
    assert reads.count == 1


def test_reference_mixing_without_an_expert_is_the_frozen_model():
    """``force_expert(None)`` under output-level mixing weighs every expert 0: the output is the frozen model's,
    as in the fused path (the teacher of the KL to the frozen model), not missing logits."""
    model = grown()
    model.config.mixing = "reference"
    inputs = batch()
    with torch.no_grad():
        with model.force_expert(None):
            nothing = model(**inputs, labels=inputs["input_ids"])
        with model.routing.plain():
            plain = model.backbone(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(nothing.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nothing.loss, plain.loss, rtol=1e-5, atol=1e-5)


def test_reference_mixing_offloads_the_experts_a_batch_does_not_use():
    """Output-level mixing brought each expert a batch weighs back for its pass (``single_expert``) and never
    offloaded it: every expert some batch had used stayed on the device. The batch's experts are made resident
    and the others offloaded, the residency the fused forward leaves, with the same logits."""
    model = grown(top_k=1)
    ids = model.experts.expert_ids
    for e in ids:
        model.mark_mature(e)
    model.config.mixing = "reference"
    inputs = batch()
    with torch.no_grad():
        expected = {}
        for e in ids:
            with model.force_expert(e):
                expected[e] = model(**inputs).logits
        routed = model(**inputs).logits
        model.experts.config.offload_device = "cpu"
        model.experts.offload(ids)
        for e in ids:
            with model.force_expert(e):
                torch.testing.assert_close(model(**inputs).logits, expected[e], rtol=0, atol=0)
            assert [model.experts.is_resident(x) for x in ids] == [x == e for x in ids]
        out = model(**inputs)
        torch.testing.assert_close(out.logits, routed, rtol=0, atol=0)
        residency = [model.experts.is_resident(x) for x in ids]
        assert residency == [x in {ids[c] for c in out.routing_weights.argmax(-1).tolist()} for x in ids]
        model.config.mixing = "fused"
        model(**inputs)
    assert [model.experts.is_resident(x) for x in ids] == residency


def test_a_backbone_folder_given_relative_is_found_again_from_another_directory(tmp_path, monkeypatch):
    """``DyLoRAConfig(model="models/x")`` resolves against the working directory of the build: the saved system
    records the folder absolute, so it loads from anywhere (as the CLI's systems do)."""
    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained("models/tiny")
    char_tokenizer().save_pretrained("models/tiny")
    model = DyLoRAMoE.from_config(DyLoRAConfig(model="models/tiny", device="cpu"))
    model.create_expert()
    model.save_pretrained("runs/system")
    assert model.config.model == str(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path / "runs")
    assert DyLoRAMoE.from_pretrained("system").num_experts == 1


@pytest.mark.parametrize("router", [dict(top_k=1), dict(top_k=1, route_layer=None),
                                    dict(top_k=1, route_layer=1, route_pass="separate")])
def test_reference_mixing_numbers_tokens_by_the_given_position_ids(router):
    """GPT-2's positions are absolute: with ``position_ids`` for a left-padded batch, the spec's output-level
    mixing (top-1: the routed expert's own pass) equals the fused pass, which numbers the tokens by them."""
    model = build(tiny_gpt2(), **router)
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    for e in model.experts.expert_ids:
        model.mark_mature(e)
    inputs = batch(bsz=4, t=12, seed=1)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    attended = inputs["attention_mask"].bool()
    with torch.no_grad():
        fused = model(**inputs, position_ids=positions)
        model.config.mixing = "reference"
        reference = model(**inputs, position_ids=positions)
    torch.testing.assert_close(reference.routing_weights, fused.routing_weights)
    torch.testing.assert_close(reference.logits[attended], fused.logits[attended], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_routing_features_for_do_not_depend_on_the_tokenizers_padding_side(granularity):
    """GPT-2's positions are absolute: texts batched together get the features they get alone even when the
    tokenizer pads on the left (its padding side is shared state a caller may have set for generation)."""
    model = build(tiny_gpt2(), route_layer=1, granularity=granularity)
    model.create_expert()
    model.tokenizer.padding_side = "left"
    texts = ["a much longer text than the other", "hi"]
    with torch.no_grad():
        batched = model.routing_features_for(texts, raw=True)
        alone = torch.cat([model.routing_features_for([t], raw=True) for t in texts])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
