"""``dylora experts ...`` and ``dylora skills ...``: inspect and manage a run's registry and saved experts.

    dylora experts list runs/demo
    dylora experts show runs/demo 1
    dylora experts export runs/demo 1 exported/verilog     # a peft adapter folder (peft, vLLM, ... load it)
    dylora experts delete runs/demo 1
    dylora experts merge runs/demo 1 3 --method cat   # two experts of one skill become one
    dylora experts prune runs/demo --below 0.01      # experts the gate sends under 1% of stored prompts
    dylora skills list runs/demo
    dylora skills history runs/demo 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table


class RegistryBehind(Exception):
    """A change saved in the system folder that the registry could not record: it is done, and must not be run
    again; the registry catches up with the folder at the run's next registry write."""


@contextlib.contextmanager
def registry_write(system: Path, done: str) -> Iterator[None]:
    """Mirror into the registry a change ``done`` that is already saved in ``system``: a failure here says so,
    rather than passing for a command that changed nothing and can be run again."""
    try:
        yield
    except Exception as err:
        raise RegistryBehind(f"{done}, saved in {system}, but the registry could not record it ({err}); do not "
                             "run the command again: the registry catches up with the folder at the next `dylora "
                             "experts delete|merge|prune`, `dylora train --resume` or `dylora serve` of the "
                             "run") from err


def add_parsers(sub) -> None:
    experts = sub.add_parser("experts", help="list, show, export, delete, merge or prune a run's experts")
    ex = experts.add_subparsers(dest="action", required=True)
    for action in ("list", "show", "export", "delete"):
        p = ex.add_parser(action)
        p.add_argument("run", type=Path, help="a `dylora train` output folder")
        if action != "list":
            p.add_argument("expert_id", type=int)
        if action == "export":
            p.add_argument("dest", type=Path, help="folder to write the peft adapter to")
    merge = ex.add_parser("merge", help="merge two experts into one (peft add_weighted_adapter)")
    merge.add_argument("run", type=Path, help="a `dylora train` output folder")
    merge.add_argument("expert_ids", type=int, nargs=2, metavar="EXPERT")
    merge.add_argument("--method", default="cat", help="cat (exact, ranks add up), svd, ties_svd, dare_ties_svd, ...")
    merge.add_argument("--rank", type=int, default=None, help="rank of an svd merge (default: the larger rank)")
    merge.add_argument("--density", type=float, default=None,
                       help="share of each delta's entries kept by ties_svd, dare_ties_svd, ... (required by them)")
    prune = ex.add_parser("prune", help="remove experts the gate sends almost no stored prompt to")
    prune.add_argument("run", type=Path, help="a `dylora train` output folder")
    prune.add_argument("--below", type=routing_share, required=True, metavar="SHARE",
                       help="routing share in [0, 1] under which an expert goes")
    skills = sub.add_parser("skills", help="list skills, show one, or its data history")
    sk = skills.add_subparsers(dest="action", required=True)
    for action in ("list", "show", "history"):
        p = sk.add_parser(action)
        p.add_argument("run", type=Path, help="a `dylora train` output folder")
        if action != "list":
            p.add_argument("skill_id", type=int)


