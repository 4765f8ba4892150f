"""Scores and report of a mixed-stream run (``training/mixed.py``): how well the chunks were sorted into skills
(purity, adjusted Rand index, novelty delay, expert count against the true skill count) and what was learned
(the chunk x skill loss matrix, forgetting, routing of held-out prompts to each skill's main expert).

The true skills are the stream's skill names; the learner never saw them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from . import metrics


def contingency(records: Sequence) -> dict[int, dict[str, int]]:
    """Expert -> true skill -> examples sorted to it over the whole stream."""
    table: dict[int, dict[str, int]] = {}
    for r in records:
        for expert, row in r.sorted.items():
            cell = table.setdefault(int(expert), {})
            for skill, n in row.items():
                cell[skill] = cell.get(skill, 0) + n
    return table


def summarise_mixed(records: Sequence, skills: Sequence[str], *, stream: str, model: str) -> dict:
    table = contingency(records)
    drawn = [r.drawn for r in records]
    seen = [s for s in skills if any(s in d for d in drawn)]
    col = {s: j for j, s in enumerate(skills)}
    matrix = [[r.losses[col[s]] for s in seen] for r in records]
    final = matrix[-1]
    first = {s: next(i for i, d in enumerate(drawn) if s in d) for s in seen}
    drops = [final[k] - min(matrix[i][k] for i in range(first[s], len(records))) for k, s in enumerate(seen)]
    owner = {s: metrics.main_expert(table, s) for s in seen}
    routed = {s: records[-1].routing[col[s]].get(owner[s], 0.0) if owner[s] is not None else 0.0 for s in seen}
    waiting = records[-1].waiting
    return {
        "stream": stream, "model": model, "chunks": len(records), "skills": seen,
        "true_skills": len(seen), "experts": records[-1].experts,
        "purity": metrics.purity(table), "adjusted_rand_index": metrics.adjusted_rand_index(table),
        "novelty_delay": metrics.novelty_delay(drawn, [r.founded for r in records], table),
        "sorted": sum(sum(row.values()) for row in table.values()),
        "waiting_at_end": sum(waiting.values()), "dropped": sum(r.dropped for r in records),
        "contingency": {str(e): row for e, row in sorted(table.items())},
        "loss_matrix": matrix, "final_losses": dict(zip(seen, final, strict=True)),
        "mean_final_loss": sum(final) / len(final),
        "forgetting": sum(drops) / len(drops), "max_forgetting": max(drops),
        "main_expert": owner, "routing_to_main_expert": routed,
        "routing_accuracy": sum(routed.values()) / len(routed),
        "train_seconds": sum(r.train_seconds for r in records),
        "per_chunk": [{"drawn": r.drawn, "sorted": {str(e): row for e, row in r.sorted.items()}, "waiting": r.waiting,
                       "founded": r.founded, "candidates": r.candidates, "screened": r.screened, "tail": r.tail,
                       "experts": r.experts} for r in records],
    }


def render_mixed(summary: dict) -> str:
    skills = summary["skills"]
    lines = [
        f"# Mixed-stream run: {summary['stream']}", "",
        f"Model `{summary['model']}`; {summary['chunks']} chunks of unlabelled examples; "
        f"**{summary['experts']} experts for {summary['true_skills']} true skills**.", "",
        f"- sorting purity **{summary['purity']:.3f}**, adjusted Rand index **{summary['adjusted_rand_index']:.3f}** "
        f"({summary['sorted']} examples sorted, {summary['waiting_at_end']} still in the novelty buffer)",
        "- novelty delay (examples of a skill seen before its expert existed): "
        + ", ".join(f"{s} {d}" for s, d in summary["novelty_delay"].items()),
        f"- mean final loss **{summary['mean_final_loss']:.4f}**, forgetting {summary['forgetting']:.4f} nats "
        f"(max {summary['max_forgetting']:.4f}), routing of held-out prompts to each skill's main expert "
        f"{summary['routing_accuracy']:.3f}", "",
        "## Chunks (true skills shown for scoring only)", "",
        "| chunk | drawn | sorted to experts | waiting | new expert | novel / screened (tail p) |",
        "|---:|---|---|---|---:|---|",
    ]
    for i, c in enumerate(summary["per_chunk"]):
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "-"  # noqa: E731
        sorted_ = "; ".join(f"e{e}: {fmt(row)}" for e, row in c["sorted"].items()) or "-"
        new = ", ".join(map(str, c["founded"])) or "-"
        lines.append(f"| {i} | {fmt(c['drawn'])} | {sorted_} | {fmt(c['waiting'])} | {new} | "
                     f"{c['candidates']} / {c['screened']} ({c['tail']:.2g}) |")
    lines += ["", "## Loss matrix (eval loss on each skill's held-out examples after each chunk)", "",
              "| after chunk | " + " | ".join(skills) + " |", "|---|" + "---:|" * len(skills)]
    for i, row in enumerate(summary["loss_matrix"]):
        lines.append(f"| {i} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_mixed_report(out: Path, records: Sequence, skills: Sequence[str], *, stream: str, model: str,
                       seconds: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise_mixed(records, skills, stream=stream, model=model)
    summary["total_seconds"] = seconds
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_mixed(summary), encoding="utf-8")
    return summary
