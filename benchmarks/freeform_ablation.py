"""Why experts answer ordinary requests with whitespace, and which recipe change stops it: one skill trained
alone under each variant of the recipe, then asked free-form requests of its domain (chat template and raw).

    python benchmarks/freeform_ablation.py --skill verilogeval --out results/freeform_ablation_verilog.json \\
        --arm frozen --arm "before:kl_weight=0,strip_leading_blank_lines=false" --arm recipe --limit 8 \\
        --max-new-tokens 64

Each ``--arm NAME[:field=value,...]`` sets ``TrainingConfig`` fields (``repetition_penalty=...`` is a
decoding option instead). ``--system DIR`` asks a system trained elsewhere (``dylora train``'s OUT/system)
instead; the arm ``frozen`` then asks its backbone with no expert. The requests are the tuning set: the
skill's own source phrased as requests, on problems the skill does not train on (VerilogEval Human
descriptions without the module header; HumanEval problems as requests; NL2Bash descriptions from the middle of
the source asked as "What is the bash command to ...?", which needs ``--data-dir``); the reported evaluation
(``dylora train``'s report, the benchmark) uses other sources, or for NL2Bash other descriptions (the end of the
source) in another phrasing ("How do I ... in bash?").
Reports per arm: eval loss in the training format, degenerate rate and kinds per form, the share of answers in
the skill's language (a statement of it: ``module``/``assign``/``always``; ``def``/``return``), every answer,
and the degenerate rate of the answers cut to 64, 96 and 128 tokens when they are longer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import time
from pathlib import Path

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.data.sources import humaneval, nl2bash
from dylora_moe.data.stream import SkillSpec, StreamSpec
from dylora_moe.evaluation.degenerate import degenerate_kind, degenerate_rate
from dylora_moe.evaluation.freeform import (
    EXAMPLE_REQUESTS,
    PREFIX_TOKENS,
    humaneval_request,
    truncated,
    verilog_requests,
)
from dylora_moe.evaluation.redact import CopyFilter
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.loop import ContinualLearner
from results import write_json

SKILLS = {
    "verilogeval": SkillSpec("verilogeval", {"type": "builtin", "name": "verilogeval"}, max_train=96, max_eval=24),
    "humaneval": SkillSpec("humaneval", {"type": "builtin", "name": "humaneval", "stop": 82}, max_eval=24),
    "nl2bash": SkillSpec("nl2bash", {"type": "builtin", "name": "nl2bash", "stop": 400}, max_train=96, max_eval=32),
}
NL2BASH_TUNING = 6000  # the tuning requests' first index: past every stream's slice, far from the end

# an answer in the skill's language holds one of its statements (a whole module or a body both count)
LANGUAGE = {"verilogeval": re.compile(r"^\s*(module\s+\w+|assign\s+\w+|always\s*@|reg\s|wire\s)", re.MULTILINE),
            "humaneval": re.compile(r"^\s*(def\s+\w+\s*\(|return\b|if\s.*:|for\s.*:)", re.MULTILINE),
            "nl2bash": re.compile(r"(^|`)\s*(find|ls|grep|cat|echo|sed|awk|tar|cp|mv|rm|chmod|chown|sort|xargs|head|"
                                  r"tail|wc|cut|mkdir|cd|du|df|ps|kill|ssh|curl|wget|git|tr|uniq|ln|touch|read|"
                                  r"export|set|history|date)\b", re.MULTILINE)}


def parse_arm(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    values = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        values[key.strip()] = yaml_value(value.strip())
    return name, values


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def tuning_requests(skill: str, train_examples, limit: int, data_dir: Path | None = None) -> list[str]:
    seen = {e.meta.get("task_id") for e in train_examples}
    if skill == "nl2bash":
        rows = nl2bash(data_dir)[NL2BASH_TUNING: NL2BASH_TUNING + limit]
        return [f"What is the bash command to {e.prompt.removeprefix('# ').strip().rstrip('.')}?" for e in rows]
    if skill == "verilogeval":  # the shortest problem statements: what a user types, and cheap to answer
        requests = sorted((e.prompt for e in verilog_requests("Human", exclude_tasks=seen, limit=200)), key=len)
        requests = requests[:limit]
        return requests + [r for r in EXAMPLE_REQUESTS if "Verilog" in r]
    problems = [humaneval_request(e).prompt for e in humaneval() if e.meta["task_id"] not in seen][:limit]
    return problems + [r for r in EXAMPLE_REQUESTS if "Python" in r]


def run_arm(name: str, values: dict, args) -> dict:
    penalty = values.pop("repetition_penalty", None)
    # the arms vary the chat-only recipe the committed figures were measured from (views and raw copies off)
    training = TrainingConfig(**{"seed_steps": 8, "consolidation_steps": 16, "batch_size": 4, "max_length": 256,
                                 "report_to": ["none"], "router_fit_steps": 50, "instruction_views": False,
                                 "raw_copies": False, **values})
    if args.system is not None:  # a system trained elsewhere (e.g. `dylora train`'s OUT/system): ask it only
        model, name = DyLoRAMoE.from_pretrained(args.system).eval(), "frozen" if name == "frozen" else name
    else:
        model = DyLoRAMoE.from_config(DyLoRAConfig(device="cpu")).eval()
    stream = StreamSpec("ablation", [dataclasses.replace(SKILLS[args.skill])])
    learner = ContinualLearner(model, stream, training, args.out.parent / "ablation-logs" / name,
                               data_dir=args.data_dir)
    start = time.perf_counter()
    trains = name != "frozen" and args.system is None
    record = learner.run_step(0) if trains else None
    seconds = time.perf_counter() - start
    data = learner.steps[0] if learner.steps else learner.prepare(stream.skills[0])
    requests = tuning_requests(args.skill, data.train, args.limit, args.data_dir)
    row = {"arm": name, "overrides": values, "repetition_penalty": penalty, "train_seconds": seconds,
           "eval_loss": record.losses[0] if record else None, "forms": {}}
    for form in ("chat", "raw"):
        prompts = requests if form == "chat" else [r + "\n" for r in requests]
        kwargs = {"repetition_penalty": penalty} if penalty else {}
        with model.force_expert(None) if name == "frozen" and model.num_experts else contextlib.nullcontext():
            answers = complete(model, prompts, form == "chat", args.max_new_tokens, **kwargs)
        kinds = [degenerate_kind(a) for a in answers]
        row["forms"][form] = {"degenerate": sum(k is not None for k in kinds) / len(kinds),
                              "in_language": sum(bool(LANGUAGE[args.skill].search(a)) for a in answers) / len(answers),
                              "kinds": {k: kinds.count(k) for k in set(kinds) if k},
                              # the same answers cut to shorter lengths: the loops a short budget hides
                              "degenerate_at": {str(n): degenerate_rate(truncated(model.tokenizer, answers, n))
                                                for n in PREFIX_TOKENS if n < args.max_new_tokens},
                              # every answer with its kind, each by its request's position; a dataset's text
                              # stays in the dataset: only the README's own requests are quoted, and what an
                              # answer copies from its request is redacted
                              "answers": [{"index": k, "request": r, "answer": a, "kind": kind}
                                          if r in EXAMPLE_REQUESTS else
                                          {"index": k, "answer": CopyFilter.of([r])(a), "kind": kind}
                                          for k, (r, a, kind) in enumerate(zip(requests, answers, kinds,
                                                                               strict=True))]}
    print(name, {f: (v["degenerate"], v["in_language"]) for f, v in row["forms"].items()}, "(degenerate, in "
          "language) eval_loss", row["eval_loss"], flush=True)
    return row


def complete(model, prompts, chat: bool, max_new_tokens: int, **kwargs) -> list[str]:
    if not kwargs:
        return model.complete(prompts, chat=chat, max_new_tokens=max_new_tokens, batch_size=16)
    tok = model.tokenizer
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, **kwargs)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skill", choices=sorted(SKILLS), default="verilogeval")
    p.add_argument("--arm", action="append", default=[], help="NAME[:field=value,...]; 'frozen' trains nothing")
    p.add_argument("--limit", type=int, default=12, help="requests from the dataset (plus the README's)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--system", type=Path, default=None,
                   help="ask this saved system instead of training one (arms then only name decoding options)")
    p.add_argument("--data-dir", type=Path, default=None, help="the shared data (needed by --skill nl2bash)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.skill == "nl2bash" and args.data_dir is None:
        p.error("--skill nl2bash reads NL2Bash from the shared data: pass --data-dir ../shared/data")
    rows = []
    for arm in args.arm or ["frozen", "baseline"]:
        rows.append(run_arm(*parse_arm(arm), args))
        write_json(args.out, {"skill": args.skill, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                              "arms": rows})


if __name__ == "__main__":
    main()
