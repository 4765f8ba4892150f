"""The ``dylora`` command line: ``main(argv) -> int``.

    dylora train --stream configs/streams/default.yaml --out runs/demo [--data-dir ../shared/data]
    dylora train --stream my.yaml --out runs/x --dry-run        # validate the stream and its data only
    dylora train --resume runs/demo                              # continue after the last completed step
    dylora experts list runs/demo; dylora skills history runs/demo 0
    dylora serve runs/demo [--host 127.0.0.1 --port 8000]        # OpenAI-compatible HTTP server
    dylora tune --stream S.yaml --trials 8 --out runs/tune       # hyperparameter search (Optuna) -> best.yaml
    dylora train --stream S.yaml --params runs/tune/best.yaml --out runs/best   # train with the tuned values
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .checkpoint import FolderBusy, writer_lock
from .data.stream import StreamSpec, load_stream, with_params
from .registry_cli import RegistryBehind, experts, mirror_pool, skills
from .registry_cli import add_parsers as add_registry_parsers
from .serving.cli import add_parser as add_serve_parser
from .tuning.cli import add_parser as add_tune_parser

RUN_OPTIONS = ("model", "data_dir", "seed_steps", "consolidation_steps", "max_train", "freeform_limit",
               "freeform_tokens")
FREEFORM_LIMIT = 8
RESUME_DEFAULTS = {"freeform_limit": FREEFORM_LIMIT}  # the parser's defaults of RUN_OPTIONS that are not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dylora", description="Continual skill acquisition with LoRA experts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a skill stream through the model and write a report")
    train.add_argument("--stream", type=Path, help="stream YAML (see configs/streams/)")
    train.add_argument("--out", type=Path, help="output folder (report, plots, logs, events, system, store)")
    train.add_argument("--resume", type=Path, default=None, metavar="DIR",
                       help="continue the run in DIR after its last completed step (same stream and options)")
    train.add_argument("--model", default=None, help="HF model id, local folder or 'default' (overrides the stream)")
    train.add_argument("--data-dir", default=None, help="folder with datasets for builtin sources (../shared/data)")
    train.add_argument("--dry-run", action="store_true", help="validate the stream and load its data, no training")
    train.add_argument("--params", type=Path, default=None, metavar="FILE",
                       help="apply tuned values: the `params:` section of a `dylora tune` best.yaml")
    train.add_argument("--seed-steps", type=int, default=None, help="override training.seed_steps")
    train.add_argument("--consolidation-steps", type=int, default=None, help="override training.consolidation_steps")
    train.add_argument("--max-train", type=int, default=None, help="cap training examples per skill")
    train.add_argument("--freeform-limit", type=int, default=FREEFORM_LIMIT, metavar="N",
                       help="free-form requests per skill asked at the end, chat and raw, system and frozen "
                            "model (0: skip)")
    train.add_argument("--freeform-tokens", type=int, default=None, metavar="N",
                       help="generation length of the free-form answers (default: each set's own, 96; 64 for "
                            "shell)")
    add_registry_parsers(sub)
    add_serve_parser(sub)
    add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = "dylora " + " ".join(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    quiet_libraries()
    try:
        if args.command == "train":
            return train(args, Console())
        if args.command == "experts":
            return experts(args, Console())
        if args.command == "skills":
            return skills(args, Console())
        if args.command == "tune":
            from .tuning.cli import tune

            return tune(args, Console())
        if args.command == "serve":
            from .serving.cli import serve

            return serve(args)
    except (ValueError, FileNotFoundError, KeyError, FolderBusy, RegistryBehind) as err:
        shown = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) is its repr
        console.print(f"[red]error:[/] {shown}", soft_wrap=True, markup=True)
        record_error(args, err)
        return 2
    except OSError as err:  # the machine's, not the input's: a full disk, a folder without write permission
        console.print(f"[red]error:[/] {err} (free space or fix permissions, then run the command again; "
                      "saved state is left as it was)", soft_wrap=True, markup=True)
        with contextlib.suppress(OSError):  # the event log may be on the full disk too
            record_error(args, err)
        return 2
    return 0


def quiet_libraries() -> None:
    """Our own progress display replaces the libraries' per-file bars (tokenising, loading weights); a deprecation
    one library hits in another (peft reading transformers' ``is_gradient_checkpointing`` on every expert pool it
    builds) is no concern of the command's user."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def record_error(args: argparse.Namespace, err: Exception) -> None:
    """Append the error to the run's event log when the run has an output folder (to the file only: the console
    has shown the error already)."""
    out = getattr(args, "out", None)
    if out is not None and Path(out).is_dir():
        from .events import ERROR, EventLog
        from .events import logger as event_logger

        event_logger.disabled = True
        try:
            EventLog(Path(out) / "events.jsonl").emit(ERROR, command=args.command, error=str(err),
                                                       kind=type(err).__name__)
        finally:
            event_logger.disabled = False


