"""Save -> load gives identical logits and routing; experts load with plain peft; bad checkpoints fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from tests.conftest import batch, build, char_tokenizer, decide_by_cosine, randomise_experts, tiny_llama


def saved_system(tmp_path, mature=True):
    model = build(top_k=1)
    decide_by_cosine(model, 1.0)
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
    assert loaded.library.capacity == model.config.novelty.capacity
    assert [s.name for s in loaded.library.skills.values()] == ["letters", "digits"]
    assert loaded.router.expert_maturity.tolist() == model.router.expert_maturity.tolist()
    assert loaded.create_expert() == 3


def test_a_load_can_change_the_librarys_capacity(tmp_path):
    saved_system(tmp_path, mature=True)
    smaller = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer(),
                                        novelty={"capacity": 5})
    assert smaller.config.novelty.capacity == 5 and smaller.library.capacity == 5


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
    weights.write_bytes(good[:-64])  # a write cut short: the header lists more data than the file holds
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is corrupt"):
        load()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load()
    weights.write_bytes(good)
    manifest = json.loads(original)
    no_rank = {**manifest, "ranks": {k: v for k, v in manifest["ranks"].items() if k != "1"}}
    # a JSON file cut short, a manifest missing its fields or an expert's rank: named, with the way out
    for name, text, message in (("dylora.json", "{", r"dylora.json is corrupt"),
                                ("dylora.json", json.dumps({"format_version": 1}), "not a complete manifest"),
                                ("dylora.json", json.dumps(no_rank),
                                 r"dylora.json does not fit .*expert\(s\) 1\b.*restore the file from a copy"),
                                ("library.json", "[1,", r"library.json is corrupt"),
                                ("experts/expert_1/adapter_config.json", "{", r"adapter_config.json is corrupt")):
        before = (folder / name).read_text()
        (folder / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            load()
        (folder / name).write_text(before)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == snapshot
    load()


def test_save_replaces_an_existing_checkpoint_whole(tmp_path):
    model = saved_system(tmp_path)
    model.delete_expert(2)
    model.save_pretrained(tmp_path / "system")
    assert sorted(p.name for p in (tmp_path / "system" / "experts").iterdir() if p.is_dir()) == ["expert_0", "expert_1"]
    locks = (".system.lock", ".system.swap")  # the writer and swap lock files stay; no copy or temp folder does
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".system") and p.name not in locks]


def two_skill_system(tmp_path):
    from tests.novelty.test_novelty import DIGITS, LETTERS, texts

    model = build()
    model.add_new_skill(texts(LETTERS, 16, 0), name="letters")
    model.add_new_skill(texts(DIGITS, 16, 1), name="digits")
    model.save_pretrained(tmp_path / "system")
    return model, texts(LETTERS, 16, 2)


def test_round_trip_keeps_the_skill_samples_and_the_decisions(tmp_path):
    model, probe = two_skill_system(tmp_path)
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    for a, b in zip(model.library.skills.values(), loaded.library.skills.values(), strict=True):
        torch.testing.assert_close(b.sample.features, a.sample.features)
        torch.testing.assert_close(b.sample.gate, a.sample.gate)
        assert torch.equal(b.sample.keys, a.sample.keys)
    x, y = model.add_new_skill(probe), loaded.add_new_skill(probe)
    assert (x.is_novel, x.skill_id) == (y.is_novel, y.skill_id) == (False, 0)
    assert y.statistic == pytest.approx(x.statistic)


def test_library_saved_before_skill_samples_keeps_its_cosine_decision(tmp_path):
    from safetensors.torch import load_file, save_file

    _, probe = two_skill_system(tmp_path)
    folder = tmp_path / "system"
    tensors = load_file(str(folder / "library.safetensors"))
    save_file({k: v for k, v in tensors.items() if "." not in k}, str(folder / "library.safetensors"))
    manifest = json.loads((folder / "dylora.json").read_text())
    manifest["config"]["novelty"] = {"similarity_threshold": 0.5, "embed_on": "response", "max_examples": 64,
                                     "max_length": 256, "batch_size": 8}  # the fields such systems were saved with
    (folder / "dylora.json").write_text(json.dumps(manifest))

    old = DyLoRAMoE.from_pretrained(folder, backbone=tiny_llama(), tokenizer=char_tokenizer())
    assert old.config.novelty.method == "cosine" and old.library.missing_samples() == ["letters", "digits"]
    assert old.add_new_skill(probe).method == "cosine"
    forced = DyLoRAMoE.from_pretrained(folder, backbone=tiny_llama(), tokenizer=char_tokenizer(),
                                       novelty={"method": "separation"})
    with pytest.raises(ValueError, match=r"older dylora-moe.*'method': 'cosine'"):
        forced.add_new_skill(probe)
    assert forced.num_experts == 2 and len(forced.library) == 2  # refused before anything changed
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_loaded_system_lives_on_its_backbone_device_and_grows(tmp_path, device):
    """Everything a load restores sits where the live model computes (skill embeddings included), so a loaded
    system can recognise and add skills: what ``train --resume`` and serving uploads do."""
    saved_system(tmp_path)
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama().to(device),
                                       tokenizer=char_tokenizer())
    dev = loaded.device
    # the library stays on the CPU, where the novelty statistics run; every consumer moves what it compares
    assert all(s.embedding.device.type == "cpu" for s in loaded.library.skills.values())
    assert loaded.router.gate.weight.device == dev and loaded.router.expert_maturity.device == dev
    assert all(p.device == dev for e in loaded.experts.expert_ids for p in loaded.experts.parameters(e))
    decide_by_cosine(loaded, 0.9)
    assert not loaded.add_new_skill(["abc def ghi", "jkl mno"]).is_novel  # folds into a loaded embedding
    decide_by_cosine(loaded, 1.0)
    assert loaded.add_new_skill(["@@ ## $$"]).is_novel
    inputs = {k: v.to(dev) for k, v in batch().items()}
    out = loaded.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.device == dev


@pytest.mark.parametrize(("saved", "loaded"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_save_in_one_dtype_load_into_another(tmp_path, saved, loaded):
    model = build(backbone=tiny_llama().to(saved), top_k=1)
    decide_by_cosine(model, 1.0)
    model.add_new_skill(["abc def ghi"], name="letters")
    model.add_new_skill(["0123 4567"], name="digits")
    randomise_experts(model, seed=3)
    model.save_pretrained(tmp_path / "system")
    other = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama().to(loaded),
                                      tokenizer=char_tokenizer())
    # peft keeps adapters in fp32 on a half-precision backbone; the gate is fp32 everywhere
    for e in other.experts.expert_ids:
        for p, q in zip(model.experts.parameters(e), other.experts.parameters(e), strict=True):
            assert q.dtype == torch.float32
            torch.testing.assert_close(q, p.float())
    inputs = batch()
    with torch.no_grad():
        a, b = model(**inputs), other(**inputs)
    torch.testing.assert_close(b.routing_weights, a.routing_weights, rtol=0.05, atol=0.02)
    torch.testing.assert_close(b.logits.float(), a.logits.float(), rtol=0.05, atol=0.05)
    assert b.logits.dtype == loaded
    decide_by_cosine(other, 0.9)
    assert other.add_new_skill(["abc def ghi"]).expert_id == 0  # the saved embedding, recognised


def test_a_save_rewrites_only_the_experts_that_changed(tmp_path):
    from dylora_moe.experts.manager import expert_name

    model = build()
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    model.save_pretrained(tmp_path / "system")

    def inode(expert_id):
        return (tmp_path / "system" / "experts" / expert_name(expert_id) / "adapter_model.safetensors").stat().st_ino

    before = {e: inode(e) for e in model.experts.expert_ids}
    model.set_trainable([1], router=False)  # expert 1 trains; 0 and 2 cannot change
    with torch.no_grad():
        for p in model.experts.parameters(1):
            p.add_(0.5)
    model.set_trainable([], router=False)
    model.create_expert()
    model.save_pretrained(tmp_path / "system")
    after = {e: inode(e) for e in (0, 1, 2)}
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    for e in model.experts.expert_ids:
        for mine, theirs in zip(model.experts.parameters(e), loaded.experts.parameters(e), strict=True):
            torch.testing.assert_close(mine, theirs)
    # a loaded system saved back links everything; a hand edit announced with touch() rewrites everything
    loaded.save_pretrained(tmp_path / "system")
    assert inode(0) == before[0]
    with torch.no_grad():
        next(loaded.experts.parameters(0)).add_(1.0)
    loaded.experts.touch()
    loaded.save_pretrained(tmp_path / "system")
    assert inode(0) != before[0] and inode(2) != before[2]
    again = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    torch.testing.assert_close(next(again.experts.parameters(0)), next(loaded.experts.parameters(0)))


def test_a_save_leaves_offloaded_experts_offloaded_and_writes_the_same_files(tmp_path):
    """A save brought every offloaded expert back to write it and left it there: one save undid the offloading
    of the whole pool."""
    model = build()
    model.experts.config.offload_device = "cpu"
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    model.experts.onload(model.experts.expert_ids)
    model.save_pretrained(tmp_path / "resident")
    model.experts.offload([0, 2])
    model.save_pretrained(tmp_path / "offloaded")
    assert [model.experts.is_resident(e) for e in (0, 1, 2)] == [False, True, False]
    assert all(p.device.type == "meta" for e in (0, 2) for p in model.experts.parameters(e))
    files = sorted(f.relative_to(tmp_path / "resident") for f in (tmp_path / "resident").rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(tmp_path / "offloaded") for f in (tmp_path / "offloaded").rglob("*")
                           if f.is_file())
    for f in files:
        assert (tmp_path / "offloaded" / f).read_bytes() == (tmp_path / "resident" / f).read_bytes(), f
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "offloaded", backbone=tiny_llama(), tokenizer=char_tokenizer())
    model.experts.onload(model.experts.expert_ids)
    loaded.experts.onload(loaded.experts.expert_ids)
    for e in model.experts.expert_ids:
        for mine, theirs in zip(model.experts.parameters(e), loaded.experts.parameters(e), strict=True):
            torch.testing.assert_close(theirs, mine, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trained_output_head_is_saved_and_loaded_in_float32(tmp_path, dtype):
    """With ``trainable_lm_head`` the head trains with the experts: it is part of the system, not of the
    backbone's file, and keeps float32 weights on a half-precision backbone."""
    config = DyLoRAConfig(model="tiny", trainable_lm_head=True)
    model = DyLoRAMoE(tiny_llama().to(dtype), char_tokenizer(), config)
    head = model.backbone.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and head.weight.requires_grad
    with torch.no_grad():
        head.weight.add_(0.1 * torch.randn_like(head.weight))  # as training would move it
        logits = model(**batch()).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "system")
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama().to(dtype),
                                       tokenizer=char_tokenizer())
    torch.testing.assert_close(loaded.backbone.get_output_embeddings().weight, head.weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, logits)


