"""A bounded pool: what merging two experts costs the skills they serve, and a pool smaller than the skills.

    python benchmarks/merge.py --data-dir ../shared/data --out results/merge/merge.json
    python benchmarks/merge.py --part forced --out /tmp/merge.json      # built-in data only, no data folder

Both parts share their first two steps, HumanEval's first half (builtin ``humaneval`` stop 82) then
VerilogEval, trained once on the default model and saved (``--work``); each part continues from that save.

``forced``: the third step is HumanEval's second half (start 82), the first half's skill, and it is *forced*
to get an expert of its own: a missed recognition. ``MissedRecognition`` (a ``ContinualLearner``) decides the
forced step with the cosine rule at a threshold no cosine reaches, so ``add_new_skill`` creates the expert,
gate column and library entry exactly as for a truly novel skill; the other steps keep the configured
detector. The trained system is saved once; for each merge method a fresh copy is loaded, the two HumanEval
experts are merged and the gate refitted on the routing memory as ``dylora experts merge`` does
(``experts/pool.merge``), and every skill's held-out loss is measured with the loop's ``eval_loss``. Reported
per method: the merged expert's loss on both HumanEval halves (forced onto it) against each source expert's
own loss before the merge (forced the same way) and the ratio to the better of the two; each skill's loss as
served (gate-routed) before and after, the Verilog difference in nats, BWT over the three skills from their
just-learned losses to after the merge; routing accuracy (held-out prompts sent to their skill's expert,
the merged one for HumanEval); the pool size and the seconds the merge and refit took. The issue's targets:
the best method within 2% of the better expert, Verilog within 0.005 nats.

``bounded`` (needs ``--data-dir``): the third step is a different skill (``--other``, Spider SQL by default),
run twice from the save, unbounded and with ``max_experts=2``, so that the pool must merge the HumanEval and
Verilog experts (the loop's policy, ``DyLoRAConfig.max_experts``: the closest pair, ``cat``) before the new
expert is created. Reported: both loss matrices and the final losses side by side.

Weights of a merge are those under which the method averages the two experts (``experts.manager.merge_weights``:
0.5 each, 1 each for the TIES methods); ``--rank`` as in ``dylora experts merge`` (default: the larger rank)
applies to the svd methods, ``--density`` to ties_svd and dare_ties_svd.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import StreamSpec
from dylora_moe.evaluation.metrics import bwt_loss, routing_accuracy
from dylora_moe.experts import pool
from dylora_moe.experts.manager import NEEDS_DENSITY, merge_weights
from dylora_moe.model import DyLoRAMoE
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.loop import ContinualLearner, StepData
from dylora_moe.training.measure import example_losses, routed_experts
from dylora_moe.training.progress import MEMORY, restore_progress, save_progress
from dylora_moe.training.rehearsal import RoutingMemory
from results import write_json

STREAM = "merge"  # one name for every continuation: they all resume the shared first two steps
SHARED = [
    {"name": "humaneval-python-a", "source": {"type": "builtin", "name": "humaneval", "stop": 82}},
    {"name": "verilogeval", "source": {"type": "builtin", "name": "verilogeval"}},
]
SAME_SKILL = {"name": "humaneval-python-b", "label": "humaneval-python-a",
              "source": {"type": "builtin", "name": "humaneval", "start": 82}}
OTHERS = {
    "spider": {"name": "spider-sql", "source": {"type": "builtin", "name": "spider", "stop": 300}},
    "nl2bash": {"name": "nl2bash", "source": {"type": "builtin", "name": "nl2bash", "stop": 300}},
    "mbpp": {"name": "mbpp-python", "source": {"type": "builtin", "name": "mbpp", "stop": 200}},
}
METHODS = ("cat", "svd", "ties_svd", "dare_ties_svd")
RATIO_TARGET, BWT_TARGET = 1.02, 0.005


class MissedRecognition(ContinualLearner):
    """The default learner, except that the steps in ``forced`` get a new expert whatever the detector would
    say: for them alone the decision is the cosine rule at a threshold above 1 (every cosine is below it)."""

    def __init__(self, *args, forced: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forced = set(forced)

    def assign(self, i: int, data: StepData):
        if i not in self.forced:
            return super().assign(i, data)
        novelty = self.model.config.novelty
        kept = novelty.method, novelty.similarity_threshold
        novelty.method, novelty.similarity_threshold = "cosine", 2.0
        try:
            return super().assign(i, data)
        finally:
            novelty.method, novelty.similarity_threshold = kept


# ---------------------------------------------------------------- measurements
GATE = "gate"


def summed_loss(model: DyLoRAMoE, step: StepData, batch_size: int, expert: int | str | None = GATE
                ) -> tuple[float, int]:
    """Summed response loss (nats) over a step's held-out set and its number of tokens, as the gate routes it
    (``GATE``) or forced onto one expert (``None``: the frozen model)."""
    if expert == GATE:
        rows = example_losses(model, step.eval_set, batch_size)
    else:
        with model.force_expert(expert):
            rows = example_losses(model, step.eval_set, batch_size)
    return sum(t for t, _ in rows), sum(n for _, n in rows)


def mean_losses(parts: dict[str, tuple[float, int]], pooled: tuple[str, ...] = ()) -> dict[str, float]:
    """Token-weighted mean loss of each part, and ``pooled`` (when given) over those parts together."""
    out = {k: t / max(n, 1) for k, (t, n) in parts.items()}
    if pooled:
        out["pooled"] = sum(parts[k][0] for k in pooled) / max(sum(parts[k][1] for k in pooled), 1)
    return out


def routing(model: DyLoRAMoE, learner: ContinualLearner, own: list[set[int]]) -> dict:
    """Per step, the share of its held-out prompts the gate sends to one of the experts ``own[step]`` of its
    skill, and the pooled accuracy."""
    correct, totals, shares = [], [], {}
    for step, experts in zip(learner.steps, own, strict=True):
        chosen = routed_experts(model, learner.held_out_features(step))
        correct.append(sum(c in experts for c in chosen))
        totals.append(len(chosen))
        shares[step.skill.name] = correct[-1] / len(chosen)
    return {"per_skill": shares, "accuracy": routing_accuracy(correct, totals)}


def merge_figures(before: dict, after: dict, verilog: str, halves: tuple[str, str]) -> dict:
    """The issue's figures from losses measured before and after a merge.

    ``before``: ``served`` (skill -> loss as routed), ``expert_a``/``expert_b`` (half -> loss forced onto that
    source expert, plus ``pooled``: both halves together); ``after``: ``served`` and ``merged`` (half -> loss
    forced onto the merged expert, plus ``pooled``). The ratio divides the merged expert's loss by the better
    (lower) source expert's, per half and pooled."""
    ratios = {}
    for key in (*halves, "pooled"):
        better = min(before["expert_a"][key], before["expert_b"][key])
        ratios[key] = after["merged"][key] / better
    diff = after["served"][verilog] - before["served"][verilog]
    return {"ratio_to_better": ratios, "verilog_before": before["served"][verilog],
            "verilog_after": after["served"][verilog], "verilog_change": diff,
            "within_2pct": ratios["pooled"] <= RATIO_TARGET, "verilog_unchanged": abs(diff) <= BWT_TARGET}


