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
    text = model.complete(["Say hello."], max_new_tokens=6)[0]
    assert text.strip() and text == greedy_by_hand(model, "Say hello.", 6)


def greedy_by_hand(model, prompt: str, max_new_tokens: int) -> str:
    """The chat-templated prompt, no KV cache, the whole sequence re-run per token, routed on the prompt."""
    tok = model.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    ids = tok(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
    n = ids.shape[1]
    for _ in range(max_new_tokens):
        labels = torch.full_like(ids, -100)
        labels[:, n:] = ids[:, n:]
        with torch.no_grad():
            token = model(input_ids=ids, labels=labels).logits[0, -1].argmax()
        if token.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, token.view(1, 1)], 1)
    return tok.decode(ids[0, n:], skip_special_tokens=True)
