"""`dylora tune` on a tiny model: pruning, a kill mid-study and its resume, a study on PostgreSQL, `train --params`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from dylora_moe import DyLoRAMoE
from dylora_moe.cli import main
from dylora_moe.data.stream import load_stream
from dylora_moe.tuning.params import apply_params, build_configs, load_params
from tests.conftest import write_tiny_run

ROOT = Path(__file__).resolve().parents[2]

# The stream's own rates are the baseline trial; the searched rates are a thousand times lower, so every
# searched trial is worse after its first step than the baseline was and the median pruner must stop it there.
PRUNED_SPACE = """
tune:
  sampler: random
  startup_trials: 1
  heartbeat_seconds: 1
  params:
    training.seed_lr: {low: 1.0e-6, high: 2.0e-6, log: true}
    training.consolidation_lr: {low: 1.0e-7, high: 2.0e-7}
"""

RESUME_SPACE = """
tune:
  sampler: random
  pruner: none
  heartbeat_seconds: 1
  params:
    training.seed_lr: {low: 1.0e-3, high: 3.0e-2, log: true}
    system.expert.rank: [2, 4]
"""


def tiny_stream(root: Path, space: str, steps: int = 2) -> Path:
    stream = write_tiny_run(root, steps=steps)
    stream.write_text(stream.read_text() + space)
    return stream


def tune_argv(root: Path, trials: int = 4) -> list[str]:
    return ["tune", "--stream", str(root / "stream.yaml"), "--trials", str(trials), "--out", str(root / "out"),
            "--model", str(root / "model")]


def load(root: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'out' / 'store.db'}")


@pytest.mark.slow
def test_four_trials_with_a_pruner_write_report_plots_and_best(tmp_path, capsys):
    tiny_stream(tmp_path, PRUNED_SPACE)
    assert main(tune_argv(tmp_path)) == 0
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.PRUNED] * 3
    assert trials[0].user_attrs["baseline"] and trials[0].params["training.seed_lr"] == 2e-3
    assert sorted(trials[0].intermediate_values) == [0, 1, 2]  # one report per stream step
    for t in trials[1:]:
        assert list(t.intermediate_values) == [0] and t.intermediate_values[0] > trials[0].intermediate_values[0]
    out = tmp_path / "out"
    report = (out / "tune-report.md").read_text()
    assert "## Best configuration" in report and "pruned after step 1" in report and "held-out" in report
    assert (out / "history.png").stat().st_size > 0
    assert not (out / "importances.png").exists() and "need at least 3 complete trials" in report  # one complete
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["params"] == trials[0].params and best["training"]["seed_lr"] == 2e-3
    assert "trial 4 of 4, best so far" in " ".join(capsys.readouterr().out.split())
    # a rerun with the same target finds the study finished and runs nothing
    assert main(tune_argv(tmp_path)) == 0
    assert len(load(tmp_path).trials) == 4


@pytest.mark.slow
def test_a_killed_study_resumes_without_repeating_finished_trials(tmp_path):
    tiny_stream(tmp_path, RESUME_SPACE, steps=8)  # trials of a few seconds, to be killed inside one
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dylora_moe.cli", *tune_argv(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "out" / "store.db").is_file() or not in_second_trial(study_or_none(tmp_path)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no trial completed in time"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {t.number: t for t in load(tmp_path).trials}
    states = {n: t.state.name for n, t in before.items()}
    assert before[0].state == TrialState.COMPLETE and before[1].state == TrialState.RUNNING, states
    time.sleep(4.0)  # past the 2 s grace period, with SQLite's whole-second timestamps: the heartbeat is stale
    assert main(tune_argv(tmp_path)) == 0
    after = load(tmp_path).trials
    finished = [t for t in after if t.state == TrialState.COMPLETE]
    states = [(t.number, t.state.name, t.system_attrs.get("failed_trial")) for t in after]
    assert len(finished) == 4 and not [t for t in after if t.state == TrialState.RUNNING], states
    # the trial finished before the kill is the same row, not run again
    assert after[0].datetime_complete == before[0].datetime_complete and after[0].value == before[0].value
    assert sum(bool(t.user_attrs.get("baseline")) for t in finished) == 1
    # the killed trial failed and was run again once, with its own parameters, under a new number
    assert after[1].state == TrialState.FAIL
    retries = [t for t in after if t.system_attrs.get("failed_trial") == 1]
    assert len(retries) == 1 and retries[0].params == after[1].params and retries[0].number > 1
    # no finished trial repeats another's parameters (a resumed sampler does not replay its first draws)
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 4
    report = (tmp_path / "out" / "tune-report.md").read_text()
    assert "(retry of 1)" in report and "## Parameter importances\n\n| parameter" in report
    assert (tmp_path / "out" / "importances.png").is_file()


def in_second_trial(trials: list) -> bool:
    """Trial 0 complete and trial 1 past its first stream step (of 3). Optuna fails a killed trial only once it
    has written a heartbeat, which it does when the trial starts: by the first step's report it has."""
    return len(trials) > 1 and trials[0].state == TrialState.COMPLETE and bool(trials[1].intermediate_values)


