"""Composed tasks (inputs that need two skills at once) on a system that learned the single skills.

    python benchmarks/composed.py --data-dir ../shared/data --out results/composed
    python benchmarks/composed.py --data-dir ../shared/data --out runs/composed-quick --max-train 16 \\
        --seed-steps 2 --consolidation-steps 2 --composed-eval 8 --score-limit 4     # a quick look

The system learns the single skills the pairs need (MBPP Python, Spider SQL, NL2Bash shell; HumanEval-X
JavaScript for python-js) as a stream, with the continual loop and the stream's recipe of
``configs/streams/shared-code.yaml``. Then, for each composed pair (``data/composed.py``, drawn from records the
single skills did not train on), it measures on held-out composed examples and on the single skills' held-out
examples:

- ``frozen``: the backbone alone. ``top1``: the gate as the stream left it (single-label), top-1.
- ``top2``: the gate refitted with multi-label rows (the routing features of ``--composed-train`` composed
  prompts per pair, their label set's experts as a soft target), fixed top-2.
- ``cumulative``: that gate, top-2 with k chosen per input by the cumulative-weight rule
  (``RouterConfig.cumulative_weight``); the threshold is chosen on a selection half of every evaluation set
  (lowest composed loss among thresholds whose single-skill loss is within 1% of top-1's) and reported on the
  other half. ``cumulative_single``: the same rule with the single-label gate (no composed rows).
- ``token``: per-token routing, top-1 per token, with a gate fitted on per-token rows of the single skills.
- ``merged``: the pair's two experts merged into one (peft ``add_weighted_adapter``, ``cat``, weights 0.5).
- ``joint_lora``: one LoRA trained on all the single skills' data (``evaluation/baselines.py``): the bound.

Loss is the eval loss on response tokens (nats); scores are greedy-decoding checks of ``--score-limit`` composed
examples per pair (``evaluation/composed.py``: the whole task, and each skill's part). The novelty decision with
``NoveltyConfig.mixtures`` on is recorded for every pair (no expert is created by it here) and for a skill the
system has not learned (a control that must stay novel). All figures are on the confirmation half. Writes
OUT/composed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.composed import composed
from dylora_moe.data.preprocess import build_dataset, render_prompt
from dylora_moe.data.sources import Example
from dylora_moe.data.stream import SkillSource, SkillSpec, StreamSpec, load_examples, load_stream, split_examples
from dylora_moe.evaluation.baselines import JointLoRA
from dylora_moe.evaluation.benchmark import BenchmarkConfig
from dylora_moe.evaluation.composed import MAX_NEW_TOKENS, composed_checker
from dylora_moe.model import DyLoRAMoE
from dylora_moe.routing.fit import fit_gate
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.loop import TOKEN_ROWS_PER_EXAMPLE, ContinualLearner
from dylora_moe.training.measure import eval_loss
from dylora_moe.training.rehearsal import RoutingMemory, mixture_key
from results import write_json

ROOT = Path(__file__).resolve().parents[1]
SKILLS = {  # single skills, on the records the composed pairs do not use (COMPOSED_START)
    "python": SkillSource(name="mbpp", stop=300),
    "sql": SkillSource(name="spider", stop=400),
    "shell": SkillSource(name="nl2bash", stop=400),
    "javascript": SkillSource(name="humaneval-x", language="js"),
}
PAIR_SKILLS = {"sql-python": ("sql", "python"), "bash-python": ("shell", "python"),
               "python-js": ("python", "javascript")}
COMPOSED_START = {"sql-python": 400, "bash-python": 400, "python-js": 0}
CONTROL = {"javascript": SkillSource(name="humaneval-x", language="js"),  # a skill the system has not learned
           "cpp": SkillSource(name="humaneval-x", language="cpp")}
COMPOSED_MAX_LENGTH = 512  # Spider schemas make long prompts; the composed response must fit after them
VARIANTS = ("frozen", "top1", "top2", "cumulative", "cumulative_single", "token", "merged", "joint_lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="datasets folder (../shared/data)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "composed")
    p.add_argument("--model", default="default")
    p.add_argument("--pairs", default="sql-python,bash-python")
    p.add_argument("--max-train", type=int, default=96, help="training examples per single skill")
    p.add_argument("--max-eval", type=int, default=32, help="held-out examples per single skill")
    p.add_argument("--composed-train", type=int, default=32, help="composed prompts per pair for the gate")
    p.add_argument("--composed-eval", type=int, default=32, help="held-out composed examples per pair")
    p.add_argument("--score-limit", type=int, default=16, help="composed examples per pair scored by decoding")
    p.add_argument("--seed-steps", type=int, default=None)
    p.add_argument("--consolidation-steps", type=int, default=None)
    p.add_argument("--grid", default="0.6,0.7,0.8,0.9", help="cumulative-weight thresholds to choose from")
    p.add_argument("--skip-joint", action="store_true", help="leave joint_lora out (it trains a second system)")
    return p.parse_args(argv)


def stream_and_configs(args) -> tuple[StreamSpec, DyLoRAConfig, TrainingConfig, list[str]]:
    recipe = load_stream(ROOT / "configs" / "streams" / "shared-code.yaml")
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    names = [s for s in SKILLS if any(s in PAIR_SKILLS[p] for p in pairs)]
    skills = [SkillSpec(name, source=copy.deepcopy(SKILLS[name]), max_train=args.max_train, max_eval=args.max_eval)
              for name in names]
    overrides = {k: v for k, v in (("seed_steps", args.seed_steps),
                                   ("consolidation_steps", args.consolidation_steps)) if v is not None}
    training = TrainingConfig(**{**recipe.training, **overrides, "report_to": ["none"]})
    system = DyLoRAConfig.from_dict({**recipe.system, "model": args.model})
    return StreamSpec("composed-singles", skills), system, training, pairs


# ---------------------------------------------------------------- data
def halves(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """Selection and confirmation halves (alternate examples of a content-hash split)."""
    return examples[0::2], examples[1::2]


def composed_data(args, pair: str) -> tuple[list[Example], list[Example]]:
    start = COMPOSED_START[pair]
    examples = composed(args.data_dir, pair)[start : start + 4 * (args.composed_train + args.composed_eval)]
    train, held = split_examples(examples, 0.5)
    return train[: args.composed_train], held[: args.composed_eval]


# ---------------------------------------------------------------- routing variants
@contextlib.contextmanager
def routed(model: DyLoRAMoE, gate: dict, *, top_k: int = 1, cumulative: float | None = None,
           granularity: str = "sequence"):
    """Evaluate under one gate state and routing rule; everything is restored afterwards."""
    router, cfg = model.router, model.config.router
    saved = (copy.deepcopy(router.gate.state_dict()), router.top_k, router.cumulative_weight, cfg.granularity)
    router.gate.load_state_dict(gate)
    router.top_k, router.cumulative_weight, cfg.granularity = top_k, cumulative, granularity
    try:
        yield
    finally:
        router.gate.load_state_dict(saved[0])
        router.top_k, router.cumulative_weight, cfg.granularity = saved[1:]


def gate_state(model: DyLoRAMoE) -> dict:
    return copy.deepcopy(model.router.gate.state_dict())


def multi_label_gate(model: DyLoRAMoE, learner: ContinualLearner, composed_train: dict, skill_of: dict) -> dict:
    """The gate refitted on the routing memory plus each pair's composed prompts as multi-label rows."""
    memory = copy.deepcopy(learner.memory)
    for pair, examples in composed_train.items():
        prompts = [render_prompt(model.tokenizer, e.prompt, True) for e in examples]
        features = model.routing_features_for(prompts, max_length=COMPOSED_MAX_LENGTH)
        skills = [skill_of[s] for s in PAIR_SKILLS[pair]]
        memory.add(mixture_key([s for s, _ in skills]), [e for _, e in skills], features)
    saved = gate_state(model)
    fit_gate(model.router, *memory.batch(model.experts.expert_ids, model.device),
             steps=learner.training.router_fit_steps)
    gate = gate_state(model)
    model.router.gate.load_state_dict(saved)
    return gate


