"""The Optuna study of ``dylora tune``, kept in an RDB storage: by default the run's store (``OUT/store.db``).

Optuna provides what a long search needs, used as designed: ``RDBStorage`` on any SQLAlchemy URL (SQLite file,
PostgreSQL) so a study survives its process and several processes can share it (``load_if_exists``); a
heartbeat, so that a trial whose process was killed is marked failed and run again with the same parameters
(``RetryHeartbeatStaleTrialCallback``); ``MaxTrialsCallback``, so ``--trials N`` means N finished trials in
the study, whoever ran them, and a restart runs only the rest. A killed trial is noticed once its heartbeat is
older than twice ``heartbeat_seconds``, by the next trial any process starts; a rerun on the same host notices at
once a trial whose process is gone (each trial records its host and pid, ``claim``), so a study killed and
rerun right away runs the killed trial again, the baseline included. Optuna cannot tell a trial of another host
killed in the instant between its creation and its first heartbeat from one just started: it stays ``RUNNING``
in the study, never counts as finished, and the study still reaches its N finished trials.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from ..data.stream import StreamSpec
from .space import TuneConfig, baseline_params

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OWNER = "owner"  # user attr: {"host", "pid"} of the process running a trial


def make_sampler(config: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.startup_trials)


class TrialSeeded(optuna.samplers.BaseSampler):
    """``config.sampler`` seeded anew for each trial with ``config.seed`` + the trial's number. The storage gives
    each trial its own number, so workers started together on one study, or a study resumed, draw different
    parameters (one seed per process would make every worker that opened the study with the same trial count
    draw the same ones), and each trial's draw is the same whoever runs it. TPE reads the history from the
    study, so a fresh sampler per trial loses nothing."""

    def __init__(self, config: TuneConfig) -> None:
        self.config = config
        self.inner = make_sampler(config, config.seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner = make_sampler(self.config, self.config.seed + trial.number)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_pruner(config: TuneConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "none" or config.multi:
        return optuna.pruners.NopPruner()
    if config.pruner == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=config.startup_trials)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.MedianPruner(n_startup_trials=config.startup_trials)


def retry() -> Callable[[optuna.Study, FrozenTrial], None]:
    """Queue a failed trial again with its parameters and attributes, at most twice per trial."""
    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


def storage_for(url: str, config: TuneConfig, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on ``url``. Two processes opening a new database at once race to create its
    tables ("table ... already exists" for the loser) or to stamp its schema version (a UNIQUE failure on
    ``alembic_version``): the loser opens it again, now that the winner has made it."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental; it is what resuming relies on
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=config.heartbeat_seconds, grace_period=2 * config.heartbeat_seconds,
                    heartbeat_stale_trial_callback=retry())
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as err:
            lost_race = "already exists" in str(err) or "alembic_version" in str(err)
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(url: str, name: str, config: TuneConfig, stream: dict[str, Any] | None = None) -> optuna.Study:
    """Create the study, or load it to continue; a study made with another objective, or on another stream
    (``stream``: ``stream_identity`` of the stream the trials run, when given), is refused."""
    study = optuna.create_study(storage=storage_for(url, config), study_name=name, directions=config.directions,
                                pruner=make_pruner(config), load_if_exists=True)
    settings = {"objective": config.objective, "forgetting_weight": config.forgetting_weight}
    saved = {k: study.user_attrs.get(k) for k in settings}
    if all(v is None for v in saved.values()):
        for key, value in settings.items():
            study.set_user_attr(key, value)
    elif saved != settings:
        raise ValueError(f"study {name!r} in {url} was made with {saved}, not {settings}: its values are not "
                         "comparable; give another --study-name or the study's own tune settings")
    if stream is not None:
        check_stream(study, name, stream)
    check_space(study, name, config)
    retry_dead_trials(study)
    # neither a resumed study nor another worker on it may draw the same parameters again: seed by trial number
    study.sampler = TrialSeeded(config)
    return study


def stream_identity(stream: StreamSpec, data_dir: str | Path | None) -> dict[str, Any]:
    """What a trial's values depend on besides its parameters: the skills that run (sources, slices, sizes,
    formats), the chunks, and the ``system``/``training`` sections the parameters overlay. A file source and a
    local model folder count by name, so the same stream continued from another folder or host is the same."""
    data = json.loads(json.dumps(stream.to_dict(), default=str))
    skills = [s for s, spec in zip(data["skills"], stream.skills, strict=True) if spec in stream.active(data_dir)]
    for skill in skills:
        if skill["source"].get("path"):
            skill["source"]["path"] = Path(skill["source"]["path"]).name
    system = dict(data["system"])
    if isinstance(system.get("model"), str) and Path(system["model"]).is_absolute():
        system["model"] = Path(system["model"]).name
    return {"skills": skills, "chunks": data["chunks"], "system": system, "training": data["training"]}


def check_stream(study: optuna.Study, name: str, stream: dict[str, Any]) -> None:
    """Refuse to add trials on another stream than the one the study's trials ran (other skills, slices or
    sections: their values would be compared with values measured on other data). A study made before streams
    were recorded takes this one."""
    saved = study.user_attrs.get("stream")
    if saved is None:
        study.set_user_attr("stream", stream)
        return
    changed = [key for key in stream if saved.get(key) != stream[key]]
    if changed:
        raise ValueError(f"study {name!r} was run on another stream: its {', '.join(changed)} differ from this "
                         "stream's (or --model, --max-train, --data-dir changed what runs); the trials' values are "
                         "not comparable: give another --study-name (or --out), or the study's own stream and "
                         "options")


def check_space(study: optuna.Study, name: str, config: TuneConfig) -> None:
    """Refuse a search space that Optuna cannot continue the study's trials with, so every new trial would fail:
    a categorical parameter whose choices changed, a parameter that changed kind (choices <-> range, integer <->
    real) or scale (``log``). The ends and step of a range may change."""
    wanted = {p.name: p.distribution() for p in config.params}
    for trial in study.get_trials(deepcopy=False):
        for param, dist in trial.distributions.items():
            if param not in wanted:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(dist, wanted[param])
            except ValueError:
                raise ValueError(f"study {name!r} drew {param} from {distribution_text(dist)}, the space now "
                                 f"gives {distribution_text(wanted[param])}: Optuna cannot change a parameter's "
                                 "choices, kind or log scale within a study; give another --study-name (or --out), "
                                 "or the study's own setting") from None


def distribution_text(dist: optuna.distributions.BaseDistribution) -> str:
    """A distribution as the space's YAML gives it: ``choices [4, 8]``, ``an integer range 2..8 (log)``."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    kind = "an integer range" if isinstance(dist, optuna.distributions.IntDistribution) else "a range"
    return f"{kind} {dist.low}..{dist.high}" + (" (log)" if dist.log else "")


