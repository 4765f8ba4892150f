"""Every method of the continual-learning benchmark on one stream, side by side, same data and budget.

    python benchmarks/continual.py --stream configs/streams/shared-code.yaml --data-dir ../shared/data \\
        --out results/shared-code
    python benchmarks/continual.py --stream configs/streams/default.yaml --out runs/bench --methods dylora,base \\
        --consolidation-steps 4 --max-train 16 --pass-limit 4 --humaneval-limit 8 \\
        --freeform-limit 4     # a quick look
    python benchmarks/continual.py --stream configs/streams/superni-order1.yaml --data-dir ../shared/data \
        --out results/superni-order1 --methods dylora,sequential_lora,joint_lora,oracle_experts,base \
        --max-train 64 --max-eval 16 --step-limit 8 --pass-limit 100 --humaneval-limit 0 --freeform-limit 0

Methods (see ``dylora_moe.evaluation.baselines``): dylora, spec_reference, sequential_lora, joint_lora,
oracle_experts, base. Each trains with the stream's steps and rates (or the overrides below) and LoRA experts of
the configured rank. Each method's raw measurements are kept in OUT/methods/NAME.json as soon as it finishes
(what it has measured so far in OUT/methods/NAME.partial.json after every step):
a rerun with the same OUT skips finished methods (delete the file to redo one); method files measured on other
steps (another stream, order or data directory run into OUT) are refused rather than reported together.
``--jobs 2`` runs two methods at a time in separate processes, each with half the cores. Writes OUT/results.json,
OUT/report.md and plots.
``--step-limit N`` also scores N held-out examples per skill by greedy decoding after every step (the score
matrix; ROUGE-L for SuperNI) and ``--pass-limit`` examples per skill after the last step.

``--orders N`` runs all of that on N orders of the stream (``evaluation/orders.py``: order 0 is the file's, the
others seeded permutations in which every recurrence stays after its skill's first appearance), order K in
OUT/order-K (with its own methods/, so a rerun runs only the methods and orders still missing), and writes to
OUT/results.json and OUT/report.md the mean and spread over orders of each method's metrics:

    python benchmarks/continual.py --stream configs/streams/long-code.yaml --data-dir ../shared/data \
        --out results/long-code --orders 3 --jobs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import load_stream, with_params
from dylora_moe.evaluation import benchmark_report, score_report
from dylora_moe.evaluation.baselines import METHODS
from dylora_moe.evaluation.benchmark import BenchmarkConfig, results_from, run_method
from dylora_moe.evaluation.orders import aggregate, order_metrics, permuted
from dylora_moe.training.config import TrainingConfig
from results import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", default=None, help="datasets folder (../shared/data) for the steps that need it")
    p.add_argument("--model", default=None, help="model (default: the stream's, else the embedded default)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seed-steps", type=int, default=None)
    p.add_argument("--consolidation-steps", type=int, default=None)
    p.add_argument("--training", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainingConfig field (repeatable; VALUE read as YAML), e.g. "
                        "--training empty_unlikelihood=1.0")
    p.add_argument("--params", type=Path, default=None, metavar="FILE",
                   help="apply a `params:` file of dotted values over the stream (a `dylora tune` best.yaml, or "
                        "configs/params/*.yaml), as `dylora train --params` does")
    p.add_argument("--max-train", type=int, default=None, help="cap training examples per step")
    p.add_argument("--max-eval", type=int, default=None, help="cap held-out examples per step")
    p.add_argument("--pass-limit", type=int, default=BenchmarkConfig.pass_limit,
                   help="held-out problems per step scored by greedy decoding at the end (0: none)")
    p.add_argument("--humaneval-limit", type=int, default=BenchmarkConfig.humaneval_limit,
                   help="HumanEval problems for the retention score (0: none)")
    p.add_argument("--step-limit", type=int, default=BenchmarkConfig.step_limit,
                   help="held-out examples per skill scored by greedy decoding after every step (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length of those scores (default: the skill's checker's, 50 for SuperNI)")
    p.add_argument("--freeform-limit", type=int, default=BenchmarkConfig.freeform_limit,
                   help="free-form requests per skill asked the final system, chat and raw (0: none)")
    p.add_argument("--freeform-tokens", type=int, default=None,
                   help="generation length of the free-form answers (default: each set's own, 96; 64 for shell)")
    p.add_argument("--orders", type=int, default=1,
                   help="orders of the stream to run, each in OUT/order-K, reported as mean and spread over orders")
    p.add_argument("--order", type=int, default=0,
                   help="run this one order of the stream into OUT (0: the file's order)")
    p.add_argument("--jobs", type=int, default=1, help="methods run at once, in separate processes")
    p.add_argument("--report", action="store_true",
                   help="run nothing: write results.json and report.md from OUT/methods (with unfinished methods' "
                        "partial measurements)")
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configs(args: argparse.Namespace):
    stream = load_stream(args.stream)
    if args.params is not None:
        from dylora_moe.tuning.params import load_params

        with_params(stream, load_params(args.params))
    stream = permuted(stream, args.order)
    system = DyLoRAConfig.from_dict({**stream.system, **({"model": args.model} if args.model else {})})
    overrides = {k: v for k, v in (("seed_steps", args.seed_steps),
                                   ("consolidation_steps", args.consolidation_steps)) if v is not None}
    overrides.update(training_overrides(args.training))
    training = TrainingConfig(**{**stream.training, **overrides, "report_to": ["none"]})
    for skill in stream.skills:
        if args.max_train is not None:
            skill.max_train = min(skill.max_train or args.max_train, args.max_train)
        if args.max_eval is not None:
            skill.max_eval = min(skill.max_eval or args.max_eval, args.max_eval)
    bench = BenchmarkConfig(pass_limit=args.pass_limit, humaneval_limit=args.humaneval_limit,
                            freeform_limit=args.freeform_limit, freeform_tokens=args.freeform_tokens,
                            step_limit=args.step_limit, max_new_tokens=args.max_new_tokens)
    return stream, system, training, bench


def training_overrides(pairs: list[str]) -> dict:
    """``FIELD=VALUE`` pairs -> TrainingConfig overrides; an unknown field or a pair without ``=`` is an error
    naming the fields there are."""
    import yaml

    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name.strip() not in known:
            raise SystemExit(f"--training {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(known))}")
        overrides[name.strip()] = yaml.safe_load(value)
    return overrides


def run_one(args: argparse.Namespace, name: str) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    stream, system, training, bench = configs(args)
    settings = run_settings(stream, system, training, bench, args.data_dir)
    started = time.perf_counter()
    raw = run_method(name, stream, system, training, args.out, data_dir=args.data_dir, bench=bench,
                     progress=lambda msg: print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True),
                     partial=lambda so_far: write_atomic(args.out / "methods" / f"{name}.partial.json",
                                                         {**so_far, "settings": settings}))
    raw["settings"] = settings
    write_atomic(args.out / "methods" / f"{name}.json", raw)
    print(f"{name}: done in {raw['seconds']:.0f}s", flush=True)
    return raw


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_parallel(args: argparse.Namespace, names: list[str], argv: list[str]) -> None:
    """Run methods in child processes of this script, ``--jobs`` at a time."""
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            log = (args.out / "methods" / f"{name}.log").open("w")
            cmd = [sys.executable, __file__, *argv, "--methods", name, "--jobs", "1", "--threads", str(threads)]
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            print(f"started {name} (log: {log.name})", flush=True)
        time.sleep(5)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log.name}")
                print(f"finished {name}", flush=True)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    stream, system, training, bench = configs(args)  # a bad stream or option fails before any work
    if args.orders > 1:
        run_orders(args, argv)
        return
    (args.out / "methods").mkdir(parents=True, exist_ok=True)
    settings = run_settings(stream, system, training, bench, args.data_dir)
    if not args.report:  # a finished method measured under other options is not "done" for this command
        check_settings(args.out, finished(args.out), settings)
    started = time.perf_counter()
    todo = [] if args.report else [n for n in names if not (args.out / "methods" / f"{n}.json").is_file()]
    if args.threads is None and args.jobs > 1 and len(todo) > 1:
        base_argv = strip_option(strip_option(argv, "--methods"), "--jobs")
        run_parallel(args, todo, base_argv)
    else:
        for name in todo:
            run_one(args, name)
    if args.threads is not None:
        return  # a child process: the parent merges
    raw = {}
    for name in METHODS:
        path = args.out / "methods" / f"{name}.json"
        if path.is_file():
            raw[name] = json.loads(path.read_text())
    partials = {name: json.loads(path.read_text()) for name in METHODS if name not in raw
                and (path := args.out / "methods" / f"{name}.partial.json").is_file()}
    steps = [s.name for s in stream.active(args.data_dir)]
    stale = other_steps(raw, steps) + [f"{n}.partial" for n in other_steps(partials, steps)]
    if stale:
        raise SystemExit(f"{args.out / 'methods'}: {', '.join(stale)} ran other steps than this stream's "
                         f"({', '.join(steps)}): another stream, order or data directory; delete those files or "
                         "choose another --out")
    # --report compares the files with each other (the first that recorded its settings), a run with itself
    recorded = [(n, r["settings"]) for n, r in raw.items() if "settings" in r]
    files = {**raw, **{f"{n}.partial": p for n, p in partials.items()}}
    if args.report and recorded:
        check_settings(args.out, files, recorded[0][1], against=f"{recorded[0][0]}'s")
    elif not args.report:
        check_settings(args.out, files, settings)
    command = "python benchmarks/continual.py " + " ".join(a for a in argv if a != "--report")
    if not raw:
        head = [f"# Continual-learning benchmark: {stream.name} (no method finished)", "", "```bash", command, "```"]
        lines = head + score_report.partial_lines(partials, stream.skills)
        (args.out / "report.md").write_text("\n".join(lines) + "\n")
        print(f"no method finished; partial report: {args.out / 'report.md'}")
        return
    results = results_from(raw, stream=stream.name, model=system.model)
    seconds = sum(r.get("seconds", 0.0) for r in raw.values())
    results["total_seconds"] = seconds
    results["wall_seconds_this_invocation"] = time.perf_counter() - started
    write_json(args.out / "results.json", results)
    benchmark_report.write(args.out, results, command=command, seconds=seconds, partials=partials)
    for name, m in results["methods"].items():
        he = m.get("humaneval")
        print(f"{name:16s} acc={m['acc']:.4f} bwt={m['bwt']:+.4f} forgetting={m['forgetting']:+.4f} "
              f"fwt={m['fwt'] if m['fwt'] is None else round(m['fwt'], 4)} routing={m['routing_accuracy']} "
              f"humaneval={he and he['score']} experts={m['experts']}")
        if "scores" in m:
            sc = m["scores"]
            print(f"{'':16s} {sc['metric']}: AP={sc['ap']:.2f} acc={sc['acc']:.2f} bwt={sc['bwt']:+.2f} "
                  f"forgetting={sc['forgetting']:+.2f} fwt={sc['fwt'] if sc['fwt'] is None else round(sc['fwt'], 2)}")
    print(f"report: {args.out / 'report.md'}")


UNMEASURED = {"report_to", "logging_steps"}  # TrainingConfig fields that change no figure


def run_settings(stream, system: DyLoRAConfig, training: TrainingConfig, bench: BenchmarkConfig,
                 data_dir) -> dict:
    """What every method's figures depend on besides the method (the options of this command over the stream
    file: the system and training configuration before a method adapts them, the benchmark's sizes, each
    step's caps and source), JSON-ready; kept in each method file, so that methods measured under other options
    (or another stream with the same step names, e.g. the SuperNI orders with another input cut) are not
    reported beside each other."""
    active = stream.active(data_dir)
    data = {"system": system.to_dict(),
            "training": {k: v for k, v in dataclasses.asdict(training).items() if k not in UNMEASURED},
            "bench": {k: v for k, v in dataclasses.asdict(bench).items() if k != "spider_cache"},
            "skills": [[s.name, s.max_train, s.max_eval] for s in active],
            "sources": {str(i): source_settings(s.source) for i, s in enumerate(active)}}
    return json.loads(json.dumps(data, default=str))


def source_settings(source) -> dict:
    """A step's source as set (a file by its name: the folder differs between machines)."""
    data = {k: v for k, v in dataclasses.asdict(source).items() if v is not None}
    if "path" in data:
        data["path"] = Path(data["path"]).name
    return data