def token_gate(model: DyLoRAMoE, learner: ContinualLearner) -> dict:
    """A gate fitted on per-token rows of the single skills' training texts (their prompts and responses)."""
    memory = RoutingMemory(learner.training.rehearsal_per_skill * TOKEN_ROWS_PER_EXAMPLE, seed=learner.training.seed)
    saved = gate_state(model)
    with routed(model, saved, granularity="token"):
        for step, record in zip(learner.steps, learner.records, strict=True):
            sample = step.train[: learner.training.rehearsal_per_skill]
            texts = [p + e.response for p, e in zip(learner.prompts(step, sample), sample, strict=True)]
            memory.add(record.novelty.skill_id, record.novelty.expert_id,
                       model.routing_features_for(texts, max_length=learner.training.max_length))
        fit_gate(model.router, *memory.batch(model.experts.expert_ids, model.device),
                 steps=learner.training.router_fit_steps)
        gate = gate_state(model)
    return gate


# ---------------------------------------------------------------- measuring
def losses(model: DyLoRAMoE, sets: dict[str, object], batch_size: int) -> dict[str, float]:
    return {name: eval_loss(model, data, batch_size) for name, data in sets.items()}


def scores(model: DyLoRAMoE, examples: dict[str, list[Example]], checkers: dict) -> dict[str, dict]:
    out = {}
    for pair, items in examples.items():
        if not items:
            continue
        completions = model.complete([e.prompt for e in items], max_new_tokens=MAX_NEW_TOKENS[pair], batch_size=8,
                                     max_prompt_tokens=1024)
        results = [checkers[pair](e, c) for e, c in zip(items, completions, strict=True)]
        out[pair] = {k: sum(r[k] for r in results) / len(results) for k in results[0]} | {"n": len(results)}
    return out


