"""Stream files: validation with clear errors, every file format, column mapping, leak-free splits."""

from __future__ import annotations

import json

import pytest

from dylora_moe.data.stream import (
    SkillSpec,
    format_record,
    load_examples,
    load_stream,
    read_records,
    split_examples,
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_stream_file_round_trip(tmp_path):
    write(tmp_path / "qa.jsonl", "\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) for i in range(20)))
    stream = load_stream(write(tmp_path / "s.yaml", """
name: mine
training: {seed_steps: 2}
skills:
  - name: qa
    source: {type: file, path: qa.jsonl}
    format: {prompt: "Q: {q}", response: "{a}", chat: false}
  - name: sql
    source: {type: builtin, name: spider}
    requires_data_dir: true
"""))
    assert stream.name == "mine" and stream.training == {"seed_steps": 2}
    assert [s.name for s in stream.active(None)] == ["qa"]
    assert len(stream.active("/data")) == 2
    examples = load_examples(stream.skills[0])
    assert examples[3].prompt == "Q: q3" and examples[3].response == "a3"


@pytest.mark.parametrize("text, match", [
    ("skills: [", "not valid YAML"),
    ("name: x", "`skills` list"),
    ("skills:\n  - source: {type: file, path: a.jsonl}", "must be a mapping with a `name`"),
    ("skills:\n  - name: a\n    source: {type: builtin, name: nope}", "unknown builtin source 'nope'"),
    ("skills:\n  - name: a\n    source: {type: ftp}", "source type 'ftp'"),
    ("skills:\n  - name: a\n    sauce: 1", r"skill #0 \(a\).*sauce"),
    ("skills: []\nextra: 1", "unknown top-level key"),
    ("skils:\n  - name: a", r"`skills` list .*unknown top-level key\(s\) skils \(a typo\?\)"),
    ("skills: []", "has no skills"),
])
def test_bad_stream_files_are_named(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_stream(write(tmp_path / "bad.yaml", text))


def test_a_stream_name_left_empty_is_the_file_name_and_one_that_is_not_text_is_refused(tmp_path):
    """``name:`` with nothing after it reads as None: the stream was named None, and every ``dylora tune`` of it
    opened a new study under a random name instead of continuing its own."""
    skills = "skills:\n  - name: a\n    source: {type: builtin, name: humaneval}\n"
    assert load_stream(write(tmp_path / "mine.yaml", "name:\n" + skills)).name == "mine"
    for value in ("2024", "[a, b]", "''"):
        with pytest.raises(ValueError, match=r"`name` must be text .* leave it out to use the file's name, 'bad'"):
            load_stream(write(tmp_path / "bad.yaml", f"name: {value}\n" + skills))


def test_missing_stream_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_stream(tmp_path / "none.yaml")


def test_a_directory_given_as_a_stream_or_data_file_is_named_as_such(tmp_path):
    """Not "not found": the path exists, it is the wrong kind of thing."""
    (tmp_path / "streams").mkdir()
    with pytest.raises(ValueError, match=r"stream file .*streams is a directory: give the stream file itself, a YAML"):
        load_stream(tmp_path / "streams")
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match=r"data file .*data is a directory: .* \.jsonl, \.json, \.csv"):
        read_records(tmp_path / "data")
    write(tmp_path / "data" / "dataset_dict.json", "{}")  # a folder saved with save_to_disk: the hf source reads it
    with pytest.raises(ValueError, match=r"read it with `source: \{type: hf, name: .*data\}`"):
        read_records(tmp_path / "data")


def test_every_file_format(tmp_path):
    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows))
    write(tmp_path / "a.json", json.dumps({"data": rows}))
    write(tmp_path / "a.csv", "prompt,response\np1,r1\np2,r2\n")
    write(tmp_path / "a.txt", "r1\n\nr2\n")
    for name in ("a.jsonl", "a.json", "a.csv"):
        assert read_records(tmp_path / name) == rows
    assert [r["response"] for r in read_records(tmp_path / "a.txt")] == ["r1", "r2"]
    with pytest.raises(ValueError, match="unsupported file type"):
        read_records(write(tmp_path / "a.xml", "<a/>"))
    with pytest.raises(ValueError, match="cannot read"):
        read_records(write(tmp_path / "b.json", "{not json"))


