"""The benchmark's bookkeeping: metrics of results.json from raw measurements, and a whole tiny run."""

from __future__ import annotations

import json
import math

import pytest

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import load_stream
from dylora_moe.evaluation import benchmark_report
from dylora_moe.evaluation.benchmark import BenchmarkConfig, gate_routing_accuracy, results_from, run_method
from dylora_moe.training import TrainingConfig
from tests.conftest import write_tiny_run


def raw(matrix, **kw):
    return {"skills": ["a", "b", "c"], "labels": ["a", "b", "a"], "matrix": matrix, "experts": 2,
            "trainable_params": 10, "train_seconds": 1.0, **kw}


def test_results_from_computes_loss_metrics_against_the_base_row():
    base = [[2.0, 3.0, 2.0]] * 3
    m = [[1.0, 2.5, 1.2],
         [1.5, 1.0, 1.4],
         [1.1, 1.2, 1.0]]
    dylora = raw(m, novel=[True, True, False], uses_router=True, expert_of_step=[0, 1, 0],
                 final_routing=[{"0": 1.0}, {"1": 1.0}, {"0": 1.0}])
    told = raw(m, novel=[True, True, False], uses_router=False)  # a label baseline: told, not detecting
    results = results_from({"base": raw(base), "dylora": dylora, "oracle_experts": told}, stream="s", model="m")
    d = results["methods"]["dylora"]
    assert d["metric"] == "loss" and d["matrix"] == m
    assert d["acc"] == pytest.approx((1.1 + 1.2 + 1.0) / 3)
    # skill a returns at step 2: its first column's change is relearning, so BWT and forgetting read skill b
    # alone (final - just learned 1.2 - 1.0), and FWT the one step that brings a new skill (b: 2.5 vs 3.0)
    assert d["bwt"] == pytest.approx(-(1.2 - 1.0))
    assert d["fwt"] == pytest.approx(-(2.5 - 3.0))
    assert d["forgetting"] == pytest.approx(1.2 - 1.0)
    assert d["novelty"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert d["routing_accuracy"] == 1.0 and d["routing_entropy"] == [0.0, 0.0, 0.0]
    o = results["methods"]["oracle_experts"]
    assert "novelty" not in o and o["routing_accuracy"] is None and "final_routing" not in o
    b = results["methods"]["base"]
    assert b["bwt"] == 0 and b["fwt"] == 0 and b["forgetting"] == 0


def test_gate_routing_accuracy_counts_the_expert_each_label_was_first_given():
    r = raw([[0.0] * 3] * 3, expert_of_step=[0, 1, 2], final_routing=[{"0": 1.0}, {"1": 0.5, "0": 0.5}, {"0": 0.75}])
    # step 2 repeats label a, whose expert is 0 (a new expert 2 made for it does not count as right)
    assert gate_routing_accuracy(r) == pytest.approx((1.0 + 0.5 + 0.75) / 3)
    entropy = results_from({"dylora": {**r, "uses_router": True}}, stream="s", model="m")["methods"]["dylora"][
        "routing_entropy"]
    assert entropy == pytest.approx([0.0, math.log(2), 0.0])  # shares per step, normalised


def test_a_tiny_benchmark_runs_every_method_and_writes_the_report(tmp_path):
    stream = load_stream(write_tiny_run(tmp_path, n=24, steps=1))
    stream.skills[2].label = "digits"
    system = DyLoRAConfig.from_dict({**stream.system, "model": str(tmp_path / "model")})
    training = TrainingConfig(**stream.training)
    bench = BenchmarkConfig(pass_limit=2, humaneval_limit=0)
    raws = {name: run_method(name, stream, system, training, tmp_path / "out", bench=bench)
            for name in ("dylora", "spec_reference", "sequential_lora", "joint_lora", "oracle_experts", "base")}
    results = results_from(json.loads(json.dumps(raws)), stream=stream.name, model=system.model)
    methods = results["methods"]
    assert set(methods) == set(raws)
    for name, m in methods.items():
        assert len(m["matrix"]) == 3 and all(len(row) == 3 and None not in row for row in m["matrix"]), name
        assert [g["metric"] for g in m["generation"]] == ["exact_match"] * 3
    assert methods["sequential_lora"]["experts"] == methods["joint_lora"]["experts"] == 1
    assert methods["oracle_experts"]["experts"] == 2 and methods["base"]["experts"] == 0
    assert methods["base"]["trainable_params"] == 0
    assert methods["dylora"]["trainable_params"] > methods["oracle_experts"]["trainable_params"]  # + the gate
    assert methods["dylora"]["routing_accuracy"] is not None and methods["oracle_experts"]["routing_accuracy"] is None
    benchmark_report.write(tmp_path / "out", results, command="python benchmarks/continual.py ...", seconds=60)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| dylora |" in report and "## Targets" in report and "dylora BWT" in report
    for png in ("matrices.png", "skills.png", "comparison.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_a_bad_freeform_length_is_refused_when_the_benchmark_is_configured():
    with pytest.raises(ValueError, match="freeform_tokens"):
        BenchmarkConfig(freeform_tokens=0)