def two_expert_share(model: DyLoRAMoE, examples: list[Example], gate: dict, cumulative: float) -> float:
    """Share of composed prompts the cumulative rule sends to two experts."""
    prompts = [render_prompt(model.tokenizer, e.prompt, True) for e in examples]
    features = model.routing_features_for(prompts, max_length=COMPOSED_MAX_LENGTH)
    with routed(model, gate, top_k=2, cumulative=cumulative), torch.no_grad():
        weights = model.router(features.to(model.device)).weights
    return float((weights > 0).sum(-1).eq(2).float().mean())


def novelty_decisions(model: DyLoRAMoE, args, composed_train: dict, learned: list[str]) -> dict:
    """The mixture-aware decision on each pair's composed data and on an unlearned skill; no expert is made."""
    model.config.novelty.mixtures = True
    names = {s.skill_id: s.name for s in model.library.skills.values()}
    control = next(name for name in CONTROL if name not in learned)
    spec = SkillSpec(control, source=CONTROL[control])
    datasets = {**composed_train, f"control:{control}": split_examples(load_examples(spec, args.data_dir), 0.2)[0]}
    out = {}
    for name, examples in datasets.items():
        sample = model.embed_sample(examples[: model.config.novelty.max_examples])
        decision = model.novelty.decide(sample, torch.nn.functional.normalize(sample.mean, dim=0),
                                        (model.router, list(model.experts.expert_ids)))
        out[name] = {"novel": decision.is_novel, "nearest": names.get(decision.nearest_skill),
                     "components": [names[c] for c in decision.components] if decision.components else None,
                     "mixture_weight": decision.mixture_weight, "statistic": decision.statistic,
                     "p_value": decision.p_value, "boundary": decision.boundary,
                     "single": {names[k]: v for k, v in decision.scores.items()}}
        print(f"novelty {name}: {out[name]}", flush=True)
    model.config.novelty.mixtures = False
    return out


