"""Can the known experts' losses tell composed data (two known skills at once) from a new skill? A measurement of
the idea before building it into the novelty decision (the frozen model's embedding cannot:
``benchmarks/novelty_parts.py``).

    python benchmarks/novelty_losses.py --data-dir ../shared/data --out results/composed/novelty_losses.json

A system learns the single skills the composed pairs need (MBPP Python, Spider SQL, NL2Bash shell) as a stream
with the recipe of ``configs/streams/shared-code.yaml`` (``benchmarks/composed.py``'s stream, sizes as given).
Then every response token of held-out data is scored by the frozen model and by each expert forced:

- ``own``: the known skills' held-out examples, each under its own expert: what an expert does for its skill.
- composed pairs (``data/composed.py``, records the single skills did not use) and skills the system has not
  learned (HumanEval-X JavaScript, C++, Java; VerilogEval; CodeAlpaca), which must stay novel.

Per example, ``single`` is the best expert's response loss relative to the frozen model's, and ``pair`` the
relative loss when each token takes the better of the best pair of experts (what a perfect per-token mixture of
two known experts could do). An example is *explained* by a statistic when its value is within the same
statistic's values on the known skills' own held-out examples (conformal, 5% level: the pair statistic is
calibrated on known data's pair statistic, which a per-token minimum lowers by noise alone). The rule that would
recognise a mixture: most examples explained by a pair, and not by one expert; a new skill must leave most of
its examples unexplained by both.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from composed import composed_data, stream_and_configs
from dylora_moe.data.preprocess import build_dataset
from dylora_moe.data.stream import SkillSource, SkillSpec, load_examples, split_examples
from dylora_moe.model import DyLoRAMoE
from dylora_moe.training.loop import ContinualLearner
from dylora_moe.training.measure import token_losses
from results import write_json

NEW = {"javascript": SkillSource(name="humaneval-x", language="js"),
       "cpp": SkillSource(name="humaneval-x", language="cpp"),
       "java": SkillSource(name="humaneval-x", language="java"),
       "verilog": SkillSource(name="verilogeval"), "general": SkillSource(name="codealpaca")}


def relative(frozen: torch.Tensor, experts: dict[int, torch.Tensor]) -> dict[str, object]:
    """One example's token losses [n] under the frozen model and under each expert -> the best expert's mean loss
    relative to the frozen model's (``single``) and the best pair's per-token minimum relative to it (``pair``,
    with the pair), the best single expert and the share of tokens the pair's first expert wins."""
    base = frozen.mean().clamp(min=1e-6)
    best = min(experts, key=lambda e: experts[e].mean().item())
    out: dict[str, object] = {"single": (experts[best].mean() / base).item(), "expert": best,
                              "pair": (experts[best].mean() / base).item(), "pair_experts": [best], "share": 1.0}
    for a, b in itertools.combinations(sorted(experts), 2):
        value = (torch.minimum(experts[a], experts[b]).mean() / base).item()
        if value < out["pair"]:
            out.update(pair=value, pair_experts=[a, b], share=(experts[a] <= experts[b]).double().mean().item())
    return out


def explained_share(reference: list[float], values: list[float], level: float = 0.05) -> float:
    """Share of ``values`` within ``reference``: the conformal p-value of each (how many reference values are at
    least as large) above ``level``; lower relative loss is better explained."""
    ref = torch.tensor(reference, dtype=torch.float64)
    val = torch.tensor(values, dtype=torch.float64)
    p_values = ((ref[None] >= val[:, None]).sum(1) + 1) / (ref.numel() + 1)
    return float((p_values > level).double().mean())


def median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--pairs", default="sql-python,bash-python")
    p.add_argument("--max-train", type=int, default=32, help="training examples per single skill")
    p.add_argument("--max-eval", type=int, default=32, help="held-out examples per single skill (the reference)")
    p.add_argument("--examples", type=int, default=16, help="examples per composed pair and per new skill")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per scored example (VerilogEval's are long)")
    p.add_argument("--seed-steps", type=int, default=None)
    p.add_argument("--consolidation-steps", type=int, default=None)
    args = p.parse_args(argv)
    args.composed_train, args.composed_eval = 0, args.examples
    started = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    stream, system, training, pairs = stream_and_configs(args)
    model = DyLoRAMoE.from_config(system)
    learner = ContinualLearner(model, stream, training, args.out.parent / "logs" / "novelty_losses",
                               data_dir=args.data_dir)
    learner.run(say)
    experts = {r.skill: r.novelty.expert_id for r in learner.records}
    tok = model.tokenizer
    sets = {f"own:{s.skill.name}": (s.held_out, experts[s.skill.name]) for s in learner.steps}
    sets |= {f"C:{pair}": (composed_data(args, pair)[1], None) for pair in pairs}
    for name, source in NEW.items():
        held = split_examples(load_examples(SkillSpec(name, source=source), args.data_dir), 0.2)[1]
        sets[f"new:{name}"] = (held[: args.examples], None)

    rows = {}
    for name, (examples, own) in sets.items():
        say(f"scoring {name} ({len(examples)} examples)")
        data = build_dataset(tok, examples, max_length=args.max_length)
        with model.force_expert(None):
            frozen = token_losses(model, data, training.eval_batch_size)
        per_expert = {}
        for e in model.experts.expert_ids:
            with model.force_expert(e):
                per_expert[e] = token_losses(model, data, training.eval_batch_size)
        stats = [relative(f, {e: per_expert[e][k] for e in per_expert}) for k, f in enumerate(frozen)]
        if own is not None:  # the reference: each known example under its own expert
            for k, stat in enumerate(stats):
                stat["own"] = (per_expert[own][k].mean() / frozen[k].mean().clamp(min=1e-6)).item()
        rows[name] = {"frozen_loss": median([f.mean().item() for f in frozen]), "examples": stats}

    known = [s for name, r in rows.items() if name.startswith("own:") for s in r["examples"]]
    reference = {stat: [s[stat] for s in known] for stat in ("single", "pair", "own")}
    names = {e: skill for skill, e in experts.items()}
    summary = []
    for name, r in rows.items():
        singles = [s["single"] for s in r["examples"]]
        pairs_ = [s["pair"] for s in r["examples"]]
        best = [names[s["expert"]] for s in r["examples"]]
        line = {"data": name, "frozen_loss": r["frozen_loss"], "single": median(singles), "pair": median(pairs_),
                "explained_single": explained_share(reference["single"], singles),
                "explained_pair": explained_share(reference["pair"], pairs_),
                "best_expert": {s: best.count(s) / len(best) for s in dict.fromkeys(best)}}
        summary.append(line)
        print(f"{name:18s} frozen {line['frozen_loss']:.3f}  single {line['single']:.3f} "
              f"(explained {line['explained_single']:.2f})  pair {line['pair']:.3f} "
              f"(explained {line['explained_pair']:.2f})  best " +
              " ".join(f"{k} {v:.2f}" for k, v in line["best_expert"].items()), flush=True)
    write_json(args.out, {"command": " ".join(["python", "benchmarks/novelty_losses.py", *(argv or sys.argv[1:])]),
                          "skills": list(experts), "reference_median": {k: median(v) for k, v in reference.items()},
                          "training": {"max_train": args.max_train, "seed_steps": training.seed_steps,
                                       "consolidation_steps": training.consolidation_steps},
                          "summary": summary, "seconds": time.perf_counter() - started,
                          "examples": {n: r["examples"] for n, r in rows.items()}})


if __name__ == "__main__":
    main()