def flat(data, prefix: str = "") -> dict:
    """A nested dict as dotted keys -> leaves."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def other_settings(raw: dict[str, dict], settings: dict) -> dict[str, list[str]]:
    """Per method file measured under other ``settings`` (``run_settings``): the differing settings, as
    ``name: theirs -> these``. Files written before settings were recorded are not checked, nor the sections
    a file was written before (``sources``)."""
    out = {}
    for name, r in raw.items():
        if "settings" not in r:
            continue
        have = flat(r["settings"])
        want = flat({k: v for k, v in settings.items() if k in r["settings"]})
        keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if keys:
            out[name] = [f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in keys]
    return out


def finished(out: Path) -> dict[str, dict]:
    """The method files of ``out`` (finished methods), by method name."""
    return {name: json.loads(path.read_text()) for name in METHODS
            if (path := out / "methods" / f"{name}.json").is_file()}


def check_settings(out: Path, raw: dict[str, dict], settings: dict, against: str = "this command's") -> None:
    """Refuse method files measured under other settings than ``settings`` (``against`` names whose), naming
    what differs."""
    differ = other_settings(raw, settings)
    if differ:
        lines = "; ".join(f"{name} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                          for name, keys in differ.items())
        raise SystemExit(f"{out / 'methods'}: measured under other options than {against}: {lines}. Give the "
                         "options they ran with, delete those files to rerun them, or choose another --out")


def other_steps(raw: dict[str, dict], steps: list[str]) -> list[str]:
    """The methods whose measurements were taken on other steps than ``steps`` (another stream or order run into
    the same folder): their matrices' columns are not this stream's, so they cannot be reported beside it."""
    return [name for name, r in raw.items() if r.get("skills") != steps]


def run_orders(args: argparse.Namespace, argv: list[str]) -> None:
    """Every order in its own OUT/order-K (a whole single-order run), then their mean and spread in OUT."""
    base = strip_option(strip_option(strip_option(argv, "--orders"), "--order"), "--out")
    started = time.perf_counter()
    per_order = {}
    for k in range(args.orders):
        sub = args.out / f"order-{k}"
        print(f"order {k}: {sub}", flush=True)
        main([*base, "--out", str(sub), "--order", str(k)])
        if (sub / "results.json").is_file():
            per_order[k] = json.loads((sub / "results.json").read_text())
    if not per_order:
        print("no order has a finished method yet")
        return
    first = next(iter(per_order.values()))
    results = {
        "stream": load_stream(args.stream).name, "model": first["model"], "orders_requested": args.orders,
        "orders": [{"order": k, "folder": f"order-{k}", "skills": r["skills"],
                    "methods": {name: order_metrics(m) for name, m in r["methods"].items()}}
                   for k, r in per_order.items()],
        "methods": aggregate([r["methods"] for r in per_order.values()]),
        "total_seconds": sum(r.get("total_seconds", 0.0) for r in per_order.values()),
        "wall_seconds_this_invocation": time.perf_counter() - started,
    }
    write_json(args.out / "results.json", results)
    command = "python benchmarks/continual.py " + " ".join(a for a in argv if a != "--report")
    (args.out / "report.md").write_text(benchmark_report.render_orders(results, command=command), encoding="utf-8")
    print(f"report: {args.out / 'report.md'}")


def strip_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