def resolve_run(args: argparse.Namespace) -> None:
    """Set up ``args`` for a new run or a resumed one.

    ``--resume DIR`` reuses the stream and options the run in DIR was started with; a new run records them. What
    goes into the run folder (``stream.yaml``, ``run.json``) is left in ``args.run_files`` and written by
    ``train_loop`` once it holds the folder's writer lock and the model has loaded: a second writer that is refused,
    or a model that cannot be loaded, changes nothing."""
    args.run_files = {}
    if args.resume is not None:
        if args.params is not None:
            raise ValueError("--params applies to a new run; a resumed run keeps the values it started with")
        if args.stream is not None or (args.out is not None and args.out.resolve() != args.resume.resolve()):
            given = "--stream" if args.stream is not None else "--out"
            raise ValueError(f"--resume continues the run in {args.resume} with the stream it started with "
                             f"({args.resume / 'stream.yaml'}) and writes there; drop {given} (another stream or "
                             "folder is a new run: --stream and --out without --resume)")
        run_file = args.resume / "run.json"
        if not run_file.is_file():
            raise FileNotFoundError(f"{args.resume} has no run.json: it is not a `dylora train` output folder")
        from .checkpoint import read_json

        saved = read_json(run_file)
        if not isinstance(saved, dict):
            raise ValueError(f"{run_file} is corrupt (not a mapping of the run's options); restore it from a copy, "
                             "or start the stream again with a new --out")
        given = [k for k in RUN_OPTIONS if k != "data_dir" and getattr(args, k) not in (None, RESUME_DEFAULTS.get(k))
                 and getattr(args, k) != saved.get(k, getattr(args, k))]
        if given:
            raise ValueError(f"--resume keeps the options the run started with; drop {', '.join(given)} (a "
                             "different setting is a new run: --stream and another --out)")
        data_dir = args.data_dir  # the data may have moved since: a folder given now is where it is
        args.out, args.stream = args.resume, args.resume / "stream.yaml"
        for key in RUN_OPTIONS:
            if key in saved:  # runs started before an option existed keep its default
                setattr(args, key, saved[key])
        if data_dir is not None and data_dir != saved.get("data_dir"):
            args.data_dir = data_dir
            saved["data_dir"] = data_dir
            args.run_files = {run_file: json.dumps(saved, indent=2)}
        return
    if args.stream is None or args.out is None:
        raise ValueError("give --stream and --out for a new run, or --resume DIR to continue one")
    if args.max_train is not None and args.max_train < 1:
        raise ValueError(f"--max-train must be >= 1 (or left out for each skill's own cap), got {args.max_train}")
    if args.freeform_limit < 0:  # a negative slice would drop the last requests instead of asking none
        raise ValueError(f"--freeform-limit must be >= 0 (0: skip the free-form requests), got {args.freeform_limit}")
    if args.freeform_tokens is not None and args.freeform_tokens < 1:  # refused before any training
        raise ValueError(f"--freeform-tokens must be >= 1 (or left out for each set's own), got "
                         f"{args.freeform_tokens}")
    if args.dry_run:
        return
    if (args.out / "run.json").is_file():
        raise ValueError(f"{args.out} already holds a run: continue it with --resume {args.out}, "
                         "or choose another --out")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise ValueError(f"--out {args.out} is a file or under one: give a folder (a new one, or one without a "
                         "run)") from err
    # the stream as loaded (file paths made absolute), so --resume reads the same data from any folder; run.json
    # marks the folder as a run, so it is written last (dicts keep their order)
    args.run_files = {args.out / "stream.yaml": yaml.safe_dump(read_stream(args).to_dict(), sort_keys=False),
                      args.out / "run.json": json.dumps({k: getattr(args, k) for k in RUN_OPTIONS}, indent=2)}


def write_run_files(files: dict[Path, str]) -> None:
    """Write each file atomically, in order (a killed start leaves no run.json)."""
    from .checkpoint import write_text_atomic

    for path, text in files.items():
        write_text_atomic(path, text)


def read_stream(args: argparse.Namespace) -> StreamSpec:
    """The stream file with ``--params`` (tuned values, dotted names) applied over its sections."""
    stream = load_stream(args.stream)
    if getattr(args, "params", None) is not None:
        from .tuning.params import load_params

        with_params(stream, load_params(args.params))
    return stream