def pad(rows: list[list[float | None]], n: int) -> list[list[float | None]]:
    return [list(r) + [None] * (n - len(r)) for r in rows]


# ---------------------------------------------------------------- runs
def configs(args: argparse.Namespace) -> tuple[DyLoRAConfig, TrainingConfig]:
    system = DyLoRAConfig.from_dict({"model": args.model})
    training = TrainingConfig(seed_steps=args.seed_steps, consolidation_steps=args.consolidation_steps,
                              batch_size=args.batch_size, max_length=args.max_length, report_to=["none"],
                              instruction_views=False, raw_copies=False)  # the chat-only recipe it was measured with
    return system, training


def stream(skills: list[dict], args: argparse.Namespace) -> StreamSpec:
    return StreamSpec(STREAM, [{**s, "max_train": args.max_train, "max_eval": args.max_eval} for s in skills])


def train_shared(args: argparse.Namespace, say) -> Path:
    """The first two steps, trained once and checkpointed to WORK/shared (reused when already there)."""
    path = args.work / "shared"
    if (path / "progress.json").is_file() and not args.retrain:
        say(f"reusing the first two steps in {path}")
        return path
    system, training = configs(args)
    learner = ContinualLearner(DyLoRAMoE.from_config(system), stream(SHARED, args), training, args.work / "logs",
                               data_dir=args.data_dir)
    learner.run(say)
    save_progress(learner, path)
    del learner
    gc.collect()
    return path


def resume(shared: Path, skills: list[dict], args: argparse.Namespace, cls=ContinualLearner, say=None, **kwargs):
    """A learner on the system saved in ``shared``, its two steps restored, run through the third step."""
    _, training = configs(args)
    overrides = {"max_experts": kwargs.pop("max_experts")} if "max_experts" in kwargs else {}
    model = DyLoRAMoE.from_pretrained(shared, **overrides)
    learner = cls(model, stream(skills, args), training, args.work / "logs", data_dir=args.data_dir, **kwargs)
    restore_progress(learner, shared)
    learner.run(say)
    return learner


