"""Save -> load gives identical logits and routing; experts load with plain peft; bad checkpoints fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from dylora_moe import DyLoRAMoE
from tests.conftest import batch, build, char_tokenizer, randomise_experts, tiny_llama


def saved_system(tmp_path, mature=True):
    model = build(top_k=1)
    model.novelty.similarity_threshold = 1.0
    model.add_new_skill(["abc def ghi", "jkl mno"], name="letters")
    model.add_new_skill(["0123 4567", "89 01"], name="digits")
    model.create_expert(rank=8)
    randomise_experts(model, seed=3)
    with torch.no_grad():
        model.router.gate.weight.normal_(0, 2.0)
    if mature:
        for e in model.experts.expert_ids:
            model.mark_mature(e)
    model.save_pretrained(tmp_path / "system")
    return model


@pytest.mark.parametrize("mature", [True, False])
def test_round_trip_gives_identical_logits_and_routing(tmp_path, mature):
    model = saved_system(tmp_path, mature)
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    inputs = batch(bsz=4)
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(b.routing_weights, a.routing_weights)
    torch.testing.assert_close(b.logits, a.logits)
    assert loaded.experts.ranks == model.experts.ranks and loaded.experts.next_id == 3
    assert [s.name for s in loaded.library.skills.values()] == ["letters", "digits"]
    assert loaded.router.expert_maturity.tolist() == model.router.expert_maturity.tolist()
    assert loaded.create_expert() == 3


def test_each_expert_loads_with_plain_peft(tmp_path):
    model = saved_system(tmp_path)
    inputs = batch()
    for expert_id in model.experts.expert_ids:
        with torch.no_grad(), model.single_expert(expert_id):
            expected = model.backbone(**inputs).logits
        plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "system" / "experts" / f"expert_{expert_id}"))
        with torch.no_grad():
            torch.testing.assert_close(plain(**inputs).logits, expected)


def test_bad_checkpoints_fail_clearly_and_change_nothing(tmp_path):
    saved_system(tmp_path)
    folder = tmp_path / "system"
    snapshot = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def load():
        return DyLoRAMoE.from_pretrained(folder, backbone=tiny_llama(), tokenizer=char_tokenizer())

    with pytest.raises(FileNotFoundError, match="not a saved DyLoRA-MoE system"):
        DyLoRAMoE.from_pretrained(tmp_path, backbone=tiny_llama(), tokenizer=char_tokenizer())
    original = (folder / "dylora.json").read_text()
    (folder / "dylora.json").write_text(json.dumps({**json.loads(original), "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load()
    (folder / "dylora.json").write_text(original)
    weights = folder / "experts" / "expert_1" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        load()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load()
    weights.write_bytes(good)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == snapshot
    load()


def test_save_replaces_an_existing_checkpoint_whole(tmp_path):
    model = saved_system(tmp_path)
    model.delete_expert(2)
    model.save_pretrained(tmp_path / "system")
    assert sorted(p.name for p in (tmp_path / "system" / "experts").iterdir() if p.is_dir()) == ["expert_0", "expert_1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".system")]
