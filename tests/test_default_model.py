"""The embedded default model end to end: load, add two real skills, route, generate with the KV cache."""

from __future__ import annotations

import pytest
import torch

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.data import humaneval, verilogeval

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def model():
    config = DyLoRAConfig(device="cpu")
    config.novelty.max_examples = 16
    return DyLoRAMoE.from_config(config).eval()


def test_default_model_adds_skills_routes_and_generates(model):
    assert model.backbone.config.num_hidden_layers == 30
    python = model.add_new_skill(humaneval()[:16], name="python")
    verilog = model.add_new_skill(verilogeval()[:16], name="verilog")
    again = model.add_new_skill(humaneval()[16:32], name="python again")
    assert python.is_novel and verilog.is_novel and not again.is_novel
    assert again.expert_id == python.expert_id and model.num_experts == 2
    assert model.router.strategy == "dense"

    enc = model.tokenizer(["def add(a, b):", "module top_module(input a, output b);"], return_tensors="pt",
                          padding=True)
    routing = model.route(**enc)
    assert routing.weights.shape == (2, 2)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(2))

    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    model.tokenizer.padding_side = "left"
    enc = model.tokenizer(["def add(a, b):", "Write a haiku about"], return_tensors="pt", padding=True)
    cached = model.generate(**enc, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(**enc, use_cache=False, **kwargs))
    assert all(isinstance(t, str) for t in model.complete(["Say hello."], max_new_tokens=6))
