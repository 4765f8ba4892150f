"""The study beneath `dylora tune`: a space that no longer fits the stored trials, trials left by a dead process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from dylora_moe.tuning.space import parse_tune
from dylora_moe.tuning.study import (
    OWNER,
    baseline_trial,
    claim,
    enqueue_baseline,
    open_study,
    retry_dead_trials,
    run_study,
    stream_identity,
)

SPACE = {"sampler": "random", "pruner": "none", "params": {"training.seed_lr": {"low": 1e-4, "high": 1e-2},
                                                           "system.expert.rank": [2, 4]}}


def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_a_changed_categorical_choice_is_refused_before_any_trial_runs(tmp_path):
    study = open_study(url(tmp_path), "s", parse_tune(SPACE))
    study.optimize(lambda t: t.suggest_categorical("system.expert.rank", [2, 4]) * 1.0, n_trials=1)
    changed = {**SPACE, "params": {**SPACE["params"], "system.expert.rank": [4, 8]}}
    with pytest.raises(ValueError, match=r"drew system.expert.rank from choices \[2, 4\].*another --study-name"):
        open_study(url(tmp_path), "s", parse_tune(changed))
    narrower = {**SPACE, "params": {**SPACE["params"], "training.seed_lr": {"low": 1e-3, "high": 1e-2}}}
    open_study(url(tmp_path), "s", parse_tune(narrower))  # a numeric range may change


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_trial_left_running_by_a_dead_process_is_queued_again_at_once(tmp_path, monkeypatch):
    config = parse_tune(SPACE)
    study = open_study(url(tmp_path), "s", config)
    study.enqueue_trial({"training.seed_lr": 2e-3, "system.expert.rank": 4}, user_attrs={"baseline": True})
    trial = study.ask()  # the baseline, started by a process that was then killed before its heartbeat went stale
    trial.suggest_float("training.seed_lr", 1e-4, 1e-2)
    pid = dead_pid()
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: pid)
        claim(trial)
    live = study.ask()  # a trial this (live) process runs: left alone
    claim(live)
    study = open_study(url(tmp_path), "s", config)  # the rerun
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    retried = trials[2]
    assert retried.system_attrs["failed_trial"] == 0 and retried.user_attrs["baseline"]
    queued = study.ask()  # the retry runs with the killed trial's parameters, the ones it had not drawn yet too
    assert queued.number == 2
    assert queued.suggest_float("training.seed_lr", 1e-4, 1e-2) == 2e-3
    assert queued.suggest_categorical("system.expert.rank", [2, 4]) == 4
    assert retry_dead_trials(study) == []  # nothing else is dead


def test_each_trial_records_the_process_that_runs_it(tmp_path):
    study = optuna.create_study(storage=url(tmp_path), study_name="s")
    trial = study.ask()
    claim(trial)
    assert study.trials[0].user_attrs[OWNER] == {"host": socket.gethostname(), "pid": os.getpid()}


@pytest.mark.parametrize("before, after, match", [
    ({"low": 0.0, "high": 1.0}, [0.0, 0.5], r"from a range 0.0..1.0, the space now gives choices \[0.0, 0.5\]"),
    ([0.0, 0.5], {"low": 0.0, "high": 1.0}, r"from choices \[0.0, 0.5\], the space now gives a range 0.0..1.0"),
    ({"low": 0.1, "high": 1.0}, {"low": 0.1, "high": 1.0, "log": True},
     r"the space now gives a range 0.1..1.0 \(log\)"),
])
def test_a_parameter_that_changed_kind_or_scale_is_refused_before_any_trial_runs(tmp_path, before, after, match):
    first = parse_tune({"sampler": "random", "pruner": "none", "params": {"training.kl_weight": before}})
    study = open_study(url(tmp_path), "s", first)
    study.optimize(lambda t: first.params[0].suggest(t), n_trials=1)
    changed = parse_tune({"sampler": "random", "pruner": "none", "params": {"training.kl_weight": after}})
    with pytest.raises(ValueError, match=match + ".*another --study-name"):  # not every new trial failing
        open_study(url(tmp_path), "s", changed)


def test_a_baseline_interrupted_by_ctrl_c_runs_again_on_the_rerun(tmp_path):
    config = parse_tune(SPACE)
    training = {"seed_lr": 5e-3}

    def interrupted(trial):
        config.params[0].suggest(trial)
        raise KeyboardInterrupt  # Optuna marks the trial failed, then lets the interrupt through

    study = open_study(url(tmp_path), "s", config)
    enqueue_baseline(study, config, {"expert": {"rank": 2}}, training)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, interrupted, 2)
    assert study.trials[0].state == TrialState.FAIL and study.trials[0].user_attrs["baseline"]
    study = open_study(url(tmp_path), "s", config)  # the rerun
    enqueue_baseline(study, config, {"expert": {"rank": 2}}, training)
    enqueue_baseline(study, config, {"expert": {"rank": 2}}, training)  # queued once, however often it is called
    run_study(study, lambda t: sum(float(spec.suggest(t)) for spec in config.params), 2)
    base = baseline_trial(study)
    assert base is not None and base.params == {"training.seed_lr": 5e-3, "system.expert.rank": 2}
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 2  # the failed one and its rerun


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_workers_that_open_a_study_together_draw_different_parameters(tmp_path, sampler):
    config = parse_tune({**SPACE, "sampler": sampler, "baseline": False})
    first, second = open_study(url(tmp_path), "s", config), open_study(url(tmp_path), "s", config)
    for _ in range(2):  # the same number of trials seen by both: one seed per process would repeat every draw
        a, b = first.ask(), second.ask()
        assert {s.name: s.suggest(a) for s in config.params} != {s.name: s.suggest(b) for s in config.params}
        first.tell(a, 1.0)
        second.tell(b, 1.0)


def test_a_study_continued_on_another_stream_is_refused(tmp_path):
    from dylora_moe.data.stream import StreamSpec

    def stream(folder: str, max_train: int = 8) -> StreamSpec:
        skills = [{"name": n, "source": {"type": "file", "path": f"{folder}/{n}.jsonl"}, "max_train": max_train}
                  for n in ("digits", "letters")]
        return StreamSpec("s", skills, training={"seed_steps": 2})

    config = parse_tune(SPACE)
    open_study(url(tmp_path), "s", config, stream_identity(stream("/data"), None))
    # the same stream read from another folder or host: the same study
    open_study(url(tmp_path), "s", config, stream_identity(stream("/elsewhere/data"), None))
    with pytest.raises(ValueError, match=r"study 's' was run on another stream: its skills differ.*--study-name"):
        open_study(url(tmp_path), "s", config, stream_identity(stream("/data", max_train=16), None))
    other = stream("/data")
    other.training = {"seed_steps": 4}
    with pytest.raises(ValueError, match="its training differ"):
        open_study(url(tmp_path), "s", config, stream_identity(other, None))


def test_two_workers_restarted_together_queue_a_dead_trial_once(tmp_path, monkeypatch):
    config = parse_tune(SPACE)
    study = open_study(url(tmp_path), "s", config)
    trial = study.ask()
    trial.suggest_float("training.seed_lr", 1e-4, 1e-2)
    trial.set_user_attr(OWNER, {"host": socket.gethostname(), "pid": dead_pid()})
    first, second = (optuna.load_study(study_name="s", storage=url(tmp_path)) for _ in range(2))
    listed = second.get_trials(deepcopy=False, states=(TrialState.RUNNING,))  # the second looked first
    assert retry_dead_trials(first) == [0]
    monkeypatch.setattr(second, "get_trials", lambda deepcopy=True, states=None: listed)
    assert retry_dead_trials(second) == []  # the first failed it: no crash, no second retry
    monkeypatch.undo()
    assert [(t.state, t.system_attrs.get("failed_trial")) for t in second.trials] == [
        (TrialState.FAIL, None), (TrialState.WAITING, 0)]
