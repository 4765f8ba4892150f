"""`dylora train` end to end on a tiny local model, then the registry commands and resume."""

from __future__ import annotations

import json

import pytest
import torch

from dylora_moe import DyLoRAMoE
from dylora_moe.cli import main
from dylora_moe.store import SkillStore
from tests.conftest import batch, tiny_llama, write_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_tiny_run(root)
    code = main(["train", "--stream", str(root / "stream.yaml"), "--out", str(root / "out"),
                 "--model", str(root / "model")])
    assert code == 0
    return root


def test_run_writes_report_system_store_and_events(run):
    out = run / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skills"] == ["digits", "letters", "digits-again"]
    assert summary["novel"] == [True, True, False] and summary["experts"] == 2
    # file sources have no free-form set of their own: the README's example requests are asked
    assert [(r["skill"], r["form"]) for r in summary["freeform"]] == [("examples", "chat"), ("examples", "raw")]
    assert all(0.0 <= r["degenerate"] <= 1.0 and r["samples"] for r in summary["freeform"])
    assert "## Free-form requests" in (out / "report.md").read_text()
    store = SkillStore(out / "store.db")
    assert [e.expert_id for e in store.experts()] == [0, 1]
    assert [h["version"] for h in store.history(0)] == [1, 2]  # the repeated skill added a data version
    assert store.expert(0).version == 2  # trained twice: two history entries
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events.count("expert_created") == 2 and "skill_recognised" in events
    assert {e.event for e in store.events()} >= {"expert_created", "skill_recognised"}
    loaded = DyLoRAMoE.from_pretrained(out / "system")
    assert loaded.experts.expert_ids == [0, 1]


def test_resume_of_a_finished_run_adds_nothing(run, capsys):
    out = run / "out"
    before = (out / "system" / "experts" / "expert_1" / "adapter_model.safetensors").read_bytes()
    assert main(["train", "--resume", str(out)]) == 0
    assert (out / "system" / "experts" / "expert_1" / "adapter_model.safetensors").read_bytes() == before
    assert [e.expert_id for e in SkillStore(out / "store.db").experts()] == [0, 1]
    assert "resuming after step 3" in " ".join(capsys.readouterr().out.split())


def test_a_new_run_refuses_an_occupied_folder(run, capsys):
    argv = ["train", "--stream", str(run / "stream.yaml"), "--out", str(run / "out"), "--model", str(run / "model")]
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err


def test_registry_commands(run, tmp_path, capsys):
    out = run / "out"
    assert main(["experts", "list", str(out)]) == 0
    assert main(["experts", "show", str(out), "1"]) == 0
    assert main(["skills", "list", str(out)]) == 0
    assert main(["skills", "history", str(out), "0"]) == 0
    assert main(["skills", "show", str(out), "0"]) == 0
    text = capsys.readouterr().out
    assert "letters" in text and "digits" in text
    assert main(["experts", "export", str(out), "1", str(tmp_path / "exported")]) == 0
    from peft import PeftModel

    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "exported"))
    model = DyLoRAMoE.from_pretrained(out / "system")
    with torch.no_grad(), model.single_expert(1):
        torch.testing.assert_close(plain(**batch()).logits, model.backbone(**batch()).logits)
    assert main(["experts", "show", str(out), "9"]) == 2
    assert "no expert with id 9" in capsys.readouterr().err