def train(args: argparse.Namespace, console: Console) -> int:
    from .backbone import absolute_if_local
    from .config import DyLoRAConfig
    from .data.stream import check_pools, load_examples, poolable, split_examples
    from .training.config import TrainingConfig

    def configs(stream: StreamSpec, options: bool = True) -> tuple[DyLoRAConfig, TrainingConfig]:
        system = DyLoRAConfig.from_dict({**stream.system, **({"model": args.model} if args.model else {})})
        system.model = absolute_if_local(system.model)  # a relative folder is recorded as found from here
        overrides = {k: v for k, v in (("seed_steps", args.seed_steps),
                                       ("consolidation_steps", args.consolidation_steps)) if v is not None}
        return system, TrainingConfig.from_dict({**stream.training, **(overrides if options else {})})

    def named_configs(stream: StreamSpec) -> tuple[DyLoRAConfig, TrainingConfig]:
        try:
            return configs(stream)
        except ValueError as err:
            raise ValueError(config_error(args, err, configs)) from err

    # a new run's bad stream, params file or config value fails before anything is written
    if args.stream is not None and args.resume is None:
        named_configs(read_stream(args))
        if not args.dry_run:  # and so does data that cannot be read (the dry run shows it)
            check_data(read_stream(args), args.data_dir, args.max_train)
    resolve_run(args)
    stream = read_stream(args) if args.resume is None else load_stream(args.stream)
    system, training = named_configs(stream)
    skills = stream.active(args.data_dir)
    skipped = [s.name for s in stream.skills if s not in skills]
    if skipped:
        console.print(f"skipping {', '.join(skipped)}: they need --data-dir")
    if args.max_train is not None:
        for s in skills:
            s.max_train = min(s.max_train or args.max_train, args.max_train)
    if args.dry_run:
        table = Table(title=f"stream {stream.name} (dry run)")
        for col in ("step", "skill", "source", "examples", "train", "eval"):
            table.add_column(col)
        available = {}
        for i, s in enumerate(skills):
            examples = load_examples(s, args.data_dir)
            tr, ev = split_examples(examples, s.eval_share, s.name)
            available[s.name] = len(poolable(tr[: s.max_train]))
            table.add_row(str(i), s.name, s.source.name or s.source.path or "", str(len(examples)),
                          str(len(tr[: s.max_train])), str(len(ev[: s.max_eval])))
        console.print(table)
        if stream.mixed:
            check_pools(stream.chunks, available)
        console.print(f"model {system.model}; training {training}")
        return 0
    return run_training(args, stream, system, training, console)


def config_error(args: argparse.Namespace, err: ValueError, configs) -> str:
    """The message of a value ``configs(stream, options)`` refuses, with where it came from and the fix: the command's
    ``--seed-steps``/``--consolidation-steps`` (which override both files), the ``--params`` file, or else the stream
    file. A source is to blame when the configs build with its values at the library defaults."""
    from .tuning.params import apply_params, defaults, load_params

    def builds(params: dict, options: bool) -> bool:
        stream = read_stream(args)
        stream.system, stream.training = apply_params(stream.system, stream.training, params)
        try:
            configs(stream, options)
        except ValueError:
            return False
        return True

    given = {key: value for key in ("seed_steps", "consolidation_steps") if (value := getattr(args, key)) is not None}
    if given and builds({f"training.{key}": defaults()[f"training.{key}"] for key in given}, options=False):
        shown = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in given.items())
        return f"{err} (given as {shown}): pass another value, or leave the option out to keep the stream's"
    params = load_params(args.params) if getattr(args, "params", None) is not None else {}
    if params and builds({name: defaults()[name] for name in params}, options=True):
        return (f"{args.params}: {err}: fix the value in this params file's `params:` section (or drop its line to "
                "keep the stream's value)")
    return f"{args.stream}: {err}: fix the value in this stream file"


def check_data(stream: StreamSpec, data_dir: Path | None, max_train: int | None) -> None:
    """Read and split every active skill's examples as the run will, so that a missing file or column, a source
    that needs --data-dir or a mixed stream's short pool fails before the run folder is written, and the fixed
    stream can be run again with the same --out."""
    from .data.stream import check_pools, load_examples, poolable, split_examples

    available = {}
    for s in stream.active(data_dir):
        train, _ = split_examples(load_examples(s, data_dir), s.eval_share, s.name)
        cap = min(s.max_train or max_train, max_train) if max_train is not None else s.max_train
        available[s.name] = len(poolable(train[:cap]))
    if stream.mixed:
        check_pools(stream.chunks, available)


