"""The greedy-decoding score matrix after every step, on a tiny model and a tiny SuperNI-format folder."""

from __future__ import annotations

import json

import pytest

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import load_stream
from dylora_moe.evaluation import benchmark_report
from dylora_moe.evaluation.benchmark import BenchmarkConfig, results_from, run_method
from dylora_moe.evaluation.score_report import partial_lines
from dylora_moe.evaluation.step_scores import StepScorer, held_out_examples
from dylora_moe.training import TrainingConfig
from dylora_moe.training.loop import ContinualLearner
from tests.conftest import build, char_tokenizer, tiny_llama, write_superni

STREAM = """
name: tiny-superni
system:
  expert: {rank: 4, dropout: 0.0}
training: {seed_steps: 2, consolidation_steps: 2, batch_size: 4, max_length: 96, report_to: [none]}
skills:
  - {name: double, source: {type: builtin, name: superni, task: task001_double}, format: {chat: false}}
  - {name: shout, source: {type: builtin, name: superni, task: task002_shout}, format: {chat: false}}
  - {name: double-again, label: double, source: {type: builtin, name: superni, task: task001_double},
     format: {chat: false}}
"""


def tiny_superni(root):
    write_superni(root)
    tiny_llama().save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    (root / "stream.yaml").write_text(STREAM)
    return load_stream(root / "stream.yaml")


def test_scorer_fills_seen_steps_and_the_next_one(tmp_path):
    stream = tiny_superni(tmp_path)
    model = build()
    learner = ContinualLearner(model, stream, TrainingConfig(report_to=["none"]), tmp_path / "out", data_dir=tmp_path)
    scorer = StepScorer(model, learner, limit=2, final_limit=5, max_new_tokens=3, data_dir=tmp_path)
    assert [len(e) for e in scorer.examples] == [6, 6, 6]  # the whole test split, whatever max_eval says
    assert held_out_examples(stream.skills[1], tmp_path)[0].meta["split"] == "test"
    row = scorer(0)
    assert row[2] is None and all(isinstance(v, float) for v in row[:2])  # step 0 and the next one
    assert row[1] == pytest.approx(sum(scorer.values(1, 2)) / 2)
    last = scorer(2)
    assert None not in last and scorer.metric == "rougeL"
    assert [f["n"] for f in scorer.final] == [5, 5, 5]
    # the last row's cells are over the first `limit` examples, like every other row
    assert last[0] == pytest.approx(sum(scorer.values(0, 5)[:2]) / 2)
    with pytest.raises(ValueError, match="limit"):
        StepScorer(model, learner, limit=4, final_limit=2, data_dir=tmp_path)


def test_benchmark_reports_the_papers_metrics_on_the_score_matrix(tmp_path):
    stream = tiny_superni(tmp_path)
    system = DyLoRAConfig.from_dict({**stream.system, "model": str(tmp_path / "model")})
    training = TrainingConfig(**stream.training)
    bench = BenchmarkConfig(step_limit=2, pass_limit=4, humaneval_limit=0, freeform_limit=0, max_new_tokens=3)
    seen = []
    raws = {name: run_method(name, stream, system, training, tmp_path / "out", data_dir=tmp_path, bench=bench,
                             partial=seen.append)
            for name in ("dylora", "joint_lora", "base")}
    # after every step of the trained methods: what was measured so far (a stopped run keeps it)
    assert [(p["method"], p["steps_done"], len(p["score_matrix"])) for p in seen] == [
        (m, k, k) for m in ("dylora", "joint_lora") for k in (1, 2, 3)]
    assert json.loads(json.dumps(seen[-1]))["matrix"] == raws["joint_lora"]["matrix"]
    stopped = "\n".join(partial_lines({"dylora": seen[1]}, stream.skills))
    assert "dylora: stopped after 2 of 3 steps" in stopped and "| 1 | " in stopped and "| 2 | " not in stopped
    results = results_from(json.loads(json.dumps(raws)), stream=stream.name, model=system.model)
    for name, m in results["methods"].items():
        s = m["scores"]
        assert s["metric"] == "rougeL" and len(s["matrix"]) == 3, name
        assert [g["n"] for g in s["final"]] == [4, 4, 4] and [g["checker"] for g in m["generation"]] == ["rougeL"] * 3
        assert s["ap"] == pytest.approx(sum(g["score"] for g in s["final"]) / 3)
        assert s["fwt"] is not None and 0.0 <= s["acc"] <= 100.0
    base = results["methods"]["base"]["scores"]
    assert base["bwt"] == 0 and base["forgetting"] == 0  # the frozen model scores the same after every step
    assert results["methods"]["dylora"]["scores"]["matrix"][0][2] is None
    benchmark_report.write(tmp_path / "out", results, command="python benchmarks/continual.py ...", seconds=1)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Greedy decoding after every step (rougeL)" in report and "AP / joint_lora AP" in report
    assert "dylora: novelty decisions" in report and "dylora forgetting" in report
