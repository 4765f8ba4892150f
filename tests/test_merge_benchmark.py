"""``benchmarks/merge.py``: the forced missed recognition, the figures of a merge, and the forced part end to end
on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dylora_moe.data.stream import StreamSpec
from dylora_moe.training import TrainingConfig
from tests.conftest import VOCAB, build, char_tokenizer, decide_by_cosine
from tests.training.test_loop import digits, skill_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import merge


def test_a_forced_step_gets_its_own_expert_and_the_detector_decides_the_others(tmp_path):
    def more_digits(i):
        return {"prompt": f"{i} + {i} =", "response": f"{2 * i}"}

    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "again", more_digits),
                              skill_file(tmp_path, "again-2", more_digits)])
    model = build()
    decide_by_cosine(model, -1.0)  # the detector recognises everything after the first skill
    training = TrainingConfig(seed_steps=1, consolidation_steps=1, batch_size=4, max_length=32, report_to=["none"],
                              router_fit_steps=5)
    learner = merge.MissedRecognition(model, stream, training, tmp_path / "out", forced=(1,))
    learner.run()
    assert [r.novelty.is_novel for r in learner.records] == [True, True, False]
    assert [r.novelty.expert_id for r in learner.records] == [0, 1, 1]  # the third step: its nearest skill's
    assert (model.config.novelty.method, model.config.novelty.similarity_threshold) == ("cosine", -1.0)


def test_merge_figures_compare_with_the_better_source_expert():
    halves = ("a", "b")
    before = {"served": {"a": 1.0, "v": 2.0, "b": 1.1},
              "expert_a": {"a": 1.00, "b": 1.20, "pooled": 1.10}, "expert_b": {"a": 1.10, "b": 1.00, "pooled": 1.05}}
    after = {"served": {"a": 1.0, "v": 2.004, "b": 1.0}, "merged": {"a": 1.02, "b": 0.99, "pooled": 1.0605}}
    got = merge.merge_figures(before, after, "v", halves)
    assert got["ratio_to_better"] == pytest.approx({"a": 1.02, "b": 0.99, "pooled": 1.01})
    assert got["verilog_change"] == pytest.approx(0.004) and got["verilog_unchanged"] and got["within_2pct"]
    after["merged"]["pooled"], after["served"]["v"] = 1.0815, 1.994
    got = merge.merge_figures(before, after, "v", halves)
    assert got["ratio_to_better"]["pooled"] == pytest.approx(1.03)
    assert not got["within_2pct"] and not got["verilog_unchanged"]


@pytest.mark.slow
def test_the_forced_part_merges_the_two_experts_of_one_skill_with_every_method(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # a tiny Llama whose positions reach a whole HumanEval problem in characters
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "results" / "merge.json"
    merge.main(["--part", "forced", "--model", str(tmp_path / "model"), "--work", str(tmp_path / "work"),
                "--out", str(out), "--max-train", "8", "--max-eval", "4", "--seed-steps", "1",
                "--consolidation-steps", "1", "--max-length", "1024", "--methods", "cat,svd,ties_svd"])
    forced = json.loads((out.parent / "forced.json").read_text())
    a, _, b = forced["experts_of_steps"]
    assert a != b and forced["before"]["experts"] == len(set(forced["experts_of_steps"]))
    rows = {m["method"]: m for m in forced["methods"]}
    assert list(rows) == ["cat", "svd", "ties_svd"]
    assert {m["experts"] for m in rows.values()} == {forced["before"]["experts"] - 1}
    assert rows["cat"]["rank"] == 2 * rows["svd"]["rank"] and rows["ties_svd"]["density"] == 0.5
    assert rows["ties_svd"]["weights"] == [1.0, 1.0] and rows["cat"]["weights"] == [0.5, 0.5]
    assert len(forced["matrix"]) == 3 and forced["matrix"][0][1:] == [None, None]
    result = json.loads(out.read_text())["forced"]
    assert result["best_method"] in rows and set(result["targets"]["met_by"]) <= set(rows)