def forced_part(args: argparse.Namespace, shared: Path, say) -> dict:
    started = time.perf_counter()
    learner = resume(shared, [*SHARED, SAME_SKILL], args, MissedRecognition, say, forced=(2,))
    records = learner.records
    a, verilog_expert, b = (r.novelty.expert_id for r in records)
    if not records[2].novelty.is_novel or a == b:
        raise RuntimeError(f"the forced step did not get an expert of its own: experts {a}, {verilog_expert}, {b}")
    system_dir = args.work / "forced"
    save_progress(learner, system_dir)
    names = [s.skill.name for s in learner.steps]
    halves, verilog = (names[0], names[2]), names[1]
    matrix = pad([r.losses for r in records], 3)
    train_seconds = time.perf_counter() - started
    bs = learner.training.eval_batch_size
    he_steps = {names[0]: learner.steps[0], names[2]: learner.steps[2]}

    def measured(model, experts):
        served = {s.skill.name: summed_loss(model, s, bs) for s in learner.steps}
        forced = {e: mean_losses({k: summed_loss(model, st, bs, e) for k, st in he_steps.items()}, halves)
                  for e in experts}
        return {"served": mean_losses(served), "served_humaneval": mean_losses(served, halves)["pooled"]}, forced

    say(f"measuring the trained system (HumanEval experts {a} and {b}, Verilog expert {verilog_expert})")
    model = DyLoRAMoE.from_pretrained(system_dir)
    before, forced = measured(model, (a, b))
    before |= {"expert_a": forced[a], "expert_b": forced[b], "experts": model.num_experts,
               "routing": routing(model, learner, [{a, b}, {verilog_expert}, {a, b}])}
    del model
    methods = []
    for method in args.methods:
        density = args.density if method in NEEDS_DENSITY else None
        model = DyLoRAMoE.from_pretrained(system_dir)
        memory = RoutingMemory()
        memory.load_tensors(load_file(str(system_dir / MEMORY)))
        torch.manual_seed(args.seed)  # dare drops entries at random
        start = time.perf_counter()
        rank = args.rank if "svd" in method else None
        merged = pool.merge(model, memory, a, b, method=method, rank=rank, density=density)
        seconds = time.perf_counter() - start
        after, forced = measured(model, (merged,))
        after |= {"merged": forced[merged],
                  "routing": routing(model, learner, [{merged}, {verilog_expert}, {merged}])}
        row = {"method": method, "weights": merge_weights(method), "rank": model.experts.ranks[merged],
               "density": density, "experts": model.num_experts, "merge_seconds": seconds, "after": after,
               "bwt_after_merge": bwt_loss([*matrix, [after["served"][n] for n in names]]),
               **merge_figures(before, after, verilog, halves)}
        methods.append(row)
        say(f"{method}: merged {a}+{b} -> {merged} (rank {row['rank']}) ratio {row['ratio_to_better']['pooled']:.4f}"
            f" verilog {row['verilog_change']:+.4f} routing {after['routing']['accuracy']:.3f} in {seconds:.1f}s")
        del model, memory
        gc.collect()
    best = min(methods, key=lambda m: m["ratio_to_better"]["pooled"]) if methods else None
    return {"skills": names, "matrix": matrix, "bwt_before_merge": bwt_loss(matrix),
            "experts_of_steps": [a, verilog_expert, b], "before": before, "methods": methods,
            "best_method": best and best["method"],
            "targets": {"ratio": RATIO_TARGET, "verilog_nats": BWT_TARGET,
                        "met_by": [m["method"] for m in methods if m["within_2pct"] and m["verilog_unchanged"]]},
            "train_seconds": train_seconds, "seconds": time.perf_counter() - started}


