"""The expert pool on peft: target detection, creation, activation, trainability, offload, deletion."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dylora_moe import ExpertConfig, ExpertManager
from dylora_moe.experts import detect_target_modules
from tests.conftest import batch, build, decide_by_cosine, randomise_experts, tiny_gpt2, tiny_llama


def test_target_detection_per_architecture():
    assert detect_target_modules(tiny_llama(), "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert detect_target_modules(tiny_llama(), "mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert detect_target_modules(tiny_gpt2(), "all-linear") == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64))
    assert detect_target_modules(neox, "attention") == ["attention.query_key_value", "attention.dense"]
    assert detect_target_modules(tiny_llama(), ["q_proj"]) == ["q_proj"]


def test_unknown_target_modules_name_the_model_layers():
    with pytest.raises(ValueError, match="q_proj"):
        detect_target_modules(tiny_llama(), ["nonexistent"])


def test_create_expert_uses_configured_rank_and_targets():
    manager = ExpertManager(tiny_llama(), ExpertConfig(rank=4, alpha=8))
    a, b = manager.create_expert(), manager.create_expert(rank=8)
    assert (a, b) == (0, 1) and manager.ranks == {0: 4, 1: 8}
    layer = manager.layers()[0]
    assert layer.lora_A["expert_0"].weight.shape[0] == 4 and layer.lora_A["expert_1"].weight.shape[0] == 8
    # a larger rank keeps the scaling of the base rank
    assert layer.scaling["expert_0"] == layer.scaling["expert_1"] == 2.0
    assert len(manager.layers()) == 2 * 4  # two layers, q/k/v/o


def test_route_layer_limits_experts_to_later_layers():
    model = build(route_layer=1)
    model.create_expert()
    names = [n for n, m in model.backbone.named_modules() if m in model.experts.layers()]
    assert names and all(".layers.1." in n for n in names)


def test_separate_route_pass_keeps_experts_on_every_layer():
    model = build(route_layer=1, route_pass="separate")
    model.create_expert()
    names = [n for n, m in model.backbone.named_modules() if m in model.experts.layers()]
    assert any(".layers.0." in n for n in names) and any(".layers.1." in n for n in names)


def test_single_expert_matches_peft_active_adapter(tmp_path):
    """Each expert alone equals that adapter loaded by plain peft onto a fresh copy of the backbone."""
    from peft import PeftModel

    model = build()
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    model.experts.peft_model.save_pretrained(str(tmp_path), selected_adapters=model.experts.names())
    inputs = batch()
    with torch.no_grad():
        outputs = []
        for e in model.experts.expert_ids:
            with model.single_expert(e):
                assert model.experts.peft_model.active_adapter == f"expert_{e}"
                outputs.append(model.backbone(**inputs).logits)
            reference = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / f"expert_{e}"))
            torch.testing.assert_close(outputs[-1], reference(**inputs).logits)
        plain = model.backbone(**inputs).logits  # adapters are off again
    torch.testing.assert_close(plain, tiny_llama()(**inputs).logits)
    assert not torch.allclose(outputs[0], outputs[1])


def test_set_trainable_touches_only_the_given_expert():
    model = build()
    for _ in range(3):
        model.create_expert()
    model.set_trainable([1], router=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("expert_1" in n for n in trainable)


def test_offload_moves_adapter_tensors_and_back():
    model = build()
    model.experts.config.offload_device = "cpu"
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    inputs = batch()
    with torch.no_grad():
        model.experts.onload(model.experts.expert_ids)
        for e in model.experts.expert_ids:
            model.mark_mature(e)
        expected = {}
        for e in model.experts.expert_ids:
            with model.single_expert(e):
                expected[e] = model.backbone(**inputs).logits
        model.experts.offload(model.experts.expert_ids)
    # offloaded: the modules hold meta placeholders, the manager holds the real tensors on the offload device
    assert all(p.device.type == "meta" for e in (0, 1, 2) for p in model.experts.parameters(e))
    assert all(not model.experts.is_resident(e) for e in (0, 1, 2))
    with torch.no_grad():
        out = model(**inputs)
    used = {model.experts.expert_ids[c] for c in out.routing_weights.argmax(-1).tolist()}
    for e in model.experts.expert_ids:
        assert model.experts.is_resident(e) == (e in used)
        assert all((p.device.type == "cpu") == (e in used) for p in model.experts.parameters(e))
    with torch.no_grad():
        for e in model.experts.expert_ids:
            with model.single_expert(e):
                torch.testing.assert_close(model.backbone(**inputs).logits, expected[e])


def test_delete_expert_removes_adapter_gate_column_and_skills():
    model = build()
    decide_by_cosine(model, 1.0)
    model.add_new_skill(["abc def"])
    model.add_new_skill(["0123 456"])
    model.add_new_skill(["%%% &&& ***"])
    model.delete_expert(1)
    assert model.experts.expert_ids == [0, 2] and model.router.num_experts == 2
    assert all("expert_1" not in layer.lora_A for layer in model.experts.layers())
    assert sorted(s.expert_id for s in model.library.skills.values()) == [0, 2]
    assert model.create_expert() == 3  # ids are never reused
    with pytest.raises(KeyError, match="no expert with id 1"):
        model.delete_expert(1)


def offloading_model():
    model = build(top_k=1)
    model.experts.config.offload_device = "cpu"
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    for e in model.experts.expert_ids:
        model.mark_mature(e)
    return model


def cached_stacks(model) -> dict:
    """(layer, key) -> the stack the mixture holds for it."""
    return {(layer, key): stack for layer, entries in model.mixture._cache.items() for key, stack in entries.items()}


def test_offloading_keeps_the_stacked_weight_cache():
    model = offloading_model()
    inputs = batch()
    with torch.no_grad():
        first = model(**inputs).logits
        version = model.experts.version
        stacks = cached_stacks(model)
        second = model(**inputs).logits
    assert stacks and model.experts.version == version  # nothing moved, nothing changed
    assert all(cached_stacks(model)[key] is stack for key, stack in stacks.items())  # served from the cache
    assert torch.equal(first, second)


def test_training_with_offloading_updates_the_trainable_expert_and_the_cache_hits():
    model = offloading_model()
    trained, other = model.experts.expert_ids[0], model.experts.expert_ids[1]
    model.set_trainable([trained], router=False)
    model.train()
    params = list(model.experts.parameters(trained))
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    inputs = batch()
    for _ in range(3):
        with torch.no_grad(), model.force_expert(other):
            model(**inputs)  # a batch routed elsewhere: the trainable expert must stay resident
        assert model.experts.is_resident(trained)
        with model.force_expert(trained):
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    now = list(model.experts.parameters(trained))
    assert all(p is q for p, q in zip(now, params, strict=True))  # the optimizer's tensors are the module's
    assert all(not torch.equal(p, b) for p, b in zip(now, before, strict=True))
    model.set_trainable([], router=False)
    model.eval()
    with torch.no_grad():
        model(**inputs)
        version, stacks = model.experts.version, cached_stacks(model)
        model(**inputs)
    assert model.experts.version == version
    assert all(cached_stacks(model)[k] is stack for k, stack in stacks.items())


def test_weights_swaps_a_copy_in_and_the_experts_own_back_with_the_caches_invalidated():
    model = build()
    for _ in range(2):
        model.create_expert()
    randomise_experts(model)
    expert = model.experts.expert_ids[0]
    model.set_trainable([expert], router=False)
    params = list(model.experts.parameters(expert))
    other = [torch.randn_like(p) for p in params]
    inputs = batch()
    with torch.no_grad(), model.force_expert(expert):
        own = model(**inputs).logits
        with model.experts.weights(expert, other):
            now = model.experts.parameters(expert)
            assert all(p.data_ptr() == v.data_ptr() for p, v in zip(now, other, strict=True))
            swapped = model(**inputs).logits  # a stale cached stack would answer with the expert's own weights
        again = model(**inputs).logits  # and a stale stack of the copy here
    assert not torch.allclose(own, swapped) and torch.equal(own, again)
    assert all(p is q for p, q in zip(model.experts.parameters(expert), params, strict=True))  # same Parameters
    with pytest.raises(ValueError, match="weight tensors"), model.experts.weights(expert, other[:1]):
        pass


def test_a_model_with_offloaded_experts_moves_and_trains_with_the_trainer(tmp_path):
    """The Trainer moves its model to its device (``Module.to``) when it is built: an offloaded expert's
    placeholders hold no data and are left as they are, and the expert comes back exact."""
    import datasets
    from transformers import TrainingArguments

    from dylora_moe.training import DyLoRATrainer, TrainingConfig
    from dylora_moe.training.measure import collator

    model = offloading_model()
    inputs = batch()
    with torch.no_grad(), model.force_expert(0):
        expected = model(**inputs).logits
    model.experts.offload([0])
    model.to(torch.device("cpu"))
    assert not model.experts.is_resident(0)
    assert all(p.device.type == "meta" for p in model.experts.parameters(0))
    model.set_trainable([1], router=True)
    model.train()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    data = datasets.Dataset.from_list([{"input_ids": r, "attention_mask": [1] * len(r),
                                        "labels": [-100, -100, *r[2:]]} for r in rows])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    DyLoRATrainer(model=model, args=args, train_dataset=data, data_collator=collator(model),
                  training=TrainingConfig(kl_weight=0.0, rehearsal_weight=0.0), seed_steps=1).train()
    model.set_trainable([], router=False)
    model.eval()
    with torch.no_grad(), model.force_expert(0):
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


def test_an_offloaded_expert_follows_a_dtype_change_of_the_model():
    """``half()``/``to(dtype)`` converts the resident experts; an offloaded one comes back in the same dtype
    (not in the one it was offloaded in), where it was offloaded to until then."""
    model = offloading_model()
    model.experts.offload([0])
    model.to(torch.bfloat16)
    store = model.experts._offloaded[0]
    assert all(data.dtype == torch.bfloat16 and data.device.type == "cpu" for data, _ in store.values())
    model.experts.onload([0])
    assert {p.dtype for e in (0, 1) for p in model.experts.parameters(e)} == {torch.bfloat16}
    with torch.no_grad(), model.force_expert(0):
        assert torch.isfinite(model(**batch()).logits).all()


def test_counting_an_experts_parameters_leaves_an_offloaded_expert_offloaded():
    """``num_parameters`` brought an offloaded expert back to count its weights and left it there: the
    benchmark's count of the pool's parameters undid the offloading of the whole pool. The placeholders keep the
    weights' shapes, so the count moves nothing and is the same."""
    model = build()
    model.experts.config.offload_device = "cpu"
    for rank in (4, 8, 2):
        model.create_expert(rank)
    model.experts.onload(model.experts.expert_ids)
    resident = [model.experts.num_parameters(e) for e in model.experts.expert_ids]
    assert resident[1] == 2 * resident[0] == 4 * resident[2] > 0
    model.experts.offload([0, 2])
    assert [model.experts.num_parameters(e) for e in model.experts.expert_ids] == resident
    assert [model.experts.is_resident(e) for e in (0, 1, 2)] == [False, True, False]
    assert all(p.device.type == "meta" for e in (0, 2) for p in model.experts.parameters(e))