def test_a_save_reaches_the_disk_before_the_old_copy_is_removed(tmp_path, monkeypatch):
    """Every file of the new folder is fsynced before the swap, and the parent folder after the renames, before
    the old copy is removed: a power cut leaves a complete old or new checkpoint, never empty files."""
    import os
    import shutil

    saved_system(tmp_path)
    synced, removed = [], []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: removed.append((str(p), len(synced))) or real_rmtree(p, **kw))
    model = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    model.experts.touch()
    model.save_pretrained(tmp_path / "system")
    names = {p.name for p in (tmp_path / "system").rglob("*") if p.is_file()}
    assert names and names <= {path.rsplit("/", 1)[1] for path in synced}
    old = [count for path, count in removed if path.endswith(".system.old")]
    assert old and old[-1] == len(synced) and synced[-1] == str(tmp_path)
    synced.clear()
    model.save_pretrained(tmp_path / "system")  # nothing trained since: the experts are linked, not synced again
    assert not any("adapter_model" in path for path in synced) and "router.safetensors" in str(synced)


def test_a_trainable_expert_is_written_at_every_save(tmp_path):
    """A user's loop that saves after every epoch: the expert still training is written each time, never linked
    from the previous save."""
    model = build()
    model.create_expert()
    model.set_trainable([0])
    for epoch in range(2):
        with torch.no_grad():  # an optimizer step, as a user's loop takes it (no touch() call)
            for p in model.experts.parameters(0):
                p.add_(0.25)
        model.save_pretrained(tmp_path / "system")
        loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
        for mine, theirs in zip(model.experts.parameters(0), loaded.experts.parameters(0), strict=True):
            torch.testing.assert_close(mine, theirs, msg=f"save after epoch {epoch} holds stale weights")


