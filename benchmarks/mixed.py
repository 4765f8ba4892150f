"""A mixed stream (no skill boundaries) against the same data learned with boundaries and a single LoRA.

    python benchmarks/mixed.py --stream configs/streams/mixed-code.yaml --data-dir ../shared/data \\
        --out results/mixed-code
    python benchmarks/mixed.py --stream configs/streams/mixed-code.yaml --data-dir ../shared/data \\
        --out /tmp/mixed --scale 0.5 --methods dylora_mixed      # a quick look

Methods, all on the examples the mixed stream draws, each trained one pass over its data (``ceil(n /
batch_size)`` optimizer steps per expert and chunk or step, the first ``seed_steps`` at the seeding rate for a
new expert):

- ``dylora_mixed``: the chunks as they come; the system sorts them into skills (``training/mixed.py``).
- ``dylora_boundaries``: the same examples regrouped by their true skill, one step per skill in the order
  the skills first appear, the novelty detector deciding per step (the boundary-given loop).
- ``sequential_lora``: the chunks as they come, all into one LoRA expert (no sorting, no routing).

Scores: sorting purity, adjusted Rand index, novelty delay and expert count against the true skills (for
``dylora_mixed``); mean final held-out loss over the skills, forgetting (final loss minus the best loss after
the skill first appeared, mean over skills, nats) and routing of held-out prompts to each skill's main expert.
``--scale`` multiplies every chunk's size. Writes OUT/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from dylora_moe import DyLoRAMoE
from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import ChunkSpec, StreamSpec, load_stream
from dylora_moe.evaluation import metrics
from dylora_moe.evaluation.mixed import summarise_mixed
from dylora_moe.novelty.sorting import ChunkSort
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.loop import ContinualLearner
from dylora_moe.training.mixed import MixedLearner
from results import write_json

METHODS = ("dylora_mixed", "dylora_boundaries", "sequential_lora")


class SingleLoRA(MixedLearner):
    """Every example of every chunk trains one expert; the gate is not trained (one column)."""

    trains_router = False

    def sort_chunk(self, i, items, sample, keys) -> ChunkSort:
        if not self.model.library.skills:
            self.model.add_skill_sample(sample, "all")
        skill = next(iter(self.model.library.skills))
        return ChunkSort({skill: items}, [skill] if i == 0 else [], 0, 0, 0, 0, 1.0)


class Boundaries(ContinualLearner):
    """The mixed stream's examples regrouped by true skill: step j trains on everything drawn of skill j."""

    def __init__(self, model, stream, training, out, *, pools, drawn, **kw):
        super().__init__(model, stream, training, out, **kw)
        self.pools, self.drawn = pools, drawn

    def prepare(self, skill):
        data = self.pools[skill.name]
        return dataclasses.replace(data, train=self.drawn[skill.name], held_out_features=None,
                                   train_set=self.train_dataset(self.drawn[skill.name], skill.format.chat))

    def train_expert(self, i, data, result, steps=None):
        total = math.ceil(len(data.train) / self.training.batch_size)
        seed = min(self.training.seed_steps, total) if result.is_novel else 0
        return super().train_expert(i, data, result, steps=(seed, total - seed))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", type=Path, required=True, help="a stream YAML with `chunks`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=None, help="model (default: the stream's, else the embedded default)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every chunk's size")
    return p.parse_args(argv)


def build(stream: StreamSpec, args) -> tuple[DyLoRAMoE, TrainingConfig]:
    system = DyLoRAConfig.from_dict({**stream.system, **({"model": args.model} if args.model else {})})
    return DyLoRAMoE.from_config(system).eval(), TrainingConfig(**{**stream.training, "report_to": ["none"]})


def run_mixed(stream, args, learner_cls, name: str) -> tuple[dict, MixedLearner]:
    model, training = build(stream, args)
    learner = learner_cls(model, stream, training, args.out / name, data_dir=args.data_dir)
    start = time.perf_counter()
    learner.run(lambda msg: print(f"  {name}: {msg}", flush=True))
    summary = summarise_mixed(learner.records, [s.name for s in learner.skills], stream=stream.name,
                              model=model.config.model)
    summary["seconds"] = time.perf_counter() - start
    return summary, learner


