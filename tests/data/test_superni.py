"""The SuperNI source on a tiny folder in the shared data's layout (never the shared data itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dylora_moe.data.stream import SkillSource, SkillSpec, load_examples, load_stream, split_examples
from dylora_moe.data.superni import cut_input, superni, superni_orders, superni_prompt, superni_tasks
from tests.conftest import write_superni


def test_prompt_is_the_definition_then_the_input_and_the_response_the_first_output(tmp_path):
    rows = superni(write_superni(tmp_path), "task002_shout")
    assert rows[0].prompt == "Definition: Repeat the word in capitals.\n\nInput: wa\nOutput:"
    assert rows[0].response == "WA!" and rows[0].meta["references"] == ["WA!", "?"]
    assert [r.meta["split"] for r in rows] == ["train"] * 12 + ["test"] * 6


def test_the_published_split_is_kept(tmp_path):
    train, test = split_examples(superni(write_superni(tmp_path), "task001_double"), eval_share=0.2)
    assert [e.meta["id"] for e in test] == [f"task001_double-{i}" for i in range(12, 18)]
    assert len(train) == 12 and all(e.meta["split"] == "train" for e in train)


def test_long_inputs_are_cut_at_their_end():
    prompt = superni_prompt("Summarise.", "word " * 100, max_input_chars=20)
    assert prompt == "Definition: Summarise.\n\nInput: word word word word ...\nOutput:"


def test_the_ends_cut_keeps_the_first_three_quarters_and_the_last_quarter():
    text = "".join(f"{i:02d}" for i in range(50))  # 100 characters
    assert cut_input(text, 40, "ends") == text[:30] + " ... " + text[-10:]
    assert cut_input(text, 40, "head") == text[:40] + " ..."
    assert cut_input(text, 100, "ends") == text  # within the budget: untouched
    passage = "A long passage. " * 100 + "\nQuestion: Who?"
    assert cut_input(passage, 1200, "ends").endswith("Question: Who?")
    assert "Question" not in cut_input(passage, 1200, "head")
    with pytest.raises(ValueError, match="head, ends"):
        cut_input(text, 40, "middle")


def test_a_stream_step_chooses_the_cut(tmp_path):
    import gzip
    import json

    folder = tmp_path / "superni-cl"
    folder.mkdir()
    passage = "A long passage. " * 100 + "\nQuestion: Who?"
    data = {"task": "task9_qa", "definition": "Answer.", "train": [{"id": "a", "input": passage, "output": ["Bo"]}],
            "test": []}
    with gzip.open(folder / "task9_qa.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(data, fh)
    step = "skills:\n  - name: qa\n    source: {type: builtin, name: superni, task: task9_qa%s}\n"
    (tmp_path / "ends.yaml").write_text(step % ", cut: ends")
    (tmp_path / "head.yaml").write_text(step % "")
    [ends] = load_examples(load_stream(tmp_path / "ends.yaml").skills[0], tmp_path)
    [head] = load_examples(load_stream(tmp_path / "head.yaml").skills[0], tmp_path)
    assert "Question: Who?\nOutput:" in ends.prompt and "Question" not in head.prompt
    with pytest.raises(ValueError, match="`cut` is 'tail'"):
        SkillSource(type="builtin", name="superni", task="task9_qa", cut="tail")
    with pytest.raises(ValueError, match="does not read `cut`"):
        SkillSource(type="builtin", name="mbpp", cut="ends")


def test_unknown_task_names_the_tasks_there(tmp_path):
    with pytest.raises(ValueError, match="task001_double, task002_shout"):
        superni(write_superni(tmp_path), "task999_missing")
    assert superni_tasks(tmp_path) == ["task001_double", "task002_shout"]
    assert superni_orders(tmp_path)["order2"] == ["task002_shout", "task001_double"]


def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data-dir"):
        superni(tmp_path, "task001_double")
    with pytest.raises(FileNotFoundError, match=r"orders\.json"):
        superni_orders(tmp_path)


def test_a_stream_step_names_its_task(tmp_path):
    write_superni(tmp_path)
    (tmp_path / "s.yaml").write_text("skills:\n  - name: shout\n    source: {type: builtin, name: superni, "
                                     "task: task002_shout}\n    requires_data_dir: true\n")
    skill = load_stream(tmp_path / "s.yaml").skills[0]
    examples = load_examples(skill, tmp_path)
    assert len(examples) == 18 and examples[0].response == "WA!"
    with pytest.raises(FileNotFoundError, match=r"--data-dir"):
        load_examples(skill, None)
    with pytest.raises(ValueError, match=r"needs `task`"):
        SkillSource(type="builtin", name="superni")


SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "streams"


@pytest.mark.parametrize("order", ["order1", "order2", "order1-ends", "order2-ends"])
def test_the_stream_files_follow_the_published_orders(order):
    skills = load_stream(CONFIGS / f"superni-{order}.yaml").skills
    assert {s.source.cut for s in skills} == ({"ends"} if order.endswith("ends") else {None})
    order = order.removesuffix("-ends")
    tasks = [s.source.task for s in skills]
    assert len(tasks) == len(set(tasks)) == 15
    if not (SHARED / "superni-cl" / "orders.json").is_file():
        pytest.skip("no ../shared/data/superni-cl: the published orders are not here to compare with")
    assert tasks == superni_orders(SHARED)[order]


@pytest.mark.parametrize(("data", "problem"), [
    ({"task": "task9_x", "definition": "D.", "train": [{"id": "a", "input": "i", "output": ["o"]}]},
     r"task9_x\.json\.gz has no test: a task file holds \{task, definition, train: \[\{id, input, output\}\], "
     r"test: \[\.\.\.\]\} \(an empty list for a split with no instance\); put the published file there"),
    ({"task": "task9_x", "definition": "D.", "train": [{"id": "a", "input": "i", "output": []}], "test": []},
     r"task9_x\.json\.gz: train instance 'a' has an empty `output`: give it a reference output or remove"),
])
def test_a_task_file_without_a_split_or_an_output_is_named(tmp_path, data, problem):
    """A task file without ``test`` raised a bare KeyError, an instance with ``output: []`` an IndexError."""
    import gzip
    import json

    (tmp_path / "superni-cl").mkdir()
    with gzip.open(tmp_path / "superni-cl" / "task9_x.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(data, fh)
    with pytest.raises(ValueError, match=problem):
        superni(tmp_path, "task9_x")
    with pytest.raises(ValueError, match=problem):  # as a stream step reads it
        load_examples(SkillSpec("x", source={"type": "builtin", "name": "superni", "task": "task9_x"}), tmp_path)


def test_a_slice_inside_the_train_part_names_the_caps_to_use_instead(tmp_path):
    """``stop`` within the 12 training instances leaves no test side; the error said so but not the way out."""
    skill = SkillSpec("s", source={"type": "builtin", "name": "superni", "task": "task001_double", "stop": 5})
    examples = load_examples(skill, write_superni(tmp_path))
    with pytest.raises(ValueError, match=r"the published split of 5 examples leaves no test side: .* leave the slice "
                                         r"out and cap the step with `max_train`/`max_eval`"):
        split_examples(examples, skill.eval_share)
    capped = SkillSpec("s", source={"type": "builtin", "name": "superni", "task": "task001_double"},
                       max_train=5, max_eval=2)
    train, held = split_examples(load_examples(capped, tmp_path), capped.eval_share)
    assert len(train[: capped.max_train]) == 5 and len(held[: capped.max_eval]) == 2
