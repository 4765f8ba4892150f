"""``benchmarks/continual.py --orders`` on a tiny model: each order in its own folder, reruns run only what is
missing, and the mean and spread over orders in OUT/results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dylora_moe.data.stream import load_stream
from dylora_moe.evaluation.orders import permutation
from tests.conftest import write_tiny_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import continual


@pytest.mark.slow
def test_orders_run_in_their_own_folders_and_a_rerun_runs_only_the_missing_ones(tmp_path):
    stream_file = write_tiny_run(tmp_path, n=24, steps=1)
    stream_file.write_text(stream_file.read_text().replace("name: digits-again,", "name: digits-again, label: digits,"))
    out = tmp_path / "out"
    argv = ["--stream", str(stream_file), "--out", str(out), "--model", str(tmp_path / "model"),
            "--methods", "base,oracle_experts", "--pass-limit", "0", "--humaneval-limit", "0",
            "--freeform-limit", "0"]
    continual.main([*argv, "--orders", "2"])
    labels = [s.label for s in load_stream(stream_file).skills]
    names = [s.name for s in load_stream(stream_file).skills]
    for k in range(2):
        order = json.loads((out / f"order-{k}" / "results.json").read_text())
        assert order["skills"] == [names[i] for i in permutation(labels, k)]
        assert set(order["methods"]) == {"base", "oracle_experts"}
    results = json.loads((out / "results.json").read_text())
    assert [o["order"] for o in results["orders"]] == [0, 1]
    oracle = results["methods"]["oracle_experts"]
    assert oracle["experts"] == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0, "n": 2}  # two labels
    assert oracle["train_seconds"]["n"] == 2 and oracle["train_seconds"]["max"] < oracle["stream_seconds"]["max"]
    assert results["methods"]["base"]["train_seconds"]["max"] == 0.0
    assert "oracle_experts" in (out / "report.md").read_text()

    done = {p: p.stat().st_mtime_ns for p in out.glob("order-*/methods/*.json")}
    continual.main([*argv, "--orders", "3"])
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished orders were not rerun
    assert (out / "order-2" / "methods" / "oracle_experts.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["oracle_experts"]["acc"]["n"] == 3


def test_training_overrides_are_typed_and_unknown_fields_are_refused(tmp_path):
    stream_file = write_tiny_run(tmp_path, n=8, steps=1)
    args = continual.parse_args(["--stream", str(stream_file), "--out", str(tmp_path / "out"), "--training",
                                 "empty_unlikelihood=1.0", "--training", "raw_copies=false",
                                 "--consolidation-steps", "3"])
    _, _, training, _ = continual.configs(args)
    assert (training.empty_unlikelihood, training.raw_copies, training.consolidation_steps) == (1.0, False, 3)
    with pytest.raises(SystemExit, match=r"FIELD one of .*empty_unlikelihood"):
        continual.training_overrides(["empty_unlikelyhood=1"])
    with pytest.raises(SystemExit, match="expected FIELD=VALUE"):
        continual.training_overrides(["raw_copies"])


def test_a_params_file_sets_system_and_training_fields(tmp_path):
    stream_file = write_tiny_run(tmp_path, n=8, steps=1)
    params = tmp_path / "params.yaml"
    params.write_text("params:\n  system.router.route_pass: separate\n  system.router.route_layer: 1\n"
                      "  training.kl_weight: 2.0\n")
    args = continual.parse_args(["--stream", str(stream_file), "--out", str(tmp_path / "out"), "--params", str(params)])
    _, system, training, _ = continual.configs(args)
    assert (system.router.route_layer, system.router.route_pass, training.kl_weight) == (1, "separate", 2.0)
    params.write_text("params:\n  system.router.route_passes: separate\n")
    with pytest.raises(ValueError, match=r"did you mean system\.router\.route_pass"):
        continual.configs(args)


def test_method_files_of_other_steps_are_refused_not_reported(tmp_path):
    from tests.conftest import TINY_STREAM

    (tmp_path / "stream.yaml").write_text(TINY_STREAM.format(steps=1))
    out = tmp_path / "out"
    (out / "methods").mkdir(parents=True)
    steps = ["digits", "letters", "digits-again"]
    raw = {"method": "base", "skills": steps, "labels": steps, "matrix": [[1.0, 3.0, 1.0]] * 3, "experts": 0,
           "trainable_params": 0, "train_seconds": 0.0, "stream_seconds": 0.0, "novel": [], "expert_of_step": [],
           "final_routing": [], "uses_router": False, "generation": [], "seconds": 0.0}
    (out / "methods" / "base.json").write_text(json.dumps(raw))
    argv = ["--stream", str(tmp_path / "stream.yaml"), "--out", str(out), "--report"]
    continual.main(argv)
    assert json.loads((out / "results.json").read_text())["skills"] == steps
    # a method left by a run of another order into the same folder: its columns are other skills
    other = {**raw, "method": "sequential_lora", "skills": ["letters", "digits", "digits-again"]}
    (out / "methods" / "sequential_lora.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="sequential_lora ran other steps"):
        continual.main(argv)
    (out / "methods" / "sequential_lora.json").unlink()
    (out / "methods" / "dylora.partial.json").write_text(json.dumps({**other, "steps_done": 1}))
    with pytest.raises(SystemExit, match=r"dylora\.partial ran other steps"):
        continual.main(argv)
    assert continual.other_steps({"base": raw}, steps) == []


def test_method_files_measured_under_other_options_are_refused(tmp_path):
    from tests.conftest import TINY_STREAM

    (tmp_path / "stream.yaml").write_text(TINY_STREAM.format(steps=1))
    out = tmp_path / "out"
    (out / "methods").mkdir(parents=True)
    argv = ["--stream", str(tmp_path / "stream.yaml"), "--out", str(out), "--methods", "base"]
    settings = continual.run_settings(*continual.configs(continual.parse_args(argv)), None)
    assert settings["training"]["consolidation_steps"] == 1 and "report_to" not in settings["training"]
    steps = ["digits", "letters", "digits-again"]
    raw = {"method": "base", "skills": steps, "labels": steps, "matrix": [[1.0, 3.0, 1.0]] * 3, "experts": 0,
           "trainable_params": 0, "train_seconds": 0.0, "stream_seconds": 0.0, "novel": [], "expert_of_step": [],
           "final_routing": [], "uses_router": False, "generation": [], "seconds": 0.0, "settings": settings}
    (out / "methods" / "base.json").write_text(json.dumps(raw))
    continual.main([*argv, "--report"])  # the same options: reported
    with pytest.raises(SystemExit, match=r"base \(training.consolidation_steps: 1 -> 3\)"):
        continual.main([*argv, "--consolidation-steps", "3"])  # refused before anything runs
    other = {**settings, "bench": {**settings["bench"], "pass_limit": 100}}
    (out / "methods" / "oracle_experts.json").write_text(json.dumps({**raw, "method": "oracle_experts",
                                                                      "settings": other}))
    with pytest.raises(SystemExit, match=r"than oracle_experts's: base \(bench.pass_limit: 16 -> 100\)"):
        continual.main([*argv, "--report"])  # files that disagree with each other are not reported together
    older = {k: v for k, v in raw.items() if k != "settings"}  # written before settings were recorded
    assert continual.other_settings({"older": older}, {**settings, "bench": {}}) == {}


def test_method_files_of_a_stream_with_other_sources_are_refused(tmp_path):
    """Two streams with the same step names and other data (the SuperNI orders with another input cut) are not
    reported side by side; files written before sources were recorded are not checked for them."""
    from tests.conftest import TINY_STREAM

    (tmp_path / "stream.yaml").write_text(TINY_STREAM.format(steps=1))
    argv = ["--stream", str(tmp_path / "stream.yaml"), "--out", str(tmp_path / "out"), "--methods", "base"]
    settings = continual.run_settings(*continual.configs(continual.parse_args(argv)), None)
    assert settings["sources"]["0"] == {"type": "file", "path": "digits.jsonl", "start": 0}
    moved = json.loads(json.dumps(settings))
    moved["sources"]["0"]["stop"] = 7
    assert continual.other_settings({"base": {"settings": moved}}, settings) == {"base": ["sources.0.stop: 7 -> None"]}
    before = {k: v for k, v in settings.items() if k != "sources"}
    assert continual.other_settings({"base": {"settings": before}}, settings) == {}
