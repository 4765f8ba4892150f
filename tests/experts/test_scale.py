"""A pool of 256 tiny experts: a top-1 forward stacks only the selected experts, and a save after one expert
trained writes only that expert (the others are linked from the previous save)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dylora_moe.checkpoint import verify
from dylora_moe.experts.manager import expert_name
from tests.conftest import batch, build

pytestmark = pytest.mark.slow

POOL = 256


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    model = build(top_k=1)
    for _ in range(POOL):
        model.create_expert(rank=2)
    with torch.no_grad():
        for layer in model.experts.layers():
            for name in layer.lora_B:
                layer.lora_B[name].weight.normal_(0, 0.1)
        model.router.gate.weight.normal_(0, 1.0)
    model.experts.touch()
    for e in model.experts.expert_ids:
        model.mark_mature(e)
    folder = tmp_path_factory.mktemp("pool") / "system"
    model.save_pretrained(folder)
    return model, folder


def test_a_top1_forward_stacks_only_the_selected_experts(pool, monkeypatch):
    import dylora_moe.experts.fused as fused

    model, _ = pool
    stacked = []
    real = fused.stack_padded
    monkeypatch.setattr(fused, "stack_padded", lambda layer, names, blank=frozenset(): stacked.append(len(names))
                        or real(layer, names, blank))
    inputs = batch(bsz=4, t=8)
    chosen = model.route(**inputs).indices.unique().numel()
    with torch.no_grad():
        model(**inputs)
    assert stacked and max(stacked) == chosen <= 4  # never the pool


def test_a_save_after_one_expert_trained_writes_only_that_expert(pool):
    model, folder = pool

    def inodes():
        return {e: (folder / "experts" / expert_name(e) / "adapter_model.safetensors").stat().st_ino
                for e in model.experts.expert_ids}

    before = inodes()
    trained = model.experts.expert_ids[100]
    model.set_trainable([trained], router=False)
    with torch.no_grad():
        for p in model.experts.parameters(trained):
            p.add_(0.01)
    model.set_trainable([], router=False)
    model.save_pretrained(folder)
    after = inodes()
    assert [e for e in after if after[e] != before[e]] == [trained]
    saved = load_file(str(folder / "experts" / expert_name(trained) / "adapter_model.safetensors"))
    assert sum(t.sum() for t in saved.values()) == pytest.approx(
        sum(float(p.sum()) for p in model.experts.parameters(trained)), rel=1e-5)  # the trained weights
    verify(folder)  # and the folder is complete