def study_or_none(root: Path) -> list:
    try:
        return load(root).trials
    except (KeyError, Exception):  # the study is not created yet
        return []


def test_train_params_applies_the_tuned_values(tmp_path, capsys):
    stream = write_tiny_run(tmp_path)
    (tmp_path / "best.yaml").write_text("params:\n  system.expert.rank: 2\n  training.seed_lr: 0.0123\n")
    argv = ["train", "--stream", str(stream), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "model"),
            "--params", str(tmp_path / "best.yaml"), "--freeform-limit", "0"]
    assert main(argv) == 0
    recorded = yaml.safe_load((tmp_path / "out" / "stream.yaml").read_text())
    assert recorded["training"]["seed_lr"] == 0.0123 and recorded["system"]["expert"]["rank"] == 2
    trained = DyLoRAMoE.from_pretrained(tmp_path / "out" / "system")
    assert set(trained.experts.ranks.values()) == {2}  # the stream alone gives rank 4
    assert main(["train", "--resume", str(tmp_path / "out"), "--params", str(tmp_path / "best.yaml")]) == 2
    assert "--params applies to a new run" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("params: {training.seed_rate: 0.1}\n")
    argv[1 + argv.index("--params")] = str(tmp_path / "bad.yaml")
    argv[1 + argv.index("--out")] = str(tmp_path / "out2")
    assert main(argv) == 2
    assert "unknown parameter 'training.seed_rate'" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "run.json").exists()


def test_bad_tune_section_fails_before_a_study_is_made(tmp_path, capsys):
    tiny_stream(tmp_path, "tune:\n  objective: accuracy\n")
    assert main(tune_argv(tmp_path)) == 2
    assert "choose one of weighted, pareto" in capsys.readouterr().err
    assert not (tmp_path / "out" / "store.db").exists()


def test_a_baseline_that_cannot_be_a_trial_fails_before_a_study_is_made(tmp_path, capsys):
    tiny_stream(tmp_path, "tune:\n  params:\n    system.max_experts: {low: 2, high: 4}\n")
    assert main(tune_argv(tmp_path)) == 2
    assert "the stream's own value None is not a number" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out" / "store.db").exists()

@pytest.mark.slow
def test_pareto_study_reports_the_front(tmp_path):
    tiny_stream(tmp_path, RESUME_SPACE.replace("pruner: none", "objective: pareto"))
    assert main(tune_argv(tmp_path, trials=3)) == 0
    study = load(tmp_path)
    assert len(study.directions) == 3 and study.best_trials
    report = (tmp_path / "out" / "tune-report.md").read_text()
    assert "## Pareto front" in report and (tmp_path / "out" / "pareto.png").is_file()