def choose_threshold(model, grid, multi_gate, top1_gate, sel_composed, sel_single, batch) -> tuple[float, list]:
    """The threshold with the lowest composed selection loss among those within 1% of top-1 on the single skills
    (the highest threshold when none is)."""
    with routed(model, top1_gate):
        base_single = mean(losses(model, sel_single, batch))
    table = []
    for tau in grid:
        with routed(model, multi_gate, top_k=2, cumulative=tau):
            table.append({"threshold": tau, "composed": mean(losses(model, sel_composed, batch)),
                          "single": mean(losses(model, sel_single, batch)), "single_top1": base_single})
    fine = [row for row in table if row["single"] <= 1.01 * base_single]
    best = min(fine, key=lambda r: r["composed"]) if fine else max(table, key=lambda r: r["threshold"])
    return best["threshold"], table


def mean(values) -> float:
    values = list(values.values()) if isinstance(values, dict) else list(values)
    return sum(values) / len(values)


# ---------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    stream, system, training, pairs = stream_and_configs(args)
    say = lambda msg: print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    model = DyLoRAMoE.from_config(system)
    learner = ContinualLearner(model, stream, training, args.out / "logs" / "dylora", data_dir=args.data_dir)
    learner.run(say)
    skill_of = {r.skill: (r.novelty.skill_id, r.novelty.expert_id) for r in learner.records}
    experts_after_stream = model.num_experts
    tok, batch = model.tokenizer, training.eval_batch_size

    data = {pair: composed_data(args, pair) for pair in pairs}
    composed_train = {pair: train for pair, (train, _) in data.items()}
    sel_c, conf_c = {}, {}
    for pair, (_, held) in data.items():
        sel, conf = halves(held)
        sel_c[pair] = build_dataset(tok, sel, max_length=COMPOSED_MAX_LENGTH)
        conf_c[pair] = build_dataset(tok, conf, max_length=COMPOSED_MAX_LENGTH)
    sel_s, conf_s = {}, {}
    for step in learner.steps:
        sel, conf = halves(step.held_out)
        sel_s[step.skill.name] = build_dataset(tok, sel, max_length=training.max_length)
        conf_s[step.skill.name] = build_dataset(tok, conf, max_length=training.max_length)
    score_items = {pair: halves(held)[1][: args.score_limit] for pair, (_, held) in data.items()}
    bench = BenchmarkConfig()
    checkers = {pair: composed_checker(pair, data_dir=args.data_dir, cache=bench.spider_cache) for pair in pairs}

    say("novelty decisions with mixtures on")
    novelty = novelty_decisions(model, args, composed_train, [s.name for s in stream.skills])
    say("fitting the multi-label and per-token gates")
    gates = {"single": gate_state(model), "multi": multi_label_gate(model, learner, composed_train, skill_of),
             "token": token_gate(model, learner)}
    grid = [float(x) for x in args.grid.split(",")]
    tau, selection = choose_threshold(model, grid, gates["multi"], gates["single"], sel_c, sel_s, batch)
    say(f"cumulative threshold chosen on the selection half: {tau}")

    settings = {
        "top1": dict(gate=gates["single"]),
        "top2": dict(gate=gates["multi"], top_k=2),
        "cumulative": dict(gate=gates["multi"], top_k=2, cumulative=tau),
        "cumulative_single": dict(gate=gates["single"], top_k=2, cumulative=tau),
        "token": dict(gate=gates["token"], granularity="token"),
    }
    results: dict[str, dict] = {}
    with model.force_expert(None):
        results["frozen"] = measure(model, conf_c, conf_s, score_items, checkers, batch, say, "frozen")
    for name, kwargs in settings.items():
        with routed(model, **kwargs):
            results[name] = measure(model, conf_c, conf_s, score_items, checkers, batch, say, name)
    results["merged"] = merged(model, pairs, skill_of, conf_c, conf_s, score_items, checkers, batch, say)
    shares = {pair: two_expert_share(model, halves(held)[1], gates["multi"], tau) for pair, (_, held) in data.items()}
    single_shares = {s: two_expert_share(model, halves(step.held_out)[1], gates["multi"], tau)
                     for s, step in zip([s.name for s in learner.skills], learner.steps, strict=True)}
    assert model.num_experts == experts_after_stream
    del model, learner

    if not args.skip_joint:
        say("joint_lora: one LoRA on every single skill's data")
        joint_model = DyLoRAMoE.from_config(system)
        joint = JointLoRA(joint_model, stream, training, args.out / "logs" / "joint_lora", data_dir=args.data_dir)
        joint.run(say)
        with joint_model.force_expert(next(iter(joint.expert_of_label.values()))):
            results["joint_lora"] = measure(joint_model, conf_c, conf_s, score_items, checkers, batch, say,
                                            "joint_lora")

    report = {"model": system.model, "pairs": pairs, "skills": [s.name for s in stream.skills],
              "command": "python benchmarks/composed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "training": {"seed_steps": training.seed_steps, "consolidation_steps": training.consolidation_steps,
                           "max_train": args.max_train, "composed_train": args.composed_train},
              "eval_sizes": {"composed_confirmation": {p: len(d) for p, d in conf_c.items()},
                             "single_confirmation": {s: len(d) for s, d in conf_s.items()}},
              "experts_after_stream": experts_after_stream, "novelty": novelty,
              "cumulative_threshold": tau, "threshold_selection": selection,
              "two_expert_share": {"composed": shares, "single": single_shares},
              "results": results, "gap_closed": gap_closed(results, pairs),
              "seconds": time.perf_counter() - started}
    write_json(args.out / "composed.json", report)
    print(table(report))