def claim(trial: optuna.Trial) -> None:
    """Record which process runs ``trial`` (host and pid), so that a rerun can tell a trial whose process is gone
    at once, without waiting for its heartbeat to go stale (``retry_dead_trials``)."""
    trial.set_user_attr(OWNER, {"host": socket.gethostname(), "pid": os.getpid()})


def retry_dead_trials(study: optuna.Study) -> list[int]:
    """Fail the ``RUNNING`` trials whose process, on this host, no longer exists (killed, then rerun before
    the heartbeat went stale) and queue each again with its parameters and attributes (``retry``, as the
    heartbeat does); returns their numbers. Trials of live processes, or of other hosts, are left to the heartbeat."""
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER) or {}
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int) or alive(owner["pid"]):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process, restarted at the same moment, failed it first and queues it again
        failed = copy.deepcopy(trial)  # the retry reads its parameters and attributes, not its state
        failed.user_attrs = {k: v for k, v in failed.user_attrs.items() if k != OWNER}  # the retry's is its own
        retry()(study, failed)  # what the heartbeat does with a stale trial: the same parameters, queued again
        dead.append(trial.number)
    if dead:
        logger.warning("trial(s) %s were left running by a process that is gone: queued again with their "
                       "parameters", dead)
    return dead


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def enqueue_baseline(study: optuna.Study, config: TuneConfig, system: dict[str, Any],
                     training: dict[str, Any]) -> None:
    """The stream's own configuration as a trial, once per study (marked ``baseline`` in its user attrs). A
    baseline that failed (interrupted with Ctrl-C, or a cause fixed since) and is not queued again is queued anew,
    as the rest of a study is run by a rerun."""
    if not config.baseline:
        return
    baselines = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")]
    if any(t.state != TrialState.FAIL for t in baselines):  # finished, running or queued
        return
    # a failed baseline holds the same parameters: Optuna's skip_if_exists would take it for a repeat
    study.enqueue_trial(baseline_params(config, system, training), user_attrs={"baseline": True},
                        skip_if_exists=not baselines)


def run_study(study: optuna.Study, objective: Callable, n_trials: int,
              callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None) -> int:
    """Run trials until the study holds ``n_trials`` finished (complete or pruned) ones; returns how many this
    call ran. A trial whose configuration is invalid fails with its message and the search goes on."""
    todo = n_trials - finished(study)
    if todo <= 0:
        return 0
    before = started(study)
    study.optimize(objective, n_trials=todo, catch=(ValueError,), gc_after_trial=True,
                   callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED), *(callbacks or [])])
    return started(study) - before


def started(study: optuna.Study) -> int:
    return sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))


def best_trial(study: optuna.Study, forgetting_weight: float) -> FrozenTrial | None:
    """The single best trial: ``study.best_trial``, or in a Pareto study the front's trial with the lowest
    weighted objective (what ``best.yaml`` holds)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return min(study.best_trials, key=lambda t: t.values[0] + forgetting_weight * t.values[1])


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get("baseline")]
    return done[0] if done else None