@pytest.mark.slow
def test_a_study_on_postgresql_is_continued_from_another_folder(tmp_path, postgres_server):
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("CREATE DATABASE tune_shared"))
    engine.dispose()
    url = postgres_server.format(db="tune_shared")
    tiny_stream(tmp_path, RESUME_SPACE)
    first = [*tune_argv(tmp_path, trials=2), "--storage", url]
    assert main(first) == 0
    second = [*tune_argv(tmp_path, trials=3), "--storage", url]
    second[second.index("--out") + 1] = str(tmp_path / "elsewhere")
    assert main(second) == 0  # another folder, the same study: one more trial
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and trials[0].user_attrs["baseline"]
    assert not (tmp_path / "elsewhere" / "store.db").exists()  # --storage replaces the folder's store
    assert "postgresql+psycopg://postgres@/tune_shared" in (tmp_path / "elsewhere" / "tune-report.md").read_text()


@pytest.mark.parametrize("storage, match", [("nonsense", "is not a SQLAlchemy URL"),
                                            ("foo://x", "cannot open the study storage foo://x")])
def test_bad_storage_is_named(tmp_path, capsys, storage, match):
    tiny_stream(tmp_path, RESUME_SPACE)
    assert main([*tune_argv(tmp_path), "--storage", storage]) == 2
    assert match in " ".join(capsys.readouterr().err.split())


def test_space_file_replaces_the_streams_section(tmp_path):
    import argparse

    from dylora_moe.tuning.cli import prepare

    stream = tiny_stream(tmp_path, RESUME_SPACE)
    (tmp_path / "space.yaml").write_text("tune:\n  objective: pareto\n  params:\n    system.router.top_k: [1, 2]\n")
    args = argparse.Namespace(stream=stream, trials=2, model=None, max_train=5, data_dir=None,
                              space=tmp_path / "space.yaml")
    loaded, config = prepare(args)
    assert config.multi and [p.name for p in config.params] == ["system.router.top_k"]
    assert all(s.max_train == 5 for s in loaded.skills)
    (tmp_path / "space.yaml").write_text("params:\n  system.router.topk: [1, 2]\n")  # the bare mapping works too
    with pytest.raises(ValueError, match=r"unknown parameter 'system.router.topk'.*did you mean system.router.top_k"):
        prepare(args)
    (tmp_path / "space.yaml").write_text("tune:\n  params: {system.router.top_k: [1, 2\n")
    with pytest.raises(ValueError, match=r"space.yaml is not valid YAML"):
        prepare(args)
    args.trials = 0
    with pytest.raises(ValueError, match="--trials must be >= 1"):
        prepare(args)


@pytest.mark.parametrize("cap", ["0", "-1"])
def test_a_max_train_below_one_fails_before_a_study_is_made(tmp_path, capsys, cap):
    tiny_stream(tmp_path, RESUME_SPACE)
    assert main([*tune_argv(tmp_path), "--max-train", cap]) == 2  # 0 left every trial without training data
    assert f"--max-train must be >= 1 (or left out for each skill's own cap), got {cap}" in " ".join(
        capsys.readouterr().err.split())
    assert not (tmp_path / "out" / "store.db").exists()


@pytest.mark.parametrize("message", ["table studies already exists",
                                     "UNIQUE constraint failed: alembic_version.version_num"])
def test_the_loser_of_a_race_to_create_the_study_database_opens_it_again(tmp_path, monkeypatch, message):
    import sqlalchemy

    from dylora_moe.tuning import study as study_module
    from dylora_moe.tuning.space import TuneConfig

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kw):  # another process stamped the schema first
        calls.append(url)
        if len(calls) == 1:
            error = sqlalchemy.exc.OperationalError if "exists" in message else sqlalchemy.exc.IntegrityError
            raise error("INSERT ...", {}, Exception(message))
        return real(url, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = study_module.storage_for(f"sqlite:///{tmp_path / 'store.db'}", TuneConfig())
    assert len(calls) == 2 and storage.get_all_studies() == []
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: (_ for _ in ()).throw(
        sqlalchemy.exc.IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed: trials.number"))))
    with pytest.raises(sqlalchemy.exc.IntegrityError):  # any other failure is not a race: it is raised
        study_module.storage_for(f"sqlite:///{tmp_path / 'other.db'}", TuneConfig())


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "params").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_params_file_applies_to_the_default_stream(path):
    stream = load_stream(ROOT / "configs" / "streams" / "default.yaml")
    params = load_params(path)
    system, training = apply_params(stream.system, stream.training, params)
    config, training_config = build_configs(system, training)
    for name, value in params.items():
        section, *keys = name.split(".")
        node = config if section == "system" else training_config
        for key in keys:
            node = getattr(node, key)
        assert node == value, name


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "streams").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_stream_file_loads_with_valid_configs(path):
    stream = load_stream(path)
    assert stream.skills or stream.chunks
    build_configs(stream.system, stream.training)