def test_set_trainable_refuses_an_unknown_expert():
    model = build()
    model.create_expert()
    with pytest.raises(KeyError, match="no expert with id 7"):
        model.set_trainable([7])
    assert model.experts.trainable_ids == frozenset()


def test_a_section_override_changes_only_the_fields_it_names(tmp_path):
    from dylora_moe.config import RouterConfig

    model = build(route_layer=1, temperature=0.5, top_k=2)
    model.save_pretrained(tmp_path / "system")
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer(),
                                       router={"top_k": 1}, novelty={"permutations": 99})
    router = loaded.config.router
    assert (router.top_k, router.route_layer, router.temperature) == (1, 1, 0.5)
    assert loaded.config.novelty.permutations == 99
    assert loaded.config.novelty.method == model.config.novelty.method
    # a config object replaces the whole section
    whole = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer(),
                                      router=RouterConfig(top_k=1))
    assert whole.config.router == RouterConfig(top_k=1)


def test_an_expert_target_override_that_differs_from_the_saved_experts_is_refused_at_load(tmp_path):
    """Experts on different layers cannot share a pool (stacked, mixed, merged): a load that would create new
    experts on other targets than the saved ones stops with the fix named, instead of a KeyError later."""
    model = build()
    model.create_expert()
    model.save_pretrained(tmp_path / "system")
    targets = sorted(model.experts.target_modules)
    with pytest.raises(ValueError, match="must adapt the same layers"):
        DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer(),
                                  expert={"target_modules": targets[:1]})
    same = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer(),
                                     expert={"target_modules": list(reversed(targets))})
    same.create_expert()  # the same targets in another order load, and the pool grows
    assert same.experts.expert_ids == [0, 1]


