"""Where the gate sends free-form requests: each step of a stream gets its expert from the novelty detector, its
routing features stored and the gate fitted on them, exactly as the continual loop does, but no expert trains
(the gate's input features do not depend on the experts), so a stream's routing is measured in minutes. Then
every free-form set of the stream (``evaluation/freeform.stream_sets``: requests of each skill's domain from
outside its training source) is routed top-1, with the chat template and as raw text, and scored by the share
that reaches the expert of the set's skill; the held-out prompts in the training format are scored as the loop
scores them (routing accuracy).

    python benchmarks/freeform_routing.py --stream configs/streams/shared-code-views.yaml \\
        --data-dir ../shared/data --arm default --arm "raw_routing:raw_routing=true" \\
        --out results/freeform_routing/shared-code.json

Each ``--arm NAME[:field=value,...]`` sets ``TrainingConfig`` fields over the stream's ``training:`` section.
The gate is fitted only by the loop's fits (``fit_router`` before and after each step); in a full run it also
trains with each expert on the rehearsal rows, so these shares are the fitted gate's, not the final system's.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.data.stream import load_stream
from dylora_moe.evaluation.freeform import routed_to, stream_sets, trained_examples
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.loop import ContinualLearner
from dylora_moe.training.measure import routed_experts
from freeform_ablation import parse_arm
from results import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", type=Path, required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arm", action="append", default=[], help="NAME[:field=value,...] (repeatable)")
    p.add_argument("--system", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a DyLoRAConfig field over the stream's system: section, dotted for a nested "
                        "one (repeatable), e.g. --system router.route_layer=6")
    p.add_argument("--limit", type=int, default=16, help="free-form requests per set")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def system_dict(system: dict, pairs: list[str]) -> dict:
    """The stream's ``system:`` section with ``FIELD=VALUE`` overrides (``router.route_layer=6``) merged in."""
    system = copy.deepcopy(system)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--system {pair!r}: expected FIELD=VALUE, e.g. router.route_layer=6")
        *path, last = key.strip().split(".")
        node = system
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return system


def run_arm(name: str, overrides: dict, args) -> dict:
    stream = load_stream(args.stream)
    training = TrainingConfig(**{**stream.training, **overrides, "report_to": ["none"]})
    model = DyLoRAMoE.from_config(DyLoRAConfig.from_dict(system_dict(stream.system, args.system))).eval()
    learner = ContinualLearner(model, stream, training, args.out.parent / "logs" / name, data_dir=args.data_dir)
    expert_of: dict[str, int] = {}
    for i, skill in enumerate(learner.skills):
        data = learner.prepare(skill)
        learner.steps.append(data)
        result = learner.assign(i, data)
        expert_of.setdefault(skill.label, result.expert_id)
        learner.remember(data, result)
        learner.fit_router()
        model.mark_mature(result.expert_id)
        print(f"{name}: [{i + 1}/{len(learner.skills)}] {skill.name} -> expert {result.expert_id}", flush=True)
    held_out = {}
    for step in learner.steps:
        chosen = routed_experts(model, learner.held_out_features(step))
        held_out[step.skill.name] = sum(c == expert_of[step.skill.label] for c in chosen) / max(len(chosen), 1)
    sets = []
    for fset in stream_sets(learner.skills, trained_examples(learner.skills, args.data_dir), data_dir=args.data_dir,
                            limit=args.limit):
        want = expert_of.get(fset.skill)
        for form in ("chat", "raw"):
            picks = routed_to(model, [e.prompt for e in fset.examples], form)
            sets.append({"skill": fset.skill, "source": fset.source, "form": form, "n": len(picks),
                         "expert": want, "right": None if want is None else sum(p == want for p in picks) / len(picks),
                         "picks": {str(e): picks.count(e) for e in sorted(set(picks))}})
    return {"arm": name, "overrides": overrides, "expert_of": expert_of, "held_out_routing": held_out, "sets": sets}


def table(arms: list[dict]) -> str:
    keys = [(s["skill"], s["form"]) for s in arms[0]["sets"] if s["right"] is not None]
    lines = ["| arm | " + " | ".join(f"{k} {f}" for k, f in keys) + " | held-out (training format) |",
             "|---|" + "---:|" * (len(keys) + 1)]
    for arm in arms:
        right = {(s["skill"], s["form"]): s["right"] for s in arm["sets"]}
        held = arm["held_out_routing"]
        lines.append(f"| {arm['arm']} | " + " | ".join(f"{right[k]:.2f}" for k in keys)
                     + f" | {sum(held.values()) / len(held):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    arms = [run_arm(*parse_arm(a), args) for a in (args.arm or ["default"])]
    print(table(arms))
    write_json(args.out, {"stream": str(args.stream), "system": args.system, "limit": args.limit, "arms": arms})


if __name__ == "__main__":
    main()
