"""The routing head routes a prompt as the whole system does, whatever the router's options."""

from __future__ import annotations

import torch

from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig, RouterConfig
from dylora_moe.serving.routing_head import RoutingHead
from tests.conftest import char_tokenizer, randomise_experts, tiny_llama


def test_the_routing_head_keeps_dense_top_m(tmp_path):
    """Dense phase with more mature experts than ``dense_top_m``: each prompt mixes the immature expert and its
    top-m mature ones only, at the ingress as in the system (else the replica's routing never matches)."""
    tiny_llama().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    config = DyLoRAConfig(model=str(tmp_path / "model"), expert=ExpertConfig(rank=4, dropout=0.0),
                          router=RouterConfig(dense_top_m=1), device="cpu")
    model = DyLoRAMoE.from_config(config)
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    model.mark_mature(0)
    model.mark_mature(1)  # expert 2 is new: dense, two mature experts > dense_top_m
    with torch.no_grad():
        model.router.gate.weight.normal_(0, 50.0)
    model.save_pretrained(tmp_path / "system")
    head = RoutingHead(tmp_path / "system")
    ids = torch.tensor([[40, 41, 42, 43], [60, 61, 62, 63]])
    with torch.no_grad():
        want, got = model.route(ids).weights, head.model.route(ids).weights  # [2, 3]
    assert ((want > 0).sum(-1) == 2).all()  # one mature expert left out of each mix
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