def routing_share(text: str) -> float:
    """``--below``: a share in [0, 1], checked before the system is loaded."""
    from .experts.pool import check_share

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number: give a routing share in [0, 1], e.g. 0.01") from None
    try:
        return check_share(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def open_store(run: Path):
    from .store import SkillStore

    if not (run / "store.db").is_file():
        raise FileNotFoundError(f"{run} has no store.db: give a `dylora train` output folder")
    return SkillStore(run / "store.db")


def experts(args: argparse.Namespace, console: Console) -> int:
    store = open_store(args.run)
    if args.action == "list":
        table = Table(title=f"experts in {args.run}")
        for col in ("expert", "skill", "rank", "mature", "version", "eval loss", "weights"):
            table.add_column(col)
        names = {s.skill_id: s.name for s in store.skills()}
        for row in store.experts():
            present = (expert_folder(args.run, row.expert_id) / "adapter_model.safetensors").is_file()
            loss = row.eval_metrics.get("loss")
            table.add_row(str(row.expert_id), f"{row.skill_id}: {names.get(row.skill_id, '?')}", str(row.rank),
                          "yes" if row.maturity_state else "no", str(row.version),
                          "-" if loss is None else f"{loss:.3f}", "ok" if present else "[red]missing[/]")
        console.print(table)
        return 0
    if args.action in ("delete", "merge", "prune"):  # system and registry change together, one writer at work
        from .checkpoint import writer_lock

        with writer_lock(args.run / "system", who=f"dylora experts {args.action}"):
            if args.action == "delete":
                return delete(args.run, store, args.expert_id, console)
            return reshape(args, store, console)
    row = store.expert(args.expert_id)
    if args.action == "show":
        console.print_json(json.dumps({
            "expert_id": row.expert_id, "skill_id": row.skill_id, "rank": row.rank, "version": row.version,
            "maturity_state": row.maturity_state, "storage_path": row.storage_path,
            "created_at": str(row.created_at), "lora_config": row.lora_config,
            "training_history": row.training_history, "eval_metrics": row.eval_metrics}, default=str))
        return 0
    return export(row, args.dest, console, base_model=base_model(args.run / "system"),
                  source=expert_folder(args.run, row.expert_id))


def expert_folder(run: Path, expert_id: int) -> Path:
    """Where the run at ``run`` keeps an expert's weights: read from the run folder given, not from the path the
    registry recorded, so a run moved, copied or named from another directory finds its own files."""
    from .experts.manager import expert_name

    return run / "system" / "experts" / expert_name(expert_id)


def base_model(system: Path) -> str:
    """The backbone a system was built on, as another machine names it (see ``backbone.hub_id``)."""
    from .backbone import hub_id
    from .checkpoint import read_manifest

    return hub_id(read_manifest(system)["config"]["model"])


def export(row, dest: Path, console: Console, *, base_model: str, source: Path) -> int:
    """Copy the expert's peft adapter to ``dest``, its ``base_model_name_or_path`` set to ``base_model``: peft
    records the folder it loaded the backbone from (for the default model, a conversion cache under
    ``~/.cache``), which no other machine has."""
    from .checkpoint import check_adapter, read_json

    check_adapter(source)
    if dest.exists():
        raise ValueError(f"{dest} already exists: choose a new folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:  # a file where a folder of the path should be
        raise ValueError(f"cannot make {dest}: a part of its path is a file, not a folder; choose another "
                         "destination") from err
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        shutil.copy2(source / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
        config = read_json(source / "adapter_config.json")
        config["base_model_name_or_path"] = base_model
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves nothing half-written behind
        raise
    console.print(f"expert {row.expert_id} -> {dest} (load with PeftModel.from_pretrained(base_model, '{dest}'))")
    return 0


def delete(run: Path, store, expert_id: int, console: Console) -> int:
    """Remove the expert from the saved system (atomically, keeping the run's progress) and then from the
    registry; the skill data it was trained on stays, versioned, in the store."""
    from safetensors.torch import save_file

    from .checkpoint import load_tensors, read_manifest
    from .training.progress import MEMORY, PROGRESS
    from .training.rehearsal import RoutingMemory

    system = run / "system"
    held = read_manifest(system)["expert_ids"]  # the folder is the truth: the registry may be a write behind
    if expert_id not in held:
        raise KeyError(f"no expert with id {expert_id} in {system}; its experts are {held}")
    model = load_and_catch_up(system, store, console)
    model.delete_expert(expert_id)

    def keep_progress(folder: Path) -> None:
        # the routing memory lives beside the system whether a training run (progress.json) or the server
        # (uploads) wrote it: keep it without the deleted expert, or later uploads cannot rehearse
        if (system / PROGRESS).is_file():
            shutil.copy2(system / PROGRESS, folder / PROGRESS)
        if (system / MEMORY).is_file():
            memory = RoutingMemory()
            memory.load_tensors(load_tensors(system / MEMORY))
            memory.drop_expert(expert_id)
            save_file(memory.tensors(), str(folder / MEMORY))

    model.save_pretrained(system, extra=keep_progress)
    with registry_write(system, f"deleted expert {expert_id}"):
        store.delete_expert(expert_id)
    console.print(f"deleted expert {expert_id}; {model.num_experts} experts remain")
    return 0


def skills(args: argparse.Namespace, console: Console) -> int:
    store = open_store(args.run)
    if args.action == "list":
        table = Table(title=f"skills in {args.run}")
        for col in ("skill", "name", "versions", "examples", "experts"):
            table.add_column(col)
        for row in store.skills():
            history = store.history(row.skill_id)
            experts_of = sorted({h["expert_id"] for h in history if h["expert_id"] is not None})
            table.add_row(str(row.skill_id), row.name, str(len({h["version"] for h in history})),
                          str(sum(h["rows"] for h in history)), ", ".join(map(str, experts_of)))
        console.print(table)
        return 0
    row = store.skill(args.skill_id)
    if args.action == "history":
        table = Table(title=f"data versions of skill {row.skill_id} ({row.name})")
        for col in ("version", "examples", "expert", "created"):
            table.add_column(col)
        for h in store.history(row.skill_id):
            table.add_row(str(h["version"]), str(h["rows"]), str(h["expert_id"]), str(h["created_at"]))
        console.print(table)
        return 0
    data = store.skill_data(row.skill_id)
    console.print(f"skill {row.skill_id} ({row.name}), created {row.created_at}, {len(data)} examples")
    for item in data[:3]:
        console.print(f"[bold]v{item.version}[/] {item.input_data[:200]!r} -> {item.output_data[:200]!r}")
    return 0


def reshape(args: argparse.Namespace, store, console: Console) -> int:
    """``merge`` or ``prune`` on the saved system (atomically, with its routing memory and progress), then the
    registry: the merged expert registered with its lineage, the experts that went removed."""
    from safetensors.torch import save_file

    from .checkpoint import load_tensors, read_json
    from .experts import pool
    from .training.progress import MEMORY, PROGRESS
    from .training.rehearsal import RoutingMemory

    system = args.run / "system"
    if not (system / MEMORY).is_file():
        raise FileNotFoundError(f"{system} has no {MEMORY}: the gate cannot be refitted without the stored "
                                "routing features; give a folder written by `dylora train` or `dylora serve`")
    model = load_and_catch_up(system, store, console)
    memory = RoutingMemory()
    memory.load_tensors(load_tensors(system / MEMORY))
    training = run_training(args.run)  # the gate is refitted as the run's own fits are
    fit = {"fit_steps": training.router_fit_steps, "fit_decay": training.router_weight_decay}
    if args.action == "merge":
        a, b = args.expert_ids
        merged = pool.merge(model, memory, a, b, method=args.method, rank=args.rank, density=args.density, **fit)
        moved, message = {a: merged, b: merged}, f"merged experts {a} and {b} into expert {merged} ({args.method})"
    else:
        known = bool(pool.routing_shares(model, memory))
        pruned = pool.prune(model, memory, args.below, **fit)
        moved = {e: into for e, into in pruned if into is not None}
        if pruned:
            message = "pruned " + ", ".join(f"expert {e} (skills now served by {into})" for e, into in pruned)
        elif not known:
            message = (f"nothing: {system / MEMORY} holds no stored prompt of this pool's experts, so no expert's "
                       "traffic is known (train or serve the system first)")
        elif model.num_experts <= 1:
            message = "nothing: the last expert is never pruned"
        else:
            message = f"nothing: every expert gets at least {args.below:g} of the traffic"

    def keep_state(folder: Path) -> None:
        if (system / PROGRESS).is_file():  # a run's progress learns where its skills' experts went
            progress = read_json(system / PROGRESS)
            progress["merges"] = {**progress.get("merges", {}), **{str(k): v for k, v in moved.items()}}
            (folder / PROGRESS).write_text(json.dumps(progress, indent=2), encoding="utf-8")
        save_file(memory.tensors() or {}, str(folder / MEMORY))

    model.save_pretrained(system, extra=keep_state)
    with registry_write(system, message):
        mirror_pool(store, model, system)
    console.print(f"{message}; {model.num_experts} experts remain")
    return 0


def run_training(run: Path):
    """The training configuration of the run in ``run`` (its ``stream.yaml``, as ``dylora train`` recorded it);
    the defaults for a folder without one (a system written by ``dylora serve``)."""
    from .data.stream import load_stream
    from .training.config import TrainingConfig

    stream = run / "stream.yaml"
    return TrainingConfig.from_dict(load_stream(stream).training) if stream.is_file() else TrainingConfig()


def load_and_catch_up(system: Path, store, console: Console):
    """The saved system, with the registry first brought in line with it (``reconcile``): a merge or prune killed
    between its save and its registry write left the registry a write behind (the merged expert missing, its
    sources listed), and this write would otherwise build on that."""
    from .model import DyLoRAMoE
    from .store.reconcile import reconcile

    model = DyLoRAMoE.from_pretrained(system)
    for change in reconcile(store, model, system):
        console.print(f"registry: {change}")
    return model


def mirror_pool(store, model, system: Path) -> None:
    """After a merge or prune saved in ``system``: register each merged expert the registry lacks, with its
    lineage (``merged_from``, method; the manifest keeps it too, for ``reconcile`` after a crash), and remove
    the rows of experts no longer in the system."""
    known = {row.expert_id for row in store.experts()}
    for expert_id, lineage in model.experts.lineage.items():
        if expert_id in known:
            continue
        name = f"expert_{expert_id}"
        skill = next((s.skill_id for s in model.library.skills.values() if s.expert_id == expert_id), None)
        config = model.experts.peft_model.peft_config[name].to_dict()
        store.register_expert(expert_id, skill_id=skill, lora_config=json.loads(json.dumps(config, default=str)),
                              storage_path=str(system / "experts" / name), rank=model.experts.ranks[expert_id],
                              maturity_state=int(model.router.expert_maturity[model.column(expert_id)]),
                              training=dict(lineage))
    for expert_id in sorted(known - set(model.experts.expert_ids)):
        store.delete_expert(expert_id)
