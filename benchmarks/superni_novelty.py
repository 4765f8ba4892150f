"""The default novelty detector's decisions through both SuperNI orders, without training any expert.

    python benchmarks/superni_novelty.py --data-dir ../shared/data --max-train 12 --out results/superni-novelty.json

The default decision (``separation``) reads per-example embeddings of the frozen backbone, so what the experts
learn never changes it: giving each step's training examples to ``add_new_skill`` in stream order yields the
decisions a ``dylora`` run of ``benchmarks/continual.py`` with the same ``--max-train`` makes, at the cost of
embedding them. For every step: new expert or recognised, the nearest earlier task, and the statistic against
its boundary with the p-value. The defaults are used as they are; this sequence is a report set, not tuned on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import load_examples, load_stream, split_examples
from dylora_moe.model import DyLoRAMoE
from results import write_json

STREAMS = Path(__file__).resolve().parents[1] / "configs" / "streams"


def decisions(stream_path: Path, data_dir: str, max_train: int | None, model: str | None) -> list[dict]:
    stream = load_stream(stream_path)
    system = DyLoRAConfig.from_dict({**stream.system, **({"model": model} if model else {})})
    moe = DyLoRAMoE.from_config(system)
    names: dict[int, str] = {}
    steps = []
    for i, skill in enumerate(stream.skills):
        train = split_examples(load_examples(skill, data_dir), skill.eval_share)[0][:max_train]
        result = moe.add_new_skill(train, name=skill.name)
        names.setdefault(result.skill_id, skill.name)
        step = {"step": i, "skill": skill.name, "novel": result.is_novel, "expert": result.expert_id,
                "skill_of": names[result.skill_id],
                "nearest": None if result.nearest_skill is None else names[result.nearest_skill],
                "statistic": result.statistic, "boundary": result.boundary, "p_value": result.p_value,
                "similarity": result.similarity}
        print(f"{stream.name} [{i + 1}/{len(stream.skills)}] {skill.name}: "
              f"{'new expert' if result.is_novel else 'recognised as ' + step['skill_of']} ({result.evidence()})",
              flush=True)
        steps.append(step)
    return steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="datasets folder holding superni-cl/")
    p.add_argument("--max-train", type=int, default=None, help="training examples per step the detector sees")
    p.add_argument("--orders", default="order1,order2")
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=Path("results/superni-novelty.json"))
    args = p.parse_args(argv)
    result = {"max_train": args.max_train, "method": DyLoRAConfig().novelty.method, "orders": {}}
    for order in args.orders.split(","):
        steps = decisions(STREAMS / f"superni-{order}.yaml", args.data_dir, args.max_train, args.model)
        result["orders"][order] = {"experts": sum(s["novel"] for s in steps), "steps": steps}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
