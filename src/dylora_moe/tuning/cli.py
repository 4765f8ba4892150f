"""``dylora tune``: search the loop's hyperparameters on a stream, keep the study in the store, write the best.

    dylora tune --stream configs/streams/tune-shared-code.yaml --data-dir ../shared/data --trials 8 --out runs/tune
    dylora tune --stream S.yaml --trials 12 --out runs/tune       # the same again: resumes, runs 4 more trials
    dylora tune --stream S.yaml --trials 40 --out runs/tune --storage postgresql+psycopg://me@db/dylora  # shared
    dylora train --stream configs/streams/shared-code.yaml --params runs/tune/best.yaml --out runs/best

The search space, objective and pruner come from the stream's ``tune:`` section (``tuning/space.py``), or from
``--space FILE``; without either the default space is searched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..data.stream import StreamSpec, load_stream, read_yaml
from .space import TuneConfig, baseline_params, parse_tune


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="search hyperparameters on a stream (Optuna); writes a report and best.yaml")
    p.add_argument("--stream", type=Path, required=True, help="stream YAML; its `tune:` section is the search space")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="finished trials the study should hold (a rerun continues up to N)")
    p.add_argument("--out", type=Path, required=True, help="folder for the report, plots, best.yaml and store.db")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="SQLAlchemy URL of the study (default: the run's store, sqlite OUT/store.db)")
    p.add_argument("--study-name", default=None, metavar="NAME", help="study name (default: the stream's name)")
    p.add_argument("--space", type=Path, default=None, metavar="FILE",
                   help="YAML with the `tune:` settings, instead of the stream's section")
    p.add_argument("--data-dir", default=None, help="folder with datasets for builtin sources (../shared/data)")
    p.add_argument("--model", default=None, help="HF model id, local folder or 'default' (overrides the stream)")
    p.add_argument("--max-train", type=int, default=None, help="cap training examples per skill")


def prepare(args: argparse.Namespace) -> tuple[StreamSpec, TuneConfig]:
    """The stream (with the command's overrides) and the search settings; every problem fails here, before a
    study is touched."""
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    if args.max_train is not None and args.max_train < 1:  # 0 would leave every skill without training examples
        raise ValueError(f"--max-train must be >= 1 (or left out for each skill's own cap), got {args.max_train}")
    stream = load_stream(args.stream)
    if stream.mixed:  # a trial is the benchmark's step-by-step run: it would train the pools one after another
        raise ValueError(f"{args.stream} is a mixed stream (`chunks:`), which a trial cannot run: it runs a stream "
                         "skill by skill and would ignore the chunks; tune on a stream of the same skills without "
                         "`chunks:` and apply the tuned values with dylora train --stream "
                         f"{args.stream} --params OUT/best.yaml")
    if args.model:
        from ..backbone import absolute_if_local

        stream.system = {**stream.system, "model": absolute_if_local(args.model)}
    if args.max_train is not None:
        for s in stream.skills:
            s.max_train = min(s.max_train or args.max_train, args.max_train)
    if not stream.active(args.data_dir):
        raise ValueError(f"every skill of {args.stream} needs a data directory: pass --data-dir")
    from ..cli import check_data  # data that cannot be read would fail every trial, each with a traceback

    check_data(stream, args.data_dir, None)  # --max-train is applied to the skills above
    section = stream.tune
    if args.space is not None:
        data = read_yaml(args.space, "search-space file") or {}
        section = data.get("tune", data) if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise ValueError(f"{args.space}: expected a mapping (the `tune:` settings)")
    config = parse_tune(section, stream.system, stream.training)
    if config.baseline:  # the stream's own values must make a trial (enqueued once the study is open)
        baseline_params(config, stream.system, stream.training)
    return stream, config


def tune(args: argparse.Namespace, console: Console) -> int:
    import optuna
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from ..backbone import check_model
    from ..config import DyLoRAConfig
    from ..store import SkillStore
    from . import report
    from .objective import Objective
    from .study import enqueue_baseline, finished, open_study, run_study, stream_identity

    stream, config = prepare(args)
    if args.storage:
        try:
            shown = make_url(args.storage).render_as_string(hide_password=True)
        except ArgumentError as err:
            raise ValueError(f"--storage {args.storage!r} is not a SQLAlchemy URL ({err}); e.g. sqlite:///tune.db "
                             "or postgresql+psycopg://user@host/db") from err
    # a model that cannot be loaded would fail every trial, each with a traceback, in a study made for nothing
    check_model(DyLoRAConfig.from_dict(stream.system).model)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise ValueError(f"--out {args.out} is a file or under one: give a folder (a new one, or the study's to "
                         "continue it)") from err
    url = args.storage or SkillStore(args.out / "store.db").url  # the study lives beside the registry
    shown = shown if args.storage else str(args.out / "store.db")
    name = args.study_name or stream.name
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    try:
        study = open_study(url, name, config, stream_identity(stream, args.data_dir))
    except SQLAlchemyError as err:  # an unknown driver, an unreachable server, a folder that does not exist
        raise ValueError(f"cannot open the study storage {shown}: {err}") from err
    enqueue_baseline(study, config, stream.system, stream.training)
    done = finished(study)
    console.print(f"study {name!r} in {shown}: {done} finished trial(s), target {args.trials}; "
                  f"objective {config.objective}, {len(config.params)} parameter(s)")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(describe(study, config, args.trials), total=args.trials,
                                 completed=min(done, args.trials))

        def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            progress.update(task, completed=min(finished(study), args.trials),
                            description=describe(study, config, args.trials))
            progress.console.print(f"trial {trial.number} {trial.state.name.lower()}"
                                   + (f": {trial.values}" if trial.values else ""))

        objective = Objective(stream, config, args.out, data_dir=args.data_dir, progress=progress.console.print)
        ran = run_study(study, objective, args.trials, callbacks=[on_trial])
    data = report.write(args.out, study, config, stream, storage=shown, command=args.command_line)
    best = data["best"]
    console.print(f"ran {ran} trial(s); best: " + (f"trial {best['number']} {best['values']}" if best else "none yet"))
    console.print(f"report: {args.out / 'tune-report.md'}" + (f"; best: {args.out / 'best.yaml'}" if best else ""))
    done = finished(study)
    if done < args.trials:  # failed trials (their messages are above): the study is short of what was asked
        console.print(f"[red]the study holds {done} of {args.trials} finished trials[/]: the failed ones' messages "
                      "are above; fix their cause and rerun the command to run the rest")
        return 1
    return 0


def describe(study, config: TuneConfig, total: int) -> str:
    """``trial n of N, best so far``, for the progress line."""
    from .study import best_trial, finished

    best = best_trial(study, config.forgetting_weight)
    shown = "" if best is None else f", best so far {best.values[0]:.4f} (trial {best.number})"
    return f"trial {min(finished(study) + 1, total)} of {total}{shown}"