def run_training(args, stream, system, training, console: Console) -> int:
    """Under torchrun/accelerate every process runs the loop (the Trainer syncs the experts with DDP); only the
    main process writes events, checkpoints, the store and the report. After every step the system and the
    loop's progress are checkpointed together in ``OUT/system``, so ``--resume`` loses no completed step."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=system.device == "cpu" or not torch.cuda.is_available())
    main_process = state.is_main_process
    if not main_process:
        return train_loop(args, stream, system, training, console, state)
    with writer_lock(args.out / "system", who="dylora train"):  # one writer per system folder
        return train_loop(args, stream, system, training, console, state)


def train_loop(args, stream, system, training, console: Console, state) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .evaluation.report import write_report
    from .model import DyLoRAMoE
    from .store import SkillStore
    from .training.loop import ContinualLearner
    from .training.progress import has_progress, restore_progress, save_progress

    main_process = state.is_main_process
    console.quiet = not main_process
    start = time.perf_counter()
    checkpoint = args.out / "system"
    resuming = has_progress(checkpoint)
    if stream.mixed and resuming:
        raise ValueError(f"{args.out} holds an interrupted mixed-stream run, which cannot be resumed (the novelty "
                         "buffer is not checkpointed): start it again with a new --out")
    with console.status(f"loading {system.model} (the first run converts the default model, ~20 s)"):
        model = DyLoRAMoE.from_pretrained(checkpoint) if resuming else DyLoRAMoE.from_config(system)
    model.eval()
    if main_process:  # once the model loads: a model that does not leaves no run to --resume, fixed by a rerun
        write_run_files(args.run_files)
    store = SkillStore(args.out / "store.db") if main_process else None
    if main_process:
        model.events.attach_file(args.out / "events.jsonl")
        model.events.subscribe(store.record_event)
    if stream.mixed:
        return run_mixed(args, stream, system, model, training, console, start)
    learner = ContinualLearner(model, stream, training, args.out, data_dir=args.data_dir)
    done = restore_progress(learner, checkpoint) if resuming else 0
    if resuming and main_process:
        repair_store(store, learner, checkpoint, console)
    console.print(f"loaded {system.model} on {model.device} in {time.perf_counter() - start:.1f}s"
                  + (f"; resuming after step {done}" if resuming else ""))
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("stream", total=len(learner.skills), completed=done)

        def say(message: str) -> None:
            progress.update(task, description=message)
            progress.console.print(message)

        for i in range(done, len(learner.skills)):
            record = learner.run_step(i, say)
            if main_process:
                save_progress(learner, checkpoint)
                register_step(store, learner, record, checkpoint)
                mirror_pool(store, model, checkpoint)  # experts merged to keep max_experts, and their sources
            state.wait_for_everyone()
            progress.advance(task)
    if not main_process:
        return 0
    freeform = freeform_evaluation(args, learner, console)
    seconds = time.perf_counter() - start
    summary = write_report(args.out, learner.records, stream=stream.name, model=system.model,
                           experts=model.experts.expert_ids, seconds=seconds, sources=DATA_NOTE, freeform=freeform,
                           merges=learner.merges, labels=[s.label for s in learner.skills[: len(learner.records)]])
    console.print(summary_table(summary))
    console.print(f"[bold]done in {seconds:.0f}s[/]: {summary['experts']} experts, routing accuracy "
                  f"{summary['routing_accuracy']:.3f}, BWT {summary['bwt_loss']:+.4f} nats")
    console.print(f"report: {args.out / 'report.md'}; system: {checkpoint}; store: {args.out / 'store.db'}")
    return 0


def run_mixed(args, stream, system, model, training, console: Console, start: float) -> int:
    """A mixed stream (``chunks``): sort each chunk into skills, train, evaluate; report and save at the end."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .evaluation.mixed import write_mixed_report
    from .training.mixed import MixedLearner

    learner = MixedLearner(model, stream, training, args.out, data_dir=args.data_dir)
    console.print(f"loaded {system.model} on {model.device} in {time.perf_counter() - start:.1f}s; mixed stream of "
                  f"{learner.total} chunks over {len(learner.skills)} skill pools (labels used for scoring only)")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("chunks", total=learner.total)

        def say(message: str) -> None:
            progress.update(task, description=message)
            progress.console.print(message)

        for i in range(learner.total):
            learner.run_step(i, say)
            progress.advance(task)
    model.save_pretrained(args.out / "system")
    seconds = time.perf_counter() - start
    summary = write_mixed_report(args.out, learner.records, [s.name for s in learner.skills], stream=stream.name,
                                 model=system.model, seconds=seconds)
    console.print(f"[bold]done in {seconds:.0f}s[/]: {summary['experts']} experts for {summary['true_skills']} "
                  f"skills, purity {summary['purity']:.3f}, ARI {summary['adjusted_rand_index']:.3f}, mean final "
                  f"loss {summary['mean_final_loss']:.4f}, forgetting {summary['forgetting']:.4f} nats")
    console.print(f"report: {args.out / 'report.md'}; system: {args.out / 'system'}")
    return 0


