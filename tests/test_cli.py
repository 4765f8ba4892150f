"""The ``dylora`` entry point: argument errors and clear failures."""

from __future__ import annotations

import json

import pytest

from dylora_moe.cli import main


def test_unknown_model_exits_2_with_a_message(tmp_path, capsys, caplog):
    (tmp_path / "s.yaml").write_text("skills:\n  - name: he\n    source: {type: builtin, name: humaneval}\n")
    argv = ["train", "--stream", str(tmp_path / "s.yaml"), "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "cannot load model" in capsys.readouterr().err
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "error" and "cannot load model" in events[-1]["error"]
    # the file has the event; the console has the message once, not again as the event's JSON log line
    assert not [r for r in caplog.records if r.name == "dylora_moe.events"]


def test_a_command_is_required():
    with pytest.raises(SystemExit):
        main([])


def test_train_dry_run_validates_a_stream(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"})
                                                for i in range(30)))
    (tmp_path / "s.yaml").write_text("skills:\n  - name: a\n    source: {type: file, path: a.jsonl}\n")
    assert main(["train", "--stream", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    (tmp_path / "bad.yaml").write_text("skills:\n  - name: a\n    source: {type: file, path: missing.jsonl}\n")
    assert main(["train", "--stream", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "missing.jsonl not found" in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded_leaves_no_run_to_resume(tmp_path, capsys):
    """The fix for an unknown --model is the same command with another one: the folder must not hold a run (whose
    --resume would keep the bad model and whose new run would be refused)."""
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"})
                                                for i in range(30)))
    (tmp_path / "s.yaml").write_text("skills:\n  - name: a\n    source: {type: file, path: a.jsonl}\n")
    argv = ["train", "--stream", str(tmp_path / "s.yaml"), "--model", str(tmp_path / "missing"),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert not (tmp_path / "out" / "run.json").exists()
    assert main(argv) == 2  # the same mistake again: named again, not "already holds a run"
    assert "cannot load model" in capsys.readouterr().err


def test_a_negative_freeform_limit_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"})
                                                for i in range(30)))
    (tmp_path / "s.yaml").write_text("skills:\n  - name: a\n    source: {type: file, path: a.jsonl}\n")
    argv = ["train", "--stream", str(tmp_path / "s.yaml"), "--model", str(tmp_path / "missing"),
            "--out", str(tmp_path / "out"), "--freeform-limit", "-1"]
    assert main(argv) == 2
    assert "--freeform-limit must be >= 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["{", "[]"])
def test_resume_names_a_corrupt_run_json(tmp_path, capsys, text):
    (tmp_path / "run.json").write_text(text)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path / 'run.json'} is corrupt" in err and "restore it from a copy" in err
    assert (tmp_path / "run.json").read_text() == text


def test_an_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"})
                                                for i in range(30)))
    (tmp_path / "s.yaml").write_text("skills:\n  - name: a\n    source: {type: file, path: a.jsonl}\n")
    for out in (tmp_path / "a.jsonl", tmp_path / "a.jsonl" / "run"):
        argv = ["train", "--stream", str(tmp_path / "s.yaml"), "--model", str(tmp_path / "missing"),
                "--out", str(out)]
        assert main(argv) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--out {out} is a file or under one: give a folder" in err and "free space" not in err


def test_a_bad_value_is_named_with_the_file_or_option_it_came_from(tmp_path, capsys):
    """--params overrides the stream, and --seed-steps both: the message names the source of the refused value."""
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"})
                                                for i in range(30)))
    (tmp_path / "s.yaml").write_text("skills:\n  - name: a\n    source: {type: file, path: a.jsonl}\n"
                                     "training: {seed_steps: lots}\n")
    (tmp_path / "best.yaml").write_text("params: {training.seed_lr: fast, training.seed_steps: 3}\n")
    argv = ["train", "--stream", str(tmp_path / "s.yaml"), "--model", str(tmp_path / "missing"),
            "--out", str(tmp_path / "out")]
    for extra, source, message in (
            (["--params", str(tmp_path / "best.yaml")], tmp_path / "best.yaml",
             "TrainingConfig.seed_lr must be a number, got 'fast'"),
            ([], tmp_path / "s.yaml", "TrainingConfig.seed_steps must be a number, got 'lots'"),
            (["--seed-steps", "-1"], "--seed-steps -1", "seed_steps and consolidation_steps must be >= 0")):
        assert main([*argv, *extra]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert str(source) in err and message in err, err
        assert "fix the value in this" in err or "leave the option out" in err, err  # and the way out
        assert not (tmp_path / "out" / "run.json").exists()


def test_a_skill_too_small_to_split_is_named_with_the_fix(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}))
    (tmp_path / "s.yaml").write_text("skills:\n  - name: tiny-skill\n    source: {type: file, path: a.jsonl}\n")
    for extra in (["--dry-run"], ["--model", str(tmp_path / "missing")]):
        assert main(["train", "--stream", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"), *extra]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "skill 'tiny-skill': 1 examples are too few to split" in err and "give the skill more examples" in err


def test_an_unknown_id_is_named_without_quotes(tmp_path, capsys):
    from dylora_moe.store import SkillStore

    SkillStore(tmp_path / "store.db")
    assert main(["experts", "show", str(tmp_path), "9"]) == 2
    assert capsys.readouterr().err.startswith("error: no expert with id 9 in ")
    assert main(["skills", "history", str(tmp_path), "4"]) == 2
    assert capsys.readouterr().err.startswith("error: no skill with id 4 in ")


def test_a_library_deprecation_stays_off_the_console(recwarn):
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` whenever a system is loaded: two lines
    of FutureWarning before every `experts`, `serve` or `--resume` output (and before its error message)."""
    from peft import LoraConfig, get_peft_model

    from dylora_moe.cli import quiet_libraries
    from tests.conftest import tiny_llama

    quiet_libraries()
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]