def test_byte_order_marks_parquet_and_nulls(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors start files with a byte-order mark; a JSON null (an Alpaca row's
    absent input) fills a template as empty text, not as "None"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    (tmp_path / "a.csv").write_text("prompt,response\np1,r1\np2,r2\n", encoding="utf-8-sig")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8-sig")
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.csv", "a.jsonl", "a.json", "a.parquet"):
        assert read_records(tmp_path / name) == rows, name
    (tmp_path / "a.txt").write_text("r1\nr2\n", encoding="utf-8-sig")
    assert [r["response"] for r in read_records(tmp_path / "a.txt")] == ["r1", "r2"]
    skill = SkillSpec("x", source={"type": "file", "path": "-"},
                      format={"prompt": "{instruction}\n{input}", "response": "{output}"})
    example = format_record(skill, {"instruction": "Add 1 and 1", "input": None, "output": "2"}, 0)
    assert example.prompt == "Add 1 and 1\n" and example.response == "2"


def test_a_jsonl_line_that_is_not_json_is_named_by_its_line_in_the_file(tmp_path):
    """``json.loads`` reads one line at a time, so its own message said "line 1" whatever the line."""
    write(tmp_path / "a.jsonl", '{"prompt": "p1", "response": "r1"}\n\n{"prompt": "p2" "response": "r2"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl: line 3 of a\.jsonl is not JSON \(Expecting ',' delimiter at "
                                         r"column 17\): give one JSON object per line"):
        read_records(tmp_path / "a.jsonl")


def test_a_csv_row_with_another_number_of_fields_is_refused_with_its_line(tmp_path):
    """An unquoted comma shifts the columns after it: the row would train on the wrong response."""
    write(tmp_path / "a.csv", 'question,answer\n"x, quoted",1\nx, unquoted,2\nno answer\nq,a\n')
    with pytest.raises(ValueError, match=r"a\.csv: line\(s\) 3, 4 have another number of fields than the header "
                                         r"\(question, answer\); quote fields"):
        read_records(tmp_path / "a.csv")
    write(tmp_path / "b.csv", 'question,answer\n"x, quoted",1\nq,\n')
    assert read_records(tmp_path / "b.csv") == [{"question": "x, quoted", "answer": "1"},
                                                {"question": "q", "answer": ""}]


def test_steps_of_one_source_with_different_eval_shares_are_refused(tmp_path):
    """The hash that holds an example out below one share would train on it at a step with a smaller share."""
    write(tmp_path / "qa.jsonl", "\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(40)))
    step = "  - {{name: {name}, source: {{type: file, path: qa.jsonl, {slice}}}, eval_share: {share}}}\n"
    first = "name: s\nskills:\n" + step.format(name="qa", slice="stop: 30", share=0.3)
    write(tmp_path / "s.yaml", first + step.format(name="qa-again", slice="start: 10", share=0.1))
    with pytest.raises(ValueError, match=r"skills 'qa' and 'qa-again' read the same source with eval_share 0\.3 and "
                                         r"0\.1, .* give them the same eval_share"):
        load_stream(tmp_path / "s.yaml")
    write(tmp_path / "s.yaml", first + step.format(name="qa-again", slice="start: 10", share=0.3))
    stream = load_stream(tmp_path / "s.yaml")
    held = {e.text for e in split_examples(load_examples(stream.skills[0]), 0.3)[1]}
    assert not held & {e.text for e in split_examples(load_examples(stream.skills[1]), 0.3)[0]}


@pytest.mark.parametrize(("source", "message"), [
    ({"type": "builtin", "name": "humaneval", "language": "js"}, "the humaneval source does not read `language`"),
    ({"type": "builtin", "name": "mbpp", "split": "test"}, "the mbpp source does not read `split`"),
    ({"type": "file", "path": "a.jsonl", "split": "test"}, "a file source does not read `split`; it reads path"),
    ({"type": "hf", "name": "x/y", "task": "t"}, "an? hf source does not read `task`"),
])
def test_a_source_field_the_source_does_not_read_is_refused(source, message):
    """`language: js` meant for humaneval-x would otherwise be dropped and the skill trained on Python."""
    with pytest.raises(ValueError, match=message):
        SkillSpec("x", source=source)
    SkillSpec("x", source={"type": "builtin", "name": "humaneval-x", "language": "js"})
    SkillSpec("x", source={"type": "builtin", "name": "verilogeval", "split": "Machine"})


def test_missing_column_names_the_columns(tmp_path):
    write(tmp_path / "a.jsonl", json.dumps({"question": "q", "answer": "a"}))
    skill = SkillSpec("x", source={"type": "file", "path": str(tmp_path / "a.jsonl")})
    with pytest.raises(ValueError, match="no column 'prompt'; its columns are: answer, question"):
        load_examples(skill)


def test_empty_source_is_an_error(tmp_path):
    write(tmp_path / "a.jsonl", "")
    with pytest.raises(ValueError, match="gave no examples"):
        load_examples(SkillSpec("x", source={"type": "file", "path": str(tmp_path / "a.jsonl")}))


def test_examples_without_a_response_are_left_out_and_all_of_them_is_an_error(tmp_path, caplog):
    rows = [{"prompt": "q1", "response": "a1"}, {"prompt": "q2", "response": "  "}, {"prompt": "q3", "response": "a3"}]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows))
    skill = SkillSpec("x", source={"type": "file", "path": str(tmp_path / "a.jsonl")})
    assert [e.prompt for e in load_examples(skill)] == ["q1", "q3"]
    assert "1 of 3 examples are left out: their response is empty" in caplog.text
    write(tmp_path / "b.jsonl", json.dumps({"prompt": "q", "response": ""}))
    with pytest.raises(ValueError, match="every example's response is empty"):
        load_examples(SkillSpec("y", source={"type": "file", "path": str(tmp_path / "b.jsonl")}))