def measure(model, conf_c, conf_s, score_items, checkers, batch, say, name) -> dict:
    say(f"{name}: losses and decoding scores")
    return {"composed_loss": losses(model, conf_c, batch), "single_loss": losses(model, conf_s, batch),
            "scores": scores(model, score_items, checkers)}


def merged(model, pairs, skill_of, conf_c, conf_s, score_items, checkers, batch, say) -> dict:
    """Each pair's two experts merged into one, evaluated on that pair (and its two single skills)."""
    out = {"composed_loss": {}, "single_loss": {}, "scores": {}}
    for pair in pairs:
        a, b = (skill_of[s][1] for s in PAIR_SKILLS[pair])
        expert = model.experts.merge_experts([a, b], [0.5, 0.5], "cat")
        model.experts.disable_adapters()
        model.mixture.sync()
        model.router.add_expert()
        model.mark_mature(expert)
        with model.force_expert(expert):
            part = measure(model, {pair: conf_c[pair]}, {s: conf_s[s] for s in PAIR_SKILLS[pair]},
                           {pair: score_items[pair]}, checkers, batch, say, f"merged {pair}")
        model.delete_expert(expert)
        out["composed_loss"][pair] = part["composed_loss"][pair]
        out["scores"].update(part["scores"])
        out["single_loss"].update({f"{s} ({pair})": v for s, v in part["single_loss"].items()})
    return out


def gap_closed(results: dict, pairs: list[str]) -> dict[str, float | None]:
    """Per variant: the share of the top-1 to joint_lora gap in composed loss it closes (1 = the bound). Empty
    when joint_lora is missing or is not below top-1 (then it bounds nothing and the share is undefined)."""
    if "joint_lora" not in results:
        return {}
    top1, joint = (mean(results[v]["composed_loss"]) for v in ("top1", "joint_lora"))
    gap = top1 - joint
    if gap <= 1e-9:
        return {}
    return {v: (top1 - mean(r["composed_loss"])) / gap for v, r in results.items()}


def table(report: dict) -> str:
    pairs, results = report["pairs"], report["results"]
    singles = report["skills"]
    head = ["variant"] + [f"{p} loss" for p in pairs] + [f"{s} loss" for s in singles] + \
        [f"{p} pass" for p in pairs] + ["gap closed"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        cells = [f"{r['composed_loss'][p]:.3f}" for p in pairs]
        cells += [f"{r['single_loss'][s]:.3f}" if s in r["single_loss"] else "-" for s in singles]
        cells += [f"{r['scores'][p]['pass']:.2f}" if p in r["scores"] else "-" for p in pairs]
        g = report["gap_closed"].get(name)
        cells.append("-" if g is None else f"{g:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
