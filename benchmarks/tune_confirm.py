"""Check tuned values on skills the search never saw: the stream's own configuration against `best.yaml`'s.

    python benchmarks/tune_confirm.py --stream configs/streams/tune-confirm.yaml --data-dir ../shared/data \\
        --params results/tune-shared-code/best.yaml --out results/tune-shared-code/confirm.json
    python benchmarks/tune_confirm.py ... --seed 1     # another training seed (data order, expert init)

`dylora tune` picks its best trial on the tuned stream's held-out examples, so that trial's value is an
optimistic estimate. This runs both configurations through another stream exactly as a trial runs (same
loop, same held-out scoring, `tuning/objective.run_configuration`) and reports the objective of each. With
`--seed`, both run under another training seed, which tells a real difference from the luck of one seed
(on the tuned stream too); a `training.seed` among the params is not applied, both runs share one seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dylora_moe.data.stream import load_stream
from dylora_moe.training.config import TrainingConfig
from dylora_moe.tuning.objective import run_configuration, weighted
from dylora_moe.tuning.params import load_params
from results import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", type=Path, required=True, help="a stream of skills the search did not use")
    p.add_argument("--params", type=Path, required=True, help="best.yaml written by dylora tune")
    p.add_argument("--out", type=Path, required=True, help="JSON result")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--forgetting-weight", type=float, default=None,
                   help="weight of forgetting in the objective (default: the study's, from tune.json beside --params)")
    p.add_argument("--seed", type=int, default=None, help="training seed of both runs (default: the stream's)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    study = args.params.parent / "tune.json"
    weight = args.forgetting_weight
    if weight is None:
        weight = json.loads(study.read_text())["forgetting_weight"] if study.is_file() else 1.0
    stream = load_stream(args.stream)
    seed = args.seed if args.seed is not None else stream.training.get("seed", TrainingConfig().seed)
    if "training.seed" in params:  # a seed is no configuration to confirm: both runs use the check's own
        print(f"params: training.seed {params['training.seed']} left out, both runs use seed {seed}", flush=True)
    runs = {}
    for name, values in (("baseline", {}), ("tuned", params)):
        values = {**values, "training.seed": seed}  # over the params: --seed is the seed of both runs
        started = time.perf_counter()
        result = run_configuration(stream, values, Path("runs") / "tune-confirm" / name, data_dir=args.data_dir,
                                   progress=lambda msg, n=name, t=started: print(
                                       f"[{time.perf_counter() - t:5.0f}s] {n}: {msg}", flush=True))
        result["objective"] = weighted(result, weight)
        runs[name] = result
        print(f"{name}: objective {result['objective']:.4f} (loss {result['loss']:.4f}, forgetting "
              f"{result['forgetting']:+.4f}) in {result['seconds']:.0f}s", flush=True)
    write_json(args.out, {
        "stream": stream.name, "skills": [s.name for s in stream.active(args.data_dir)], "params": params,
        "seed": seed,
        "forgetting_weight": weight, "runs": runs,
        "tuned_minus_baseline": runs["tuned"]["objective"] - runs["baseline"]["objective"],
    })


if __name__ == "__main__":
    main()