def freeform_evaluation(args, learner, console: Console) -> list:
    """Requests of each skill's domain from another source, answered by the trained system and the frozen
    model (``evaluation/freeform.py``)."""
    from .evaluation.freeform import evaluate_stream, trained_examples

    if not args.freeform_limit:
        return []
    seen = trained_examples(learner.skills, args.data_dir)
    with console.status("free-form requests: trained system and frozen model, chat and raw"):
        return evaluate_stream(learner.model, learner.skills, seen, data_dir=args.data_dir,
                               limit=args.freeform_limit, max_new_tokens=args.freeform_tokens)


def register_step(store, learner, record, checkpoint: Path) -> None:
    """Mirror a checkpointed step into the store: skill, its data as a new version, the expert's row."""
    model, data = learner.model, learner.steps[record.step]
    novelty = record.novelty
    skill = model.library.skills[novelty.skill_id]
    store.add_skill(skill.skill_id, skill.name, skill.embedding.numpy())
    store.add_skill_data(skill.skill_id, [(e.prompt, e.response) for e in data.train], novelty.expert_id)
    peft_config = model.experts.peft_model.peft_config[f"expert_{novelty.expert_id}"].to_dict()
    store.register_expert(
        novelty.expert_id, skill_id=skill.skill_id, lora_config=json.loads(json.dumps(peft_config, default=str)),
        storage_path=str(checkpoint / "experts" / f"expert_{novelty.expert_id}"), rank=novelty.rank,
        maturity_state=int(model.router.expert_maturity[model.column(novelty.expert_id)]),
        training={"step": record.step, "skill": record.skill, "train_seconds": record.train_seconds,
                  "examples": record.train_examples, "novel": novelty.is_novel},
        eval_metrics={"loss": record.losses[record.step]})


def repair_store(store, learner, checkpoint: Path, console: Console) -> None:
    """A run killed between a step's checkpoint and its store write left the store a step behind: register
    the checkpointed steps it lacks (their data was re-read by ``restore_progress``), then reconcile the rest.
    A step whose expert or skill is gone since (``dylora experts delete|merge|prune`` on a paused run) is not
    registered again: the store already records what replaced it."""
    from .store.reconcile import reconcile

    model = learner.model
    registered = {entry.get("step") for row in store.experts() for entry in row.training_history}
    for record in learner.records:
        gone = (record.novelty.expert_id not in model.experts.expert_ids
                or record.novelty.skill_id not in model.library.skills)
        if record.step not in registered and not gone:
            register_step(store, learner, record, checkpoint)
            console.print(f"store: registered step {record.step} ({record.skill}), checkpointed but not registered")
    for line in reconcile(store, learner.model, checkpoint):
        console.print(f"store: {line}")


def summary_table(summary: dict) -> Table:
    table = Table(title=f"{summary['stream']}: loss after the whole stream")
    for col in ("step", "skill", "novel", "expert", "loss just learned", "final loss", "routed right"):
        table.add_column(col)
    last = summary["loss_matrix"][-1]
    for j, skill in enumerate(summary["skills"]):
        table.add_row(str(j), skill, "yes" if summary["novel"][j] else "no", str(summary["expert_of_skill"][j]),
                      f"{summary['loss_matrix'][j][j]:.3f}", f"{last[j]:.3f}",
                      f"{summary['routing_accuracy_per_skill'][j]:.2f}")
    return table


DATA_NOTE = ("HumanEval (MIT, openai/human-eval); VerilogEval (Apache-2.0, NVIDIA); MBPP (CC-BY-4.0, "
             "google-research); HumanEval-X (Apache-2.0, THUDM/CodeGeeX); Spider (CC BY-SA 4.0) in InterCode form "
             "(MIT); NL2Bash (MIT, TellinaTool); CodeAlpaca (CC BY-NC 4.0). "
             "Each is used only when the stream names it.")


if __name__ == "__main__":
    sys.exit(main())