def test_builtin_needing_data_dir_says_so():
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_examples(SkillSpec("x", source={"type": "builtin", "name": "mbpp"}))


def test_split_is_deterministic_and_never_leaks():
    examples = load_examples(SkillSpec("he", source={"type": "builtin", "name": "humaneval"}))
    train, held = split_examples(examples, 0.2)
    again_train, _ = split_examples(list(reversed(examples)), 0.2)
    assert {e.text for e in train} == {e.text for e in again_train}
    assert not {e.text for e in train} & {e.text for e in held}
    assert 0.1 < len(held) / len(examples) < 0.3
    # a later step with an overlapping slice puts every shared example on the same side
    half_train, _ = split_examples(examples[40:], 0.2)
    assert not {e.text for e in half_train} & {e.text for e in held}


def test_a_data_directory_file_without_the_published_fields_is_named(tmp_path):
    """Sanitized MBPP (``prompt``, not ``text``) saved as ``mbpp/mbpp.jsonl`` crashed with a bare KeyError."""
    (tmp_path / "mbpp").mkdir()
    write(tmp_path / "mbpp" / "mbpp.jsonl", json.dumps({"task_id": 2, "prompt": "Add.", "code": "x", "test_list": []}))
    with pytest.raises(ValueError, match=r"skill 'm': a record of the mbpp data in .* has no field 'text': its file "
                                         "is not the dataset as published"):
        load_examples(SkillSpec("m", source={"type": "builtin", "name": "mbpp"}), tmp_path)


def test_unreachable_hf_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="without hub access use a file source"):
        load_examples(SkillSpec("x", source={"type": "hf", "name": "no-such-org/no-such-dataset"}))