def run_boundaries(stream, args, mixed: MixedLearner) -> dict:
    """The same examples, one step per skill in order of first appearance."""
    order = list(mixed.seen)
    drawn = {name: [] for name in order}
    used = dict.fromkeys(order, 0)
    for chunk in stream.chunks:
        for name, count in chunk.counts().items():
            drawn[name] += mixed.pools[name].train[used[name] : used[name] + count]
            used[name] += count
    skills = [next(s for s in stream.skills if s.name == n) for n in order]
    bounded = StreamSpec(f"{stream.name}-boundaries", skills, system=stream.system, training=stream.training)
    model, training = build(bounded, args)
    learner = Boundaries(model, bounded, training, args.out / "dylora_boundaries", data_dir=args.data_dir,
                         pools=mixed.pools, drawn=drawn)
    start = time.perf_counter()
    learner.run(lambda msg: print(f"  dylora_boundaries: {msg}", flush=True))
    matrix = [r.losses for r in learner.records]
    final = matrix[-1]
    drops = [final[j] - min(matrix[i][j] for i in range(j, len(matrix))) for j in range(len(order))]
    routed = {}
    for j, name in enumerate(order):
        expert = learner.records[j].novelty.expert_id
        routed[name] = learner.records[-1].routing[j].get(expert, 0.0)
    return {"skills": order, "loss_matrix": matrix, "final_losses": dict(zip(order, final, strict=True)),
            "mean_final_loss": sum(final) / len(final), "forgetting": sum(drops) / len(drops),
            "max_forgetting": max(drops), "experts": learner.records[-1].experts,
            "bwt_loss": metrics.bwt_loss(matrix), "routing_accuracy": sum(routed.values()) / len(routed),
            "novel": [r.novelty.is_novel for r in learner.records],
            "train_seconds": sum(r.train_seconds for r in learner.records), "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    args = parse_args(argv)
    stream = load_stream(args.stream)
    if not stream.mixed:
        sys.exit(f"{args.stream} has no `chunks`: this benchmark needs a mixed stream")
    if args.scale != 1.0:
        stream.chunks = [ChunkSpec(max(1, round(c.size * args.scale)), c.mix) for c in stream.chunks]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"stream": stream.name, "chunks": [c.counts() for c in stream.chunks], "methods": {}}
    mixed = None

    def keep(name: str, row: dict) -> None:  # each method's figures are on disk as soon as it finishes
        results["methods"][name] = row
        write_json(args.out / "methods" / f"{name}.json", row)

    if "dylora_mixed" in methods or "dylora_boundaries" in methods:
        row, mixed = run_mixed(stream, args, MixedLearner, "dylora_mixed")
        keep("dylora_mixed", row)
    if "dylora_boundaries" in methods:
        keep("dylora_boundaries", run_boundaries(stream, args, mixed))
    if "sequential_lora" in methods:
        keep("sequential_lora", run_mixed(stream, args, SingleLoRA, "sequential_lora")[0])
    mixed_row, bounded = results["methods"].get("dylora_mixed"), results["methods"].get("dylora_boundaries")
    if mixed_row and bounded:
        results["mixed_vs_boundaries_loss"] = mixed_row["mean_final_loss"] / bounded["mean_final_loss"] - 1
    write_json(args.out / "results.json", results)
    print(table(results))


def table(results: dict) -> str:
    lines = ["| method | experts | purity | ARI | mean final loss | forgetting (max) | routing | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["methods"].items():
        purity = f"{r['purity']:.3f}" if "purity" in r else "-"
        ari = f"{r['adjusted_rand_index']:.3f}" if "adjusted_rand_index" in r else "-"
        lines.append(f"| {name} | {r['experts']} | {purity} | {ari} | {r['mean_final_loss']:.4f} | "
                     f"{r['forgetting']:.4f} ({r['max_forgetting']:.4f}) | {r['routing_accuracy']:.3f} | "
                     f"{r['train_seconds']:.0f} |")
    if "dylora_mixed" in results["methods"]:
        r = results["methods"]["dylora_mixed"]
        lines.append("")
        lines.append(f"dylora_mixed: {r['true_skills']} true skills; novelty delay {json.dumps(r['novelty_delay'])}; "
                     f"{r['waiting_at_end']} examples still waiting at the end")
    if "mixed_vs_boundaries_loss" in results:
        lines.append(f"mean final loss, mixed vs boundaries: {results['mixed_vs_boundaries_loss']:+.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
