"""End-to-end walkthrough on the default model: a stream of real skills meets the novelty detector.

    dylora demo --out runs/demo

The stream is HumanEval (first half), VerilogEval, HumanEval (second half). For each skill the system
embeds its training examples and decides whether it is new; a new skill gets an expert and a gate column.
The gate is then fitted on the stored examples' routing features, every held-out example is routed, and
each skill gets a greedy completion. Writes ``report.md`` and ``events.jsonl`` into the output folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .config import DyLoRAConfig
from .data import Example, humaneval, verilogeval
from .model import DyLoRAMoE
from .novelty import NoveltyResult
from .routing.fit import fit_gate

logger = logging.getLogger(__name__)


@dataclass
class StreamSkill:
    name: str
    load: Callable[[], list[Example]]
    start: int = 0
    stop: int | None = None


DEFAULT_STREAM = [
    StreamSkill("humaneval-python (first half)", humaneval, 0, 82),
    StreamSkill("verilogeval", verilogeval),
    StreamSkill("humaneval-python (second half)", humaneval, 82, None),
]


def split(examples: list[Example], eval_share: float = 0.2) -> tuple[list[Example], list[Example]]:
    """Deterministic split: every fifth example (by default) is held out, so no example is in both."""
    step = max(2, round(1 / eval_share))
    return ([e for i, e in enumerate(examples) if i % step], [e for i, e in enumerate(examples) if not i % step])


def features(model: DyLoRAMoE, texts: list[str], batch_size: int = 8, max_length: int = 256) -> torch.Tensor:
    rows = []
    for i in range(0, len(texts), batch_size):
        enc = model.tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length).to(model.device)
        rows.append(model.routing_features(**enc))
    return torch.cat(rows)  # [N, H]


def run(out: Path, *, model_name: str = "default", max_examples: int = 48, new_tokens: int = 48,
        console: Console | None = None) -> dict:
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    (out / "events.jsonl").unlink(missing_ok=True)
    config = DyLoRAConfig(model=model_name)
    config.novelty.max_examples = max_examples
    start = time.perf_counter()
    with console.status(f"loading {model_name} (the first run converts the GGUF file, ~20 s)"):
        model = DyLoRAMoE.from_config(config).eval()
    model.events.attach_file(out / "events.jsonl")
    console.print(f"loaded {model_name} in {time.perf_counter() - start:.1f}s on {model.device}")

    decisions: list[tuple[StreamSkill, NoveltyResult, list[Example], list[Example]]] = []
    with Progress(console=console) as progress:
        task = progress.add_task("skills", total=len(DEFAULT_STREAM))
        for skill in DEFAULT_STREAM:
            progress.update(task, description=f"embedding {skill.name}")
            train, held_out = split(skill.load()[skill.start : skill.stop])
            result = model.add_new_skill(train[:max_examples], name=skill.name)
            decisions.append((skill, result, train, held_out))
            progress.advance(task)
    console.print(novelty_table(decisions))

    with console.status("fitting the gate on the stored examples' routing features"):
        column = {e: c for c, e in enumerate(model.experts.expert_ids)}
        feats, labels = [], []
        for _, result, train, _ in decisions:
            f = features(model, [e.text for e in train[:max_examples]])
            feats.append(f)
            labels.append(torch.full((len(f),), column[result.expert_id]))
        fit_gate(model.router, torch.cat(feats), torch.cat(labels))
        for expert_id in model.experts.expert_ids:
            model.mark_mature(expert_id)
    routing = routing_matrix(model, decisions)
    console.print(routing_table(model, decisions, routing))

    samples = []
    with console.status("generating one completion per skill"):
        for skill, _, _, held_out in decisions:
            prompt = held_out[0].prompt
            samples.append((skill.name, prompt, model.complete([prompt], max_new_tokens=new_tokens)[0]))
    seconds = time.perf_counter() - start
    report = write_report(out, model, decisions, routing, samples, seconds)
    console.print(f"[bold]done in {seconds:.0f}s[/]: {model.num_experts} experts; report {out / 'report.md'}")
    return report


def routing_matrix(model: DyLoRAMoE, decisions) -> list[list[float]]:
    """Share of each skill's held-out examples routed (top-1) to each expert."""
    rows = []
    for _, _, _, held_out in decisions:
        weights = model.router(features(model, [e.text for e in held_out])).weights  # [N, E]
        counts = torch.bincount(weights.argmax(-1), minlength=model.num_experts).float()
        rows.append((counts / counts.sum()).tolist())
    return rows


def novelty_table(decisions) -> Table:
    table = Table(title="novelty decisions")
    for col in ("step", "skill", "train ex.", "novel", "nearest skill", "similarity", "expert"):
        table.add_column(col)
    for i, (skill, r, train, _) in enumerate(decisions):
        sim = "-" if r.similarity is None else f"{r.similarity:.4f}"
        table.add_row(str(i), skill.name, str(len(train)), "yes" if r.is_novel else "no",
                      "-" if r.nearest_skill is None else str(r.nearest_skill), sim, str(r.expert_id))
    return table


def routing_table(model: DyLoRAMoE, decisions, routing) -> Table:
    table = Table(title="held-out examples routed to each expert (top-1 share)")
    table.add_column("skill")
    for e in model.experts.expert_ids:
        table.add_column(f"expert {e}", justify="right")
    for (skill, _, _, _), row in zip(decisions, routing, strict=True):
        table.add_row(skill.name, *(f"{v:.2f}" for v in row))
    return table


def write_report(out: Path, model: DyLoRAMoE, decisions, routing, samples, seconds: float) -> dict:
    column = {e: c for c, e in enumerate(model.experts.expert_ids)}
    correct = [row[column[r.expert_id]] for (_, r, _, _), row in zip(decisions, routing, strict=True)]
    lines = [
        "# DyLoRA-MoE demo", "",
        f"Model `{model.config.model}`, {model.num_experts} experts, {seconds:.0f} s. "
        f"Novelty threshold {model.novelty.similarity_threshold}.", "",
        "| step | skill | novel | nearest | similarity | expert | routed to its expert |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for i, ((skill, r, _, _), share) in enumerate(zip(decisions, correct, strict=True)):
        sim = "-" if r.similarity is None else f"{r.similarity:.4f}"
        lines.append(f"| {i} | {skill.name} | {'yes' if r.is_novel else 'no'} | "
                     f"{'-' if r.nearest_skill is None else r.nearest_skill} | {sim} | {r.expert_id} | {share:.2f} |")
    lines += ["", "## Sample completions (experts untrained: routing only)", ""]
    for name, prompt, text in samples:
        lines += [f"### {name}", "", "```", prompt.strip()[-400:], "```", "", "```", text.strip(), "```", ""]
    lines += ["Data: HumanEval (MIT, openai/human-eval), VerilogEval (Apache-2.0, NVIDIA).", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return {"experts": model.num_experts, "routing_accuracy": correct,
            "novel": [r.is_novel for _, r, _, _ in decisions]}