def test_a_shuffle_seed_makes_slices_disjoint_random_samples(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows))

    def prompts(**source):
        spec = SkillSpec("x", source={"type": "file", "path": str(tmp_path / "a.jsonl"), **source})
        return [e.prompt for e in load_examples(spec)]

    assert prompts(stop=10) == [f"p{i}" for i in range(10)]  # no seed: the file's order
    first, second = prompts(shuffle=3, stop=20), prompts(shuffle=3, start=20)
    assert first == prompts(shuffle=3, stop=20)  # the same seed, the same order
    assert not set(first) & set(second) and sorted(first + second) == sorted(r["prompt"] for r in rows)
    assert first != [f"p{i}" for i in range(20)]  # spread over the file, not its head
    assert prompts(shuffle=4, stop=20) != first
    with pytest.raises(ValueError, match="`shuffle` is a seed"):
        prompts(shuffle="yes")


@pytest.mark.parametrize("cap", [{"max_train": 0}, {"max_eval": -1}, {"max_train": 2.5}])
def test_example_caps_must_be_at_least_one(cap):
    with pytest.raises(ValueError, match="must be a whole number"):
        SkillSpec("s", {"type": "builtin", "name": "humaneval"}, **cap)


def test_stream_fields_of_the_wrong_shape_or_type_are_named():
    source = {"type": "builtin", "name": "mbpp"}
    assert SkillSpec("s", {**source, "start": "2"}).source.start == 2  # a number written as text
    for kwargs, message in (({"source": "data.jsonl"}, "`source` must be a mapping"),
                            ({"source": source, "format": "x"}, "`format` must be a mapping"),
                            ({"source": source, "format": {"prompt": 5}}, "SkillFormat.prompt must be text"),
                            ({"source": {"type": "file", "path": 123}}, "SkillSource.path must be text")):
        with pytest.raises(ValueError, match=message):
            SkillSpec("s", **kwargs)


@pytest.mark.parametrize(("template", "record", "message"), [
    ("{0}", {"q": "a"}, "cannot be filled"), ("{q.x}", {"q": "a"}, "cannot be filled"),
    ("{q}", "just text", "is not an object")])
def test_records_and_templates_that_do_not_fit_are_named(template, record, message):
    skill = SkillSpec("s", {"type": "file", "path": "x.jsonl"}, {"prompt": template, "response": "{q}"})
    with pytest.raises(ValueError, match=message):
        format_record(skill, record, 0)


def test_a_dataset_saved_with_save_to_disk_beside_the_stream_is_an_hf_source(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(20)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "s.yaml").write_text("name: s\nskills:\n"
                                     "  - {name: a, source: {type: hf, name: one}}\n"
                                     "  - {name: b, source: {type: hf, name: dict, split: train}}\n"
                                     "  - {name: c, source: {type: hf, name: dict, split: test}}\n")
    stream = load_stream(tmp_path / "s.yaml")
    for skill in stream.skills[:2]:
        assert [e.response for e in load_examples(skill)] == [r["response"] for r in rows]
    with pytest.raises(ValueError, match="has no split 'test'; its splits are: train"):
        load_examples(stream.skills[2])


@pytest.mark.parametrize(("bounds", "message"), [
    ({"start": -3}, "`start` must be >= 0"), ({"stop": -1}, "`stop` must be >= 1"),
    ({"stop": 0}, "`stop` must be >= 1"),
    ({"start": 5, "stop": 5}, "`start` 5 must be below `stop` 5"), ({"start": 8, "stop": 2}, "below `stop` 2")])
def test_a_slice_that_is_negative_or_empty_is_refused_when_the_stream_is_read(tmp_path, bounds, message):
    """A negative bound would count from the end (``start: -3`` took the last three records) and an empty slice
    left nothing to learn: both are refused with the stream file, before anything loads."""
    write(tmp_path / "a.jsonl", "\n".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(10)))
    fields = ", ".join(f"{k}: {v}" for k, v in bounds.items())
    text = f"skills:\n  - name: a\n    source: {{type: file, path: a.jsonl, {fields}}}\n"
    with pytest.raises(ValueError, match=rf"skill #0 \(a\): .*{message}"):
        load_stream(write(tmp_path / "s.yaml", text))
