"""How often the gate's refits move an old skill's held-out prompts away from its expert, without training experts.

    python benchmarks/gate_churn.py --stream configs/streams/long-code.yaml --data-dir ../shared/data \\
        --labels mbpp-python,humaneval-x-javascript,humaneval-x-python,codealpaca-general --decays 0,1e-3,1e-2,1e-1
    python benchmarks/gate_churn.py ... --exclude-labels mbpp-python,...   # the other skills, to confirm

The gate reads routing features that do not depend on the experts (``RouterConfig.route_layer``), so the loop's
routing can be replayed on its own: for each order of the stream (``evaluation/orders.py``), each step stores its
training prompts' features, the gate is fitted on the routing memory twice (before and after the expert would
train) and the new expert is marked mature; then every seen skill's held-out prompts are routed top-1. A *flip*
is a held-out prompt of an earlier skill that went to its skill's expert right after that skill was learned and
goes elsewhere now: under top-1 routing with frozen experts, flips are the whole of an old skill's loss rise.
Every skill gets its own expert by its label (perfect novelty). Prints, per penalty of the fit
(``TrainingConfig.router_weight_decay``), the worst share of one skill's held-out prompts flipped at one step
(max and mean over orders), the mean flipped share, and the new skills' routing accuracy; writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import load_stream
from dylora_moe.evaluation.orders import permutation
from dylora_moe.model import DyLoRAMoE
from dylora_moe.routing.fit import fit_gate
from dylora_moe.routing.router import DynamicHybridRouter
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.loop import ContinualLearner
from dylora_moe.training.rehearsal import RoutingMemory
from results import write_json


def skill_features(args) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(name, label, training prompts' features, held-out prompts' features) per step, in file order."""
    stream = load_stream(args.stream)
    keep = set(args.labels.split(",")) if args.labels else None
    drop = set(args.exclude_labels.split(",")) if args.exclude_labels else set()
    stream.skills = [s for s in stream.skills if (keep is None or s.label in keep) and s.label not in drop]
    training = TrainingConfig(**{**stream.training, "report_to": ["none"]})
    model = DyLoRAMoE.from_config(DyLoRAConfig.from_dict(stream.system))
    learner = ContinualLearner(model, stream, training, args.out.with_suffix(""), data_dir=args.data_dir)
    rows = []
    for skill in learner.skills:
        step = learner.prepare(skill)
        train = learner.prompts(step, step.train[: training.rehearsal_per_skill])
        rows.append((skill.name, skill.label,
                     model.routing_features_for(train, max_length=training.max_length),
                     model.routing_features_for(learner.prompts(step, step.held_out), max_length=training.max_length)))
    return rows


def replay(rows, order: int, decay: float, fit_steps: int, per_skill: int) -> dict:
    """One order's routing with fits penalised by ``decay``: worst and mean flipped share, new-skill accuracy."""
    steps = [rows[i] for i in permutation([r[1] for r in rows], order)]
    router = DynamicHybridRouter(steps[0][2].shape[1], top_k=1)
    memory = RoutingMemory(per_skill)  # as the loop's: a returning skill's rows are resampled to this many
    expert: dict[str, int] = {}
    right_when_learned: dict[int, torch.Tensor] = {}
    flips, new_accuracy = [], []
    for i, (_, label, train, _) in enumerate(steps):
        if label not in expert:
            expert[label] = router.add_expert()
        memory.add(list(expert).index(label), expert[label], train)
        for _ in range(2):
            fit_gate(router, *memory.batch(list(range(router.num_experts))), steps=fit_steps, weight_decay=decay)
        router.set_maturity(expert[label])
        for j, (_, old_label, _, held) in enumerate(steps[: i + 1]):
            with torch.no_grad():
                right = router(held).weights.argmax(-1) == expert[old_label]  # [N]
            if j == i:
                right_when_learned[j] = right
                new_accuracy.append(float(right.float().mean()))
            else:
                flips.append(float((right_when_learned[j] & ~right).float().mean()))
    return {"worst_flip": max(flips, default=0.0), "mean_flip": statistics.fmean(flips) if flips else 0.0,
            "new_accuracy": statistics.fmean(new_accuracy)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", type=Path, required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--labels", default=None, help="keep only the steps of these skill labels")
    p.add_argument("--exclude-labels", default=None, help="drop the steps of these skill labels")
    p.add_argument("--decays", default="0,1e-2", help="penalties of the gate fit to compare")
    p.add_argument("--orders", type=int, default=12)
    p.add_argument("--fit-steps", type=int, default=TrainingConfig.router_fit_steps)
    p.add_argument("--out", type=Path, default=Path("/tmp/gate_churn.json"))
    args = p.parse_args(argv)
    rows = skill_features(args)
    print("steps:", ", ".join(r[0] for r in rows))
    table = {}
    for decay in (float(d) for d in args.decays.split(",")):
        runs = [replay(rows, k, decay, args.fit_steps, TrainingConfig.rehearsal_per_skill)
                for k in range(args.orders)]
        worst = [r["worst_flip"] for r in runs]
        table[str(decay)] = {"runs": runs, "worst_flip_max": max(worst), "worst_flip_mean": statistics.fmean(worst),
                             "mean_flip": statistics.fmean(r["mean_flip"] for r in runs),
                             "new_accuracy": statistics.fmean(r["new_accuracy"] for r in runs)}
        t = table[str(decay)]
        print(f"decay {decay:g}: worst flipped share max {t['worst_flip_max']:.3f} mean {t['worst_flip_mean']:.3f}, "
              f"mean flipped {t['mean_flip']:.4f}, new-skill routing accuracy {t['new_accuracy']:.3f}", flush=True)
    write_json(args.out, {"steps": [r[0] for r in rows], "orders": args.orders, "fit_steps": args.fit_steps,
                          "decays": table})


if __name__ == "__main__":
    main()