def test_a_study_left_short_by_failed_trials_exits_non_zero(tmp_path, monkeypatch, capsys):
    from dylora_moe.tuning.objective import Objective

    def failing(self, trial):
        raise ValueError("this configuration cannot train")

    monkeypatch.setattr(Objective, "__call__", failing)
    tiny_stream(tmp_path, RESUME_SPACE)
    assert main(tune_argv(tmp_path, trials=2)) == 1
    assert "holds 0 of 2 finished trials" in " ".join(capsys.readouterr().out.split())


def test_a_rerun_on_a_changed_stream_is_refused(tmp_path, monkeypatch, capsys):
    from dylora_moe.tuning.objective import Objective

    def quick(self, trial):  # no training: the study's bookkeeping is what is tested
        for spec in self.config.params:
            spec.suggest(trial)
        for key, value in (("loss", 1.0), ("forgetting", 0.0), ("trainable_params", 0)):
            trial.set_user_attr(key, value)
        return 1.0

    monkeypatch.setattr(Objective, "__call__", quick)
    stream = tiny_stream(tmp_path, RESUME_SPACE)
    assert main(tune_argv(tmp_path, trials=2)) == 0
    stream.write_text(stream.read_text().replace("seed_steps: 2", "seed_steps: 3"))
    assert main(tune_argv(tmp_path, trials=3)) == 2
    assert "was run on another stream: its training differ" in " ".join(capsys.readouterr().err.split())
    assert len(load(tmp_path).trials) == 2
    assert main([*tune_argv(tmp_path, trials=3), "--study-name", "tiny-3-steps"]) == 0  # a new study is fine


def test_a_mixed_stream_is_refused_before_a_study_is_made(tmp_path, capsys):
    stream = tiny_stream(tmp_path, RESUME_SPACE)
    stream.write_text(stream.read_text() + "chunks:\n  - {size: 8, mix: {digits: 0.5, letters: 0.5}}\n"
                      "  - {size: 8, mix: {digits: 1.0}}\n")
    assert main(tune_argv(tmp_path)) == 2  # a trial would train the pools one after another, not the chunks
    assert "is a mixed stream (`chunks:`), which a trial cannot run" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out" / "store.db").exists()


def test_data_that_cannot_be_read_fails_before_a_study_is_made(tmp_path, capsys):
    tiny_stream(tmp_path, RESUME_SPACE)
    (tmp_path / "letters.jsonl").write_text("")
    assert main(tune_argv(tmp_path)) == 2  # not a study of failed trials, each with a traceback
    assert "skill 'letters': the source gave no examples" in capsys.readouterr().err
    assert not (tmp_path / "out" / "store.db").exists()


@pytest.mark.parametrize("model", ["no-such-model", "missing"])
def test_a_model_that_cannot_be_loaded_fails_before_a_study_is_made(tmp_path, capsys, model):
    tiny_stream(tmp_path, RESUME_SPACE)
    argv = tune_argv(tmp_path)
    argv[argv.index("--model") + 1] = model if model != "missing" else str(tmp_path / model)
    assert main(argv) == 2  # not a study of failed trials, each with a traceback (HF_HUB_OFFLINE: conftest)
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot load model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    tiny_stream(tmp_path, RESUME_SPACE)
    (tmp_path / "out").write_text("notes")
    assert main(tune_argv(tmp_path)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--out {tmp_path / 'out'} is a file or under one: give a folder" in err and "free space" not in err
    assert (tmp_path / "out").read_text() == "notes"