def exported_base(run, tmp_path, model: str) -> str:
    """``base_model_name_or_path`` of expert 1 exported from a copy of the run whose system names ``model``."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run / "out", copy)
    manifest = copy / "system" / "dylora.json"
    data = json.loads(manifest.read_text())
    data["config"]["model"] = model
    manifest.write_text(json.dumps(data))
    store = SkillStore(copy / "store.db")
    store.register_expert(1, skill_id=store.expert(1).skill_id, lora_config=store.expert(1).lora_config,
                          storage_path=str(copy / "system" / "experts" / "expert_1"), rank=store.expert(1).rank)
    assert main(["experts", "export", str(copy), "1", str(tmp_path / "exported")]) == 0
    return json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_export_names_the_backbone_as_other_machines_load_it(run, tmp_path):
    saved = json.loads((run / "out" / "system" / "experts" / "expert_1" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(run / "model")  # what peft recorded: the folder it loaded
    assert exported_base(run, tmp_path / "a", "default") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert exported_base(run, tmp_path / "b", "SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert exported_base(run, tmp_path / "c", "org/some-model") == "org/some-model"


def test_a_failed_export_leaves_no_partial_folder(run, tmp_path, monkeypatch, capsys):
    import shutil

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", full_disk)
    assert main(["experts", "export", str(run / "out"), "1", str(tmp_path / "exported")]) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary copy


def test_delete_expert_keeps_the_rest(run, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(run / "out", copy)
    assert main(["experts", "delete", str(copy), "1"]) == 0
    assert [e.expert_id for e in SkillStore(copy / "store.db").experts()] == [0]
    assert DyLoRAMoE.from_pretrained(copy / "system").experts.expert_ids == [0]
    assert DyLoRAMoE.from_pretrained(run / "out" / "system").experts.expert_ids == [0, 1]


def test_resume_registers_a_checkpointed_step_the_store_missed(run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    store = SkillStore(out / "store.db")
    rows = len(store.skill_data(1))
    store.delete_expert(1)  # as if killed between step 1's checkpoint and its store write
    assert main(["train", "--resume", str(out)]) == 0
    assert "registered step 1 (letters)" in " ".join(capsys.readouterr().out.split())
    assert [e.expert_id for e in store.experts()] == [0, 1]
    assert [h["step"] for h in store.expert(1).training_history] == [1]
    assert len(store.skill_data(1)) == rows  # the data was already stored: no duplicate rows


def test_experts_merge_and_prune_rewrite_system_memory_and_registry(run, tmp_path, capsys):
    import shutil

    from dylora_moe.training.progress import MEMORY, PROGRESS

    merged_run, pruned_run = tmp_path / "merged", tmp_path / "pruned"
    shutil.copytree(run / "out", merged_run)
    shutil.copytree(run / "out", pruned_run)
    assert main(["experts", "merge", str(merged_run), "0", "1"]) == 0
    model = DyLoRAMoE.from_pretrained(merged_run / "system")
    assert model.experts.expert_ids == [2] and model.experts.ranks[2] == 2 * model.config.expert.rank
    assert {s.expert_id for s in model.library.skills.values()} == {2}
    assert (merged_run / "system" / MEMORY).is_file() and (merged_run / "system" / PROGRESS).is_file()
    store = SkillStore(merged_run / "store.db")
    assert [e.expert_id for e in store.experts()] == [2]
    assert store.expert(2).training_history == [{"merged_from": [0, 1], "method": "cat"}]
    assert "merged experts 0 and 1 into expert 2" in " ".join(capsys.readouterr().out.split())

    assert main(["experts", "prune", str(pruned_run), "--below", "1"]) == 0  # all but the most used go
    model = DyLoRAMoE.from_pretrained(pruned_run / "system")
    assert model.num_experts == 1 and len(model.library.skills) == 2  # both skills kept, one expert serves them
    assert [e.expert_id for e in SkillStore(pruned_run / "store.db").experts()] == model.experts.expert_ids
    assert main(["experts", "merge", str(pruned_run), "0", "7"]) == 2  # an unknown expert: a message, no change
    assert "no expert with id 7" in capsys.readouterr().err
    # the runs stay resumable: steps whose expert was merged away or pruned are not registered again
    for folder in (merged_run, pruned_run):
        assert main(["train", "--resume", str(folder)]) == 0, capsys.readouterr().err
        assert [e.expert_id for e in SkillStore(folder / "store.db").experts()] == \
            DyLoRAMoE.from_pretrained(folder / "system").experts.expert_ids


def test_experts_merge_and_prune_refit_the_gate_as_the_run_does(run, tmp_path, monkeypatch):
    """The gate refit after a merge or prune takes the run's own fit settings (its stream.yaml's training
    section), not the defaults."""
    import shutil

    import yaml

    from dylora_moe.experts import pool

    fits = []
    real = pool.fit_gate
    monkeypatch.setattr(pool, "fit_gate", lambda *a, **kw: fits.append(kw) or real(*a, **kw))
    for action in (["merge", "0", "1"], ["prune", "--below", "1"]):
        out = tmp_path / action[0]
        shutil.copytree(run / "out", out)
        stream = yaml.safe_load((out / "stream.yaml").read_text())
        stream["training"] = {**stream.get("training", {}), "router_fit_steps": 7, "router_weight_decay": 0.3}
        (out / "stream.yaml").write_text(yaml.safe_dump(stream))
        assert main(["experts", action[0], str(out), *action[1:]]) == 0
        assert fits[-1] == {"steps": 7, "weight_decay": 0.3}


@pytest.mark.parametrize("below", ["nan", "-1", "2", "half"])
def test_experts_prune_refuses_a_share_outside_0_1_before_loading_anything(run, tmp_path, capsys, below):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())
    with pytest.raises(SystemExit) as exit_:
        main(["experts", "prune", str(out), "--below", below])
    assert exit_.value.code == 2
    assert "routing share in [0, 1]" in " ".join(capsys.readouterr().err.split())
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()) == before


def test_experts_prune_on_an_empty_routing_memory_keeps_every_expert_and_skill(run, tmp_path, capsys):
    """A system whose routing memory holds no stored prompt (a server that took no upload yet): no traffic is
    known, so nothing is pruned, rather than every expert but one going with its skills."""
    import shutil

    from safetensors.torch import save_file

    from dylora_moe.training.progress import MEMORY

    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    save_file({}, str(out / "system" / MEMORY))
    assert main(["experts", "prune", str(out), "--below", "0.5"]) == 0
    assert "no expert's traffic is known" in " ".join(capsys.readouterr().out.split())
    model = DyLoRAMoE.from_pretrained(out / "system")
    assert model.experts.expert_ids == [0, 1] and len(model.library.skills) == 2
    assert [e.expert_id for e in SkillStore(out / "store.db").experts()] == [0, 1]


def test_experts_merge_with_a_pruning_method_takes_the_density(run, tmp_path, capsys):
    import shutil

    merged_run = tmp_path / "merged"
    shutil.copytree(run / "out", merged_run)
    assert main(["experts", "merge", str(merged_run), "0", "1", "--method", "ties_svd"]) == 2
    assert "density" in capsys.readouterr().err
    assert DyLoRAMoE.from_pretrained(merged_run / "system").experts.expert_ids == [0, 1]  # unchanged
    assert main(["experts", "merge", str(merged_run), "0", "1", "--method", "ties_svd", "--density", "0.5"]) == 0
    model = DyLoRAMoE.from_pretrained(merged_run / "system")
    assert model.experts.expert_ids == [2] and model.experts.ranks[2] == model.config.expert.rank
    assert SkillStore(merged_run / "store.db").expert(2).training_history == [
        {"merged_from": [0, 1], "method": "ties_svd"}]


def test_a_bad_freeform_length_is_refused_before_anything_is_written(run, tmp_path, capsys):
    out = tmp_path / "new"
    argv = ["train", "--stream", str(run / "stream.yaml"), "--out", str(out), "--model", str(run / "model"),
            "--freeform-tokens", "0"]
    assert main(argv) == 2
    assert "--freeform-tokens" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(("section", "message"), [
    ("training: {seed_lr: fast}", "TrainingConfig.seed_lr must be a number"),
    ("training: {seed_lrr: 0.1}", "unknown TrainingConfig field(s): seed_lrr"),
    ("system: {expert: {rank: eight}}", "ExpertConfig.rank must be a number"),
    ("system: {device: gpu}", "device='gpu' is not a device"),
])
def test_a_bad_config_value_fails_before_the_run_folder_is_written(run, tmp_path, capsys, section, message):
    stream = (run / "stream.yaml").read_text() + "\n" + section + "\n"
    (tmp_path / "bad.yaml").write_text(stream)
    out = tmp_path / "out"
    assert main(["train", "--stream", str(tmp_path / "bad.yaml"), "--out", str(out),
                 "--model", str(run / "model")]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (out / "run.json").exists()  # nothing to resume from: fixing the file and rerunning works


@pytest.mark.parametrize(("change", "message"), [
    (("letters.jsonl", "lettres.jsonl"), "lettres.jsonl not found"),
    (("type: file, path: letters.jsonl", "type: builtin, name: spider"), "source spider reads a data directory"),
    (("format: {chat: false}}\n  - {name: digits-again", "format: {prompt: '{question}'}}\n  - {name: digits-again"),
     "no column 'question'"),
])
def test_a_skill_whose_data_cannot_be_read_fails_before_the_run_folder_is_written(tmp_path, capsys, change, message):
    """A typo in a later step's source must not leave a run folder behind: a rerun of the fixed stream with the
    same --out would be refused, and --resume would read the saved stream with the typo."""
    stream = write_tiny_run(tmp_path)
    text = stream.read_text()
    assert change[0] in text
    (tmp_path / "bad.yaml").write_text(text.replace(change[0], change[1], 1))
    out = tmp_path / "out"
    assert main(["train", "--stream", str(tmp_path / "bad.yaml"), "--out", str(out),
                 "--model", str(tmp_path / "model")]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def test_a_number_written_as_text_is_read_as_the_number(run, tmp_path):
    """PyYAML reads 2e-3 (no dot) as a string; the config converts it rather than failing in the optimizer."""
    (run / "text-number.yaml").write_text((run / "stream.yaml").read_text() + "\ntraining: {seed_lr: 2e-3}\n")
    assert main(["train", "--stream", str(run / "text-number.yaml"), "--out", str(tmp_path / "out"),
                 "--model", str(run / "model"), "--dry-run"]) == 0


def test_resume_takes_a_moved_data_dir_and_refuses_other_options(run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    assert main(["train", "--resume", str(out), "--seed-steps", "3"]) == 2
    assert "drop seed_steps" in capsys.readouterr().err
    moved = tmp_path / "data"  # where the data is now (here: a folder without the free-form sets' files)
    moved.mkdir()
    assert main(["train", "--resume", str(out), "--data-dir", str(moved)]) == 2
    assert str(moved / "codealpaca") in " ".join(capsys.readouterr().err.split())  # read from the folder given
    assert json.loads((out / "run.json").read_text())["data_dir"] == str(moved)  # and the next resume keeps it


def test_a_run_named_by_relative_paths_works_from_another_folder_and_after_a_move(tmp_path, monkeypatch, capsys):
    import shutil

    write_tiny_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--stream", "stream.yaml", "--out", "out", "--model", "model"]) == 0
    manifest = json.loads((tmp_path / "out" / "system" / "dylora.json").read_text())
    assert manifest["config"]["model"] == str(tmp_path / "model")  # the backbone, found from any folder
    shutil.move(tmp_path / "out", tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["experts", "list", str(tmp_path / "moved")]) == 0
    assert "missing" not in capsys.readouterr().out
    assert main(["experts", "export", str(tmp_path / "moved"), "1", "exported"]) == 0
    assert (elsewhere / "exported" / "adapter_model.safetensors").is_file()
    assert main(["experts", "merge", str(tmp_path / "moved"), "0", "1"]) == 0


def test_a_full_pool_during_train_is_mirrored_in_the_registry_with_its_lineage(tmp_path):
    """``system.max_experts: 2`` on three new skills: the merge the loop makes reaches the store (the merged
    expert with ``merged_from``, the sources gone), and ``experts export`` finds the merged expert."""
    stream = write_tiny_run(tmp_path)
    bounded = "novelty: {method: cosine, similarity_threshold: 1.0}\n  max_experts: 2"
    stream.write_text(stream.read_text().replace("novelty: {similarity_threshold: 0.9}", bounded))
    assert main(["train", "--stream", str(stream), "--out", str(tmp_path / "out"), "--model",
                 str(tmp_path / "model")]) == 0
    system = DyLoRAMoE.from_pretrained(tmp_path / "out" / "system")
    assert system.experts.expert_ids == [2, 3] and system.experts.lineage == {3: {"merged_from": [0, 1],
                                                                                 "method": "cat"}}
    store = SkillStore(tmp_path / "out" / "store.db")
    assert [e.expert_id for e in store.experts()] == [2, 3]
    assert store.expert(3).training_history == [{"merged_from": [0, 1], "method": "cat"}]
    assert main(["experts", "export", str(tmp_path / "out"), "3", str(tmp_path / "exported")]) == 0


def test_a_merge_on_a_paused_run_is_followed_by_resume_and_its_lineage_survives_a_crash(run, tmp_path, monkeypatch,
                                                                                         capsys):
    """A run stopped after two steps, its experts merged from the command line, then resumed: the progress
    learns where the skills went (the report routes them to the merged expert), and a crash between the
    merge's save and its registry write loses no lineage (the manifest keeps it, ``reconcile`` reads it)."""
    import shutil

    from dylora_moe.training.progress import PROGRESS

    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    progress = json.loads((out / "system" / PROGRESS).read_text())
    progress.update(completed=2, records=progress["records"][:2])  # as if stopped before the third step
    (out / "system" / PROGRESS).write_text(json.dumps(progress))
    monkeypatch.setattr(SkillStore, "register_expert", lambda *a, **kw: (_ for _ in ()).throw(OSError("disk")))
    assert main(["experts", "merge", str(out), "0", "1"]) != 0  # saved, then killed before the registry
    monkeypatch.undo()
    assert json.loads((out / "system" / PROGRESS).read_text())["merges"] == {"0": 2, "1": 2}
    assert main(["train", "--resume", str(out)]) == 0, capsys.readouterr().err
    assert SkillStore(out / "store.db").expert(2).training_history[0] == {
        "source": "reconciled", "merged_from": [0, 1], "method": "cat"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expert_of_skill"] == [2, 2, 2] and summary["routing_accuracy"] == 1.0


def test_a_registry_left_behind_by_a_killed_merge_is_caught_up_by_the_next_registry_write(run, tmp_path,
                                                                                          monkeypatch, capsys):
    """Killed between the merge's save and its registry write: the registry still lists the merged-away experts
    and lacks the merged one. The next `experts` write (here a prune that prunes nothing, then a delete of the
    merged expert, which the registry did not know) first brings it in line with the folder, lineage included."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    monkeypatch.setattr(SkillStore, "register_expert", lambda *a, **kw: (_ for _ in ()).throw(OSError("disk")))
    assert main(["experts", "merge", str(out), "0", "1"]) != 0
    monkeypatch.undo()
    assert [e.expert_id for e in SkillStore(out / "store.db").experts()] == [0, 1]  # a write behind
    err = " ".join(capsys.readouterr().err.split())  # the merge is done: the message must not invite a rerun
    assert "merged experts 0 and 1 into expert 2 (cat), saved in" in err and "do not run the command again" in err
    assert "saved state is left as it was" not in err
    assert main(["experts", "prune", str(out), "--below", "0"]) == 0
    store = SkillStore(out / "store.db")
    assert [e.expert_id for e in store.experts()] == [2]
    assert store.expert(2).training_history[0] == {"source": "reconciled", "merged_from": [0, 1], "method": "cat"}
    assert "registry: registered expert 2" in " ".join(capsys.readouterr().out.split())
    assert main(["experts", "delete", str(out), "7"]) == 2 and "no expert with id 7" in capsys.readouterr().err


def test_a_resume_refused_by_a_live_writer_changes_nothing_in_its_folder(run, tmp_path, capsys):
    """The data folder a resume names is recorded in run.json only once it holds the writer lock: a second
    writer, refused, leaves the live run's options as they were (and a new run into a locked folder leaves no
    run.json)."""
    import shutil
    import subprocess
    import sys

    out, fresh = tmp_path / "out", tmp_path / "fresh"
    shutil.copytree(run / "out", out)
    before = (out / "run.json").read_text()
    hold = ("import sys, time\nfrom dylora_moe.checkpoint import writer_lock\n"
            "with writer_lock(sys.argv[1], who='another writer'), writer_lock(sys.argv[2], who='another writer'):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / "system"), str(fresh / "system")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", "--resume", str(out), "--data-dir", str(tmp_path / "elsewhere")]) != 0
        assert "another writer" in capsys.readouterr().err
        assert main(["train", "--stream", str(run / "stream.yaml"), "--out", str(fresh), "--model",
                     str(run / "model")]) != 0
    finally:
        holder.kill()
        holder.wait()
    assert (out / "run.json").read_text() == before and not (fresh / "run.json").exists()


@pytest.mark.parametrize("option", ["--stream", "--out"])
def test_resume_refuses_another_stream_or_folder_rather_than_ignoring_it(run, tmp_path, capsys, option):
    """`--resume DIR --stream other.yaml` (or `--out other`) would continue DIR's own stream into DIR: refused,
    with nothing in either folder changed."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    other = tmp_path / "other.yaml"
    other.write_text((run / "stream.yaml").read_text().replace("name: tiny", "name: other"))
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())
    value = other if option == "--stream" else tmp_path / "elsewhere"
    assert main(["train", "--resume", str(out), option, str(value)]) == 2
    assert f"drop {option}" in " ".join(capsys.readouterr().err.split())
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()) == before
    assert not (tmp_path / "elsewhere").exists()
    assert main(["train", "--resume", str(out), "--out", str(out)]) == 0  # naming the run's own folder is fine


@pytest.mark.parametrize("under", ["file/exported", "file/a/exported"])
def test_export_under_a_file_names_the_path_not_the_disk(run, tmp_path, capsys, under):
    (tmp_path / "file").write_text("notes")
    assert main(["experts", "export", str(run / "out"), "1", str(tmp_path / under)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "a part of its path is a file" in err and "free space" not in err
    assert (tmp_path / "file").read_text() == "notes"