def bounded_part(args: argparse.Namespace, shared: Path, say) -> dict:
    started = time.perf_counter()
    skills = [*SHARED, OTHERS[args.other]]
    runs = {}
    for label, bound in (("unbounded", None), ("max_experts=2", 2)):
        say(f"third step {skills[2]['name']}, {label}")
        learner = resume(shared, skills, args, say=say, max_experts=bound)
        records = learner.records
        runs[label] = {"matrix": pad([r.losses for r in records], 3), "experts": learner.model.num_experts,
                       "expert_of_step": [learner.merges.get(r.novelty.expert_id, r.novelty.expert_id)
                                          for r in records],
                       "novel": [r.novelty.is_novel for r in records], "merges": learner.merges,
                       "routing": records[-1].routing, "bwt": bwt_loss(pad([r.losses for r in records], 3))}
        del learner
        gc.collect()
    final = {label: run["matrix"][-1] for label, run in runs.items()}
    return {"skills": [s["name"] for s in skills], "runs": runs,
            "final_change": [b - u for u, b in zip(final["unbounded"], final["max_experts=2"], strict=True)],
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- report
def forced_table(result: dict) -> str:
    names, before = result["skills"], result["before"]
    ha, hb = names[0], names[2]
    ea, eb = before["expert_a"], before["expert_b"]
    lines = [f"before the merge: expert A on {ha} / {hb} / both {ea[ha]:.4f} / {ea[hb]:.4f} / {ea['pooled']:.4f}; "
             f"expert B {eb[ha]:.4f} / {eb[hb]:.4f} / {eb['pooled']:.4f}; HumanEval served "
             f"{before['served_humaneval']:.4f}; Verilog served {before['served'][names[1]]:.4f}; routing "
             f"{before['routing']['accuracy']:.3f}; {before['experts']} experts",
             "", "| method | rank | merged: A-half / B-half / both | ratio to better: both (A-half / B-half) | "
             "HumanEval served | Verilog before -> after (change) | BWT after merge | routing acc | experts | "
             "seconds |", "|---|---:|---|---|---:|---|---:|---:|---:|---:|"]
    for m in result["methods"]:
        merged, r = m["after"]["merged"], m["ratio_to_better"]
        lines.append(f"| {m['method']} | {m['rank']} | {merged[ha]:.4f} / {merged[hb]:.4f} / {merged['pooled']:.4f} | "
                     f"{r['pooled']:.4f} ({r[ha]:.4f} / {r[hb]:.4f}) | {m['after']['served_humaneval']:.4f} | "
                     f"{m['verilog_before']:.4f} -> {m['verilog_after']:.4f} ({m['verilog_change']:+.4f}) | "
                     f"{m['bwt_after_merge']:+.4f} | {m['after']['routing']['accuracy']:.3f} | {m['experts']} | "
                     f"{m['merge_seconds']:.1f} |")
    return "\n".join(lines)


def matrix_table(skills: list[str], matrix: list[list[float | None]]) -> str:
    lines = ["| after step | " + " | ".join(skills) + " |", "|---|" + "---:|" * len(skills)]
    for i, row in enumerate(matrix):
        lines.append(f"| {i + 1} ({skills[i]}) | " + " | ".join("-" if v is None else f"{v:.4f}" for v in row) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/merge/merge.json"),
                   help="the whole result; each part also in OUT's folder as forced.json / bounded.json")
    p.add_argument("--work", type=Path, default=Path("/tmp/dylora-merge"),
                   help="saved systems and logs (the shared first two steps are reused when present)")
    p.add_argument("--retrain", action="store_true", help="train the shared first two steps again")
    p.add_argument("--part", choices=("forced", "bounded", "both"), default="both")
    p.add_argument("--data-dir", default=None, help="datasets folder (../shared/data), for the bounded part")
    p.add_argument("--other", choices=sorted(OTHERS), default="spider", help="the bounded part's third skill")
    p.add_argument("--model", default="default")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=list(METHODS))
    p.add_argument("--rank", type=int, default=None, help="rank of an svd merge (default: the larger rank)")
    p.add_argument("--density", type=float, default=0.5, help="share of entries ties_svd/dare_ties_svd keep")
    p.add_argument("--max-train", type=int, default=32, help="training examples per step")
    p.add_argument("--max-eval", type=int, default=16, help="held-out examples per step")
    p.add_argument("--seed-steps", type=int, default=4)
    p.add_argument("--consolidation-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    shared = train_shared(args, say)
    result = {"argv": sys.argv[1:] if argv is None else list(argv), "model": args.model,
              "sizes": {k: getattr(args, k) for k in ("max_train", "max_eval", "seed_steps", "consolidation_steps",
                                                      "batch_size", "max_length", "rank", "density")}}
    folder = args.out.parent
    if args.part in ("forced", "both"):
        result["forced"] = forced_part(args, shared, say)
        write_json(folder / "forced.json", result["forced"])
        print(matrix_table(result["forced"]["skills"], result["forced"]["matrix"]))
        print(forced_table(result["forced"]))
    if args.part in ("bounded", "both"):
        if args.data_dir is None:
            say("bounded part skipped: its third skill needs --data-dir")
        else:
            result["bounded"] = bounded_part(args, shared, say)
            write_json(folder / "bounded.json", result["bounded"])
            for label, run in result["bounded"]["runs"].items():
                print(f"{label}: {run['experts']} experts, expert of each step {run['expert_of_step']}")
                print(matrix_table(result["bounded"]["skills"], run["matrix"]))
    result["seconds"] = time.perf_counter() - started
    write_json(args.out, json.loads(json.dumps(result, default=str)))
    return result


if __name__ == "__main__":
    main()
