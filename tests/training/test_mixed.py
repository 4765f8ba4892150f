"""Mixed streams on a tiny model: chunks of unlabelled examples of synthetic skills (distinct token
distributions) are sorted into skills, a new skill growing inside familiar data gets an expert, and nothing
else does."""

from __future__ import annotations

import json
import random

import pytest

from dylora_moe.cli import main
from dylora_moe.data.sources import Example
from dylora_moe.data.stream import ChunkSpec, StreamSpec, check_pools, load_stream
from dylora_moe.evaluation.mixed import summarise_mixed
from dylora_moe.novelty import content_key
from dylora_moe.novelty.sorting import SkillSorter
from dylora_moe.training.mixed import MixedLearner
from tests.conftest import build, char_tokenizer, tiny_llama


def word(i: int, alphabet: str, n: int) -> str:
    return "".join(alphabet[(i // len(alphabet) ** k) % len(alphabet)] for k in range(n))


# three skills with disjoint response alphabets; every example is distinct and a skill's examples are iid
def number(i: int) -> int:
    return (i * 7919) % 1000


SKILLS = {
    "digits": lambda i: {"prompt": f"{number(i)}+{number(i)}=", "response": str(2 * number(i))},
    "letters": lambda i: {"prompt": f"UP {word(i, 'abcdefghijklmnopqrstuvwxyz', 3)}:",
                          "response": word(i, "abcdefghijklmnopqrstuvwxyz", 3).upper() + "!!"},
    "symbols": lambda i: {"prompt": f"sym {i}?", "response": word(i, "#$%&*@", 4) + "~"},
}


def examples(skill: str, start: int, n: int) -> list[tuple[str, Example]]:
    return [(skill, Example(**SKILLS[skill](i))) for i in range(start, start + n)]


def sort_stream(chunks: list[dict[str, int]], *, min_group: int = 8, seed: int = 0):
    """Sort chunks (skill -> examples) with a tiny model's embeddings and its real novelty decision; returns
    the model, the sorter and, per chunk, expert -> true skill -> count."""
    model = build()
    model.config.novelty.min_group = min_group
    sorter = SkillSorter(model.library, model.config.novelty, model.add_skill_sample)
    used = dict.fromkeys(SKILLS, 0)
    tables = []
    for i, mix in enumerate(chunks):
        items = []
        for skill, n in mix.items():
            items += examples(skill, used[skill], n)
            used[skill] += n
        random.Random(seed + i).shuffle(items)
        sample = model.embed_sample([e for _, e in items], limit=len(items))
        result = sorter.sort(i, items, sample, [content_key(e.text) for _, e in items])
        table = {}
        for skill_id, assigned in result.assigned.items():
            expert = model.library.skills[skill_id].expert_id
            for skill, _ in assigned:
                table.setdefault(expert, {}).setdefault(skill, 0)
                table[expert][skill] += 1
        tables.append(table)
    return model, sorter, tables


def test_a_new_skill_arriving_as_a_20_percent_minority_gets_its_own_expert():
    model, _, tables = sort_stream([{"digits": 60}, {"digits": 48, "letters": 12}, {"digits": 48, "letters": 12}])
    assert model.num_experts == 2
    letters = {e: row.get("letters", 0) for t in tables for e, row in t.items() if row.get("letters")}
    new_expert = max(letters, key=letters.get)
    assert new_expert == 1
    total = sum(letters.values())
    assert letters[new_expert] / total >= 0.8  # most letters went to their own expert
    digits_in_new = sum(t.get(1, {}).get("digits", 0) for t in tables)
    assert digits_in_new <= 3  # and it holds (almost) no digits


def test_a_skill_that_stays_below_the_minimum_group_size_creates_no_expert():
    model, _, tables = sort_stream([{"digits": 60}, {"digits": 57, "letters": 3}, {"digits": 57, "letters": 3},
                                    {"digits": 58, "letters": 2}], min_group=12)
    assert model.num_experts == 1 and len(model.library) == 1
    assert all(set(t) == {0} for t in tables)


def test_iid_chunks_of_one_skill_never_create_a_second_expert():
    model, sorter, tables = sort_stream([{"digits": 60}] * 5)
    assert model.num_experts == 1
    assert sum(t.get(0, {}).get("digits", 0) for t in tables) + len(sorter.buffer) == 300


def test_sorting_does_not_depend_on_the_order_within_a_chunk():
    chunks = [{"digits": 40}, {"digits": 30, "letters": 15}]
    _, _, a = sort_stream(chunks, seed=0)
    _, _, b = sort_stream(chunks, seed=7)
    assert a == b


def test_chunk_counts_follow_the_shares_and_bad_mixes_are_named():
    assert ChunkSpec(10, {"a": 0.7, "b": 0.3}).counts() == {"a": 7, "b": 3}
    assert sum(ChunkSpec(7, {"a": 1, "b": 1, "c": 1}).counts().values()) == 7
    with pytest.raises(ValueError, match="unknown skill"):
        StreamSpec("s", [{"name": "a", "source": {"type": "file", "path": "x"}}], chunks=[{"size": 4, "mix": {"b": 1}}])
    with pytest.raises(ValueError, match="positive shares"):
        ChunkSpec(4, {"a": 0})


def test_chunk_sizes_and_shares_of_the_wrong_type_are_named():
    """A size of 64.0 (a YAML float) is 64 examples; 64.5, true, text, NaN or infinite shares, a share of true and
    a mix that is a list are refused as the chunk's fields, not as a slice or NaN conversion error later."""
    assert ChunkSpec(64.0, {"a": 1}).counts() == {"a": 64}
    for size in (64.5, True, "x"):
        with pytest.raises(ValueError, match=r"ChunkSpec\.size"):
            ChunkSpec(size, {"a": 1})
    for mix in ({"a": float("nan")}, {"a": float("inf"), "b": 1}, {"a": True}, ["a", "b"]):
        with pytest.raises(ValueError, match="positive shares"):
            ChunkSpec(4, mix)


def test_chunks_drawing_from_a_skill_that_needs_a_data_directory_name_it_and_the_fix(tmp_path):
    """Without --data-dir a skill with requires_data_dir does not run; chunks that draw from it are refused with the
    skill's name, not a bare StopIteration or a pool said to be too small."""
    (tmp_path / "digits.jsonl").write_text("\n".join(json.dumps(SKILLS["digits"](i)) for i in range(40)))
    digits = {"name": "digits", "source": {"type": "file", "path": str(tmp_path / "digits.jsonl")},
              "format": {"chat": False}}
    sql = {"name": "sql", "source": {"type": "builtin", "name": "spider"}, "requires_data_dir": True}
    stream = StreamSpec("s", [digits, sql], chunks=[{"size": 8, "mix": {"digits": 1, "sql": 1}}])
    with pytest.raises(ValueError, match=r"'sql', which do not run.*--data-dir"):
        check_pools(stream.chunks, {"digits": 30})
    from dylora_moe.training import TrainingConfig

    with pytest.raises(ValueError, match=r"'sql', which do not run.*--data-dir"):
        MixedLearner(build(), stream, TrainingConfig(report_to=["none"]), tmp_path / "out")


def test_a_skill_whose_share_rounds_to_no_example_is_not_seen(tmp_path):
    """Only a chunk that draws examples of a skill makes it seen (evaluated from then on, a column of the
    records): a share rounded to zero examples draws nothing."""
    from dylora_moe.training import TrainingConfig

    rows = {}
    for skill in ("digits", "letters"):
        (tmp_path / f"{skill}.jsonl").write_text("\n".join(json.dumps(SKILLS[skill](i)) for i in range(40)))
        rows[skill] = {"name": skill, "source": {"type": "file", "path": str(tmp_path / f"{skill}.jsonl")},
                       "format": {"chat": False}}
    chunks = [{"size": 2, "mix": {"digits": 0.9, "letters": 0.1}}, {"size": 8, "mix": {"digits": 1, "letters": 1}}]
    stream = StreamSpec("s", list(rows.values()), chunks=chunks)
    assert stream.chunks[0].counts() == {"digits": 2, "letters": 0}
    learner = MixedLearner(build(), stream, TrainingConfig(report_to=["none"]), tmp_path / "out")
    assert [name for name, _ in learner.draw(0)] == ["digits", "digits"] and learner.seen == ["digits"]
    learner.draw(1)
    assert learner.seen == ["digits", "letters"]


def write_mixed_stream(tmp_path, n: int = 200) -> None:
    for skill, make in SKILLS.items():
        (tmp_path / f"{skill}.jsonl").write_text("\n".join(json.dumps(make(i)) for i in range(n)))
    tiny_llama().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "mixed.yaml").write_text(f"""
name: tiny-mixed
system:
  model: {tmp_path / 'model'}
  expert: {{rank: 4, dropout: 0.0}}
  novelty: {{min_group: 8}}
training: {{seed_steps: 2, consolidation_steps: 2, batch_size: 8, max_length: 32, report_to: [none]}}
skills:
  - {{name: digits, source: {{type: file, path: digits.jsonl}}, format: {{chat: false}}, max_eval: 8}}
  - {{name: letters, source: {{type: file, path: letters.jsonl}}, format: {{chat: false}}, max_eval: 8}}
chunks:
  - {{size: 48, mix: {{digits: 1.0}}}}
  - {{size: 48, mix: {{digits: 0.7, letters: 0.3}}}}
  - {{size: 48, mix: {{digits: 0.5, letters: 0.5}}}}
""")


def test_mixed_stream_trains_end_to_end_and_reports_the_sorting(tmp_path):
    write_mixed_stream(tmp_path)
    stream = load_stream(tmp_path / "mixed.yaml")
    from dylora_moe import DyLoRAConfig, DyLoRAMoE
    from dylora_moe.training import TrainingConfig

    model = DyLoRAMoE.from_config(DyLoRAConfig.from_dict(stream.system))
    training = TrainingConfig(**{**stream.training, "retain_kl_weight": 0.5})
    learner = MixedLearner(model, stream, training, tmp_path / "out")
    records = learner.run()
    assert [r.experts for r in records] == [1, 2, 2]
    # later chunks train expert 0 again: the digits requests sorted to it before anchor it to its past self
    assert len(learner.retained(3, 0)) == training.anchors_per_skill
    assert any("kl_to_before" in e for r in records[1:] for e in r.train_log)
    summary = summarise_mixed(records, ["digits", "letters"], stream="tiny-mixed", model="tiny")
    assert summary["experts"] == summary["true_skills"] == 2
    assert summary["purity"] >= 0.9 and summary["adjusted_rand_index"] > 0.5
    assert summary["novelty_delay"]["digits"] == 0
    assert all(v is not None for v in summary["loss_matrix"][-1])
    trained = {n for n, p in model.named_parameters() if "lora_B" in n and p.detach().abs().sum() > 0}
    assert any("expert_0" in n for n in trained) and any("expert_1" in n for n in trained)  # B starts at zero


def test_dylora_train_runs_a_mixed_stream(tmp_path):
    write_mixed_stream(tmp_path)
    assert main(["train", "--stream", str(tmp_path / "mixed.yaml"), "--out", str(tmp_path / "run"),
                 "--freeform-limit", "0"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["experts"] == 2 and summary["chunks"] == 3
    assert "sorting purity" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "system" / "manifest.json").exists() or any((tmp_path / "run" / "system").iterdir())


def test_chunks_that_overdraw_a_pool_fail_in_the_dry_run_and_before_any_training(tmp_path, capsys):
    write_mixed_stream(tmp_path, n=60)  # about 48 training examples per skill; the chunks want 48 + 34 + 24 digits
    stream, run = tmp_path / "mixed.yaml", tmp_path / "run"
    assert main(["train", "--stream", str(stream), "--out", str(run), "--dry-run"]) == 2
    assert "'digits' needs 106 over all chunks but its pool holds" in capsys.readouterr().err
    assert main(["train", "--stream", str(stream), "--out", str(run), "--freeform-limit", "0"]) == 2
    assert not (run / "system").exists()  # nothing trained


def test_each_expert_trains_one_pass_over_its_share_under_gradient_accumulation(tmp_path, monkeypatch):
    """An optimizer step takes batch_size * grad_accum sequences: the chunk's 48 examples are one pass of three
    steps of 2 x 8, not six steps (two passes)."""
    from dylora_moe import DyLoRAConfig, DyLoRAMoE
    from dylora_moe.training import TrainingConfig
    from dylora_moe.training.trainer import DyLoRATrainer

    write_mixed_stream(tmp_path)
    stream = load_stream(tmp_path / "mixed.yaml")
    stream.chunks = stream.chunks[:1]
    trained = []
    compute_loss = DyLoRATrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            trained.append(inputs["input_ids"].shape[0])
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DyLoRATrainer, "compute_loss", counting)
    training = TrainingConfig(**{**stream.training, "grad_accum": 2, "raw_copies": False, "instruction_views": False,
                                 "router_fit_steps": 0})
    learner = MixedLearner(DyLoRAMoE.from_config(DyLoRAConfig.from_dict(stream.system)), stream, training,
                           tmp_path / "out")
    record = learner.run()[0]
    assert sum(record.sorted[0].values()) == 48
    assert sum(trained) == 48 and len(trained) == 6  # 3 optimizer steps of 2 micro-batches of 8


def test_a_mixed_stream_keeps_the_pool_within_max_experts(tmp_path):
    """A third skill arriving in a pool bounded at two experts: the two established experts are merged first,
    as in the boundary-given loop, and the examples sorted to them before follow into the merged one."""
    from dylora_moe import DyLoRAConfig, DyLoRAMoE
    from dylora_moe.training import TrainingConfig

    write_mixed_stream(tmp_path)
    text = (tmp_path / "mixed.yaml").read_text()
    text = text.replace("  novelty: {min_group: 8}", "  novelty: {min_group: 8}\n  max_experts: 2")
    text = text.replace("chunks:", "  - {name: symbols, source: {type: file, path: symbols.jsonl}, "
                                   "format: {chat: false}, max_eval: 8}\nchunks:")
    text = text.replace("{digits: 0.5, letters: 0.5}", "{digits: 0.5, symbols: 0.5}")
    (tmp_path / "mixed.yaml").write_text(text)
    stream = load_stream(tmp_path / "mixed.yaml")
    model = DyLoRAMoE.from_config(DyLoRAConfig.from_dict(stream.system))
    learner = MixedLearner(model, stream, TrainingConfig(**{**stream.training, "router_fit_steps": 20}),
                           tmp_path / "out")
    records = learner.run()
    assert [r.experts for r in records] == [1, 2, 2]
    assert learner.merges == {0: 3, 1: 3} and model.experts.expert_ids == [2, 3]  # 2: symbols', 3: the merge
    assert sorted(learner.history) == [2, 3]
    sorted_to = {e: sum(sum(r.sorted.get(e, {}).values()) for r in records) for e in (0, 1, 3)}
    assert len(learner.history[3]) == sum(sorted_to.values()) >= 96  # chunks 0 and 1 too
    summary = summarise_mixed(records, [s.name for s in stream.skills], stream="tiny-mixed", model="tiny")
    assert summary["experts"] == 2
