"""Where transient forgetting comes from: after every step, each earlier skill's loss taken apart.

    python benchmarks/transient.py --stream configs/streams/shared-code.yaml --data-dir ../shared/data \\
        --steps 4 --max-train 32 --max-eval 16 --seed-steps 4 --consolidation-steps 8 --out /tmp/transient.json
    python benchmarks/transient.py ... --set rehearsal_weight=0     # the same stream under another training recipe

``dylora`` runs the first ``--steps`` steps of the stream. For every earlier skill ``j`` after step ``i`` it
records the loss as served (the matrix cell), the loss with ``j``'s own expert forced (so a rise there is the
expert's, not the gate's), the share of ``j``'s held-out prompts the gate sends elsewhere than its own expert,
and, while the step's new expert is still immature (dense routing, right after its training), the weight the
dense mix puts on the new expert for ``j``'s prompts and the loss under that mix. After every gate fit it
records the gate's top-1 accuracy on the routing memory (the fit) and on every seen skill's held-out prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import load_stream
from dylora_moe.evaluation.metrics import max_transient_forgetting
from dylora_moe.model import DyLoRAMoE
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.loop import ContinualLearner
from dylora_moe.training.measure import routed_experts
from results import write_json


class Probe(ContinualLearner):
    """The default learner, measuring the parts of each earlier skill's loss as it goes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.own: dict[int, int] = {}  # step -> the expert that step trained
        self.probes: list[dict] = []
        self.fits: list[dict] = []

    def features(self, j: int) -> torch.Tensor:
        return self.held_out_features(self.steps[j])

    def fit_router(self) -> None:
        super().fit_router()
        batch = self.memory.batch(self.model.experts.expert_ids, self.model.device)
        if batch is None:
            return
        with torch.no_grad():
            fit = float((self.model.router.gate(batch[0]).argmax(-1) == batch[1]).float().mean())
        held = {}
        for j, step in enumerate(self.steps):
            if j in self.own:
                chosen = routed_experts(self.model, self.features(j))
                held[step.skill.name] = sum(c == self.own[j] for c in chosen) / len(chosen)
        self.fits.append({"step": len(self.steps) - 1, "memory_accuracy": fit, "held_out_accuracy": held})

    def train_expert(self, i, data, result, steps=None):
        self.own.setdefault(i, result.expert_id)
        if not result.is_novel:  # a returning skill's expert is its first appearance's
            first = next(j for j, r in enumerate(self.records) if r.novelty.expert_id == result.expert_id)
            self.own[i] = self.own[first]
        log = super().train_expert(i, data, result, steps)
        if result.is_novel and self.model.router.strategy == "dense":
            column = self.model.column(result.expert_id)
            for j in range(i):
                with torch.no_grad():
                    weights = self.model.router(self.features(j).to(self.model.device)).weights  # [N, E]
                self.probes.append({"step": i, "skill": self.steps[j].skill.name, "phase": "dense",
                                    "new_expert_weight": float(weights[:, column].mean()),
                                    "new_expert_weight_max": float(weights[:, column].max()),
                                    "loss": self.evaluate(j, self.steps[j])})
        return log

    def measure(self, i, data, result, seconds):
        record = super().measure(i, data, result, seconds)
        for j in range(i):
            chosen = routed_experts(self.model, self.features(j))
            with self.model.force_expert(self.own[j]):
                own_loss = self.evaluate(j, self.steps[j])
            self.probes.append({"step": i, "skill": self.steps[j].skill.name, "phase": "sparse",
                                "loss": record.losses[j], "just_learned": self.records[j].losses[j],
                                "own_expert_loss": own_loss,
                                "misrouted": sum(c != self.own[j] for c in chosen) / len(chosen),
                                "to_new_expert": sum(c == result.expert_id for c in chosen) / len(chosen)
                                if result.is_novel else 0.0})
        return record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", type=Path, required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=None, help="run only the first N steps")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--seed-steps", type=int, default=None)
    p.add_argument("--consolidation-steps", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="training (or router.KEY) option, e.g. rehearsal_weight=0 or router.dense_top_m=1")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    stream = load_stream(args.stream)
    if args.steps:
        stream = dataclasses.replace(stream, skills=stream.skills[: args.steps])
    for skill in stream.skills:
        skill.max_train = min(skill.max_train or args.max_train, args.max_train) if args.max_train else skill.max_train
        skill.max_eval = min(skill.max_eval or args.max_eval, args.max_eval) if args.max_eval else skill.max_eval
    sets = dict(item.split("=", 1) for item in args.set)
    router = {k.split(".", 1)[1]: parse_value(v) for k, v in sets.items() if k.startswith("router.")}
    system = DyLoRAConfig.from_dict({**stream.system, **({"router": {**stream.system.get("router", {}), **router}}
                                                          if router else {})})
    overrides = {k: v for k, v in (("seed_steps", args.seed_steps), ("consolidation_steps", args.consolidation_steps))
                 if v is not None}
    overrides |= {k: parse_value(v) for k, v in sets.items() if not k.startswith("router.")}
    training = TrainingConfig(**{**stream.training, **overrides, "report_to": ["none"]})
    model = DyLoRAMoE.from_config(system)
    learner = Probe(model, stream, training, args.out.with_suffix(""), data_dir=args.data_dir)
    started = time.perf_counter()
    records = learner.run(lambda msg: print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True))
    matrix = [r.losses for r in records]
    write_json(args.out, {"stream": stream.name, "steps": len(records), "sets": sets, "argv": sys.argv[1:],
                          "matrix": matrix, "max_transient_forgetting": max_transient_forgetting(matrix),
                          "experts": [r.novelty.expert_id for r in records], "probes": learner.probes,
                          "fits": learner.fits, "seconds": time.perf_counter() - started})
    for p in learner.probes:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()})
    print(f"max transient forgetting {max_transient_forgetting(matrix):.4f}")


if __name__ == "__main__":
    main()