def test_an_atomic_text_write_leaves_the_old_file_whole_when_it_fails(tmp_path, monkeypatch):
    from dylora_moe.checkpoint import write_text_atomic

    target = tmp_path / "tune.json"
    write_text_atomic(target, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["tune.json"]  # no temp left


@pytest.mark.parametrize("kept", ["half", "none"])
def test_an_adapter_file_missing_tensors_is_refused_not_loaded_blank(tmp_path, kept):
    """peft only warns about an adapter's missing tensors and leaves those layers freshly initialised: a load
    must refuse the file, naming it and the way out, instead of serving a blank expert as the trained one."""
    from safetensors.torch import load_file, save_file

    saved_system(tmp_path)
    weights = tmp_path / "system" / "experts" / "expert_1" / "adapter_model.safetensors"
    state = load_file(str(weights))
    keys = sorted(state)[: len(state) // 2] if kept == "half" else []
    save_file({k: state[k] for k in keys} or {"unrelated": torch.zeros(1)}, str(weights))
    before = weights.read_bytes()
    with pytest.raises(ValueError, match=r"(?s)expert_1/adapter_model.safetensors lacks \d+ of .*restore it"):
        DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    assert weights.read_bytes() == before


def test_saved_tensors_that_do_not_fit_the_backbone_name_the_file_and_the_fix(tmp_path):
    """A system loaded on another backbone (other widths), or a router file of another pool's shape: the error
    names the file that does not fit and how to load it, not only torch's size mismatch."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    saved_system(tmp_path)
    folder = tmp_path / "system"
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    with pytest.raises(ValueError, match=r"(?s)expert_0/adapter_model.safetensors does not fit .*size mismatch"
                                         r".*saved with \('tiny'\)"):
        DyLoRAMoE.from_pretrained(folder, backbone=wider, tokenizer=char_tokenizer())
    router = load_file(str(folder / "router.safetensors"))
    save_file({**router, "gate.weight": torch.zeros(5, 32)}, str(folder / "router.safetensors"))
    with pytest.raises(ValueError, match=r"router.safetensors does not fit .*restore the file from a copy"):
        DyLoRAMoE.from_pretrained(folder, backbone=tiny_llama(), tokenizer=char_tokenizer())


@pytest.mark.parametrize("damage", ["no gate weight", "a column too many"])
def test_a_router_file_that_does_not_match_the_pool_is_refused_at_load(tmp_path, damage):
    """A router file without its gate, or with a gate, bias and maturity of one pool size that is not the
    manifest's: named at load (a KeyError, or a system whose gate routes to an expert it does not have)."""
    from safetensors.torch import load_file, save_file

    model = saved_system(tmp_path)
    folder = tmp_path / "system"
    router = load_file(str(folder / "router.safetensors"))
    n = model.num_experts
    if damage == "no gate weight":
        del router["gate.weight"]
    else:
        router = {"gate.weight": torch.zeros(n + 1, 32), "gate.bias": torch.zeros(n + 1),
                  "expert_maturity": torch.ones(n + 1, dtype=torch.long)}
    save_file(router, str(folder / "router.safetensors"))
    with pytest.raises(ValueError, match=r"router.safetensors does not fit .*restore the file from a copy"):
        DyLoRAMoE.from_pretrained(folder, backbone=tiny_llama(), tokenizer=char_tokenizer())


def test_a_config_field_of_a_newer_version_names_the_manifest_and_the_upgrade(tmp_path):
    """A system saved by a newer dylora-moe (a config field this version lacks) is refused with the manifest, the
    fields and the way out; one saved by an older version (fields missing) loads with their defaults."""
    build().save_pretrained(tmp_path / "system")
    manifest = tmp_path / "system" / "dylora.json"
    saved = json.loads(manifest.read_text())
    newer = {**saved, "config": {**saved["config"], "future": 1,
                                 "novelty": {**saved["config"]["novelty"], "knob": 2}}}
    manifest.write_text(json.dumps(newer))
    with pytest.raises(ValueError, match=r"dylora.json has config field\(s\) this dylora-moe does not know "
                                         r"\(future, novelty.knob\).*newer dylora-moe; upgrade"):
        DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    older = {**saved, "config": {k: v for k, v in saved["config"].items() if k != "max_experts"}}
    manifest.write_text(json.dumps(older))
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    assert loaded.config.max_experts is None


def test_a_system_on_a_read_only_file_system_loads(tmp_path, monkeypatch):
    """A saved folder copied to a read-only mount (without the lock files beside it): no lock file can be made
    there, and none is needed, since no save can swap the folder; the load reads it as is."""
    import errno
    import os
    import shutil

    model = build()
    model.create_expert()
    model.save_pretrained(tmp_path / "build" / "system")
    shared = tmp_path / "shared" / "system"
    shutil.copytree(tmp_path / "build" / "system", shared)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).startswith(str(shared.parent)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert DyLoRAMoE.from_pretrained(shared, backbone=tiny_llama(), tokenizer=char_tokenizer()).num_experts == 1


def test_a_save_refuses_to_replace_a_folder_that_is_not_a_saved_system(tmp_path):
    """A save swaps its folder in whole: given a folder of other files (a run or project folder), it refuses and
    deletes nothing; an empty folder or a saved system is replaced as before."""
    model = build()
    model.create_expert()
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "notes.md").write_text("notes")
    (project / "data" / "train.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match=r"project holds files but is not a saved DyLoRA-MoE system .*"
                                              r"project/system"):
        model.save_pretrained(project)
    assert (project / "notes.md").read_text() == "notes" and (project / "data" / "train.jsonl").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "empty")  # a saved system is replaced
    assert (tmp_path / "empty" / "dylora.json").is_file()
