"""The run report: ``summary.json``, ``report.md`` and PNG plots (loss matrix, routing, expert count)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..experts.pool import serving_expert
from ..training.loop import StepRecord
from .freeform import markdown_table
from .metrics import bwt_loss, max_transient_forgetting, routing_accuracy


def summarise(records: Sequence[StepRecord], *, stream: str, model: str, experts: Sequence[int],
              merges: dict[int, int] | None = None, labels: Sequence[str] | None = None) -> dict:
    """The summary of a run. ``routing_accuracy``: share of every seen skill's held-out prompts routed (top-1)
    to the expert serving that skill at the end (its own, or the one it was merged into: ``merges``);
    ``bwt_loss``: mean over earlier skills of final - just-learned loss (with ``labels``, the steps' true skills,
    a skill trained again later counts at its last step: ``metrics.settled_steps``)."""
    merges = merges or {}
    n = len(records)
    matrix = [[r.losses[j] if j <= i else None for j in range(n)] for i, r in enumerate(records)]
    final = records[-1] if records else None
    correct, totals = [], []
    for j, r in enumerate(records):
        share = final.routing[j].get(serving_expert(r.novelty.expert_id, merges), 0.0)
        correct.append(round(share * r.eval_examples))
        totals.append(r.eval_examples)
    return {
        "stream": stream, "model": model, "experts": len(experts),
        "skills": [r.skill for r in records],
        "novel": [r.novelty.is_novel for r in records],
        "expert_of_skill": [serving_expert(r.novelty.expert_id, merges) for r in records],
        "merges": {str(k): v for k, v in merges.items()},
        "similarity": [r.novelty.similarity for r in records],
        "novelty": [{"method": r.novelty.method, "statistic": r.novelty.statistic, "boundary": r.novelty.boundary,
                     "p_value": r.novelty.p_value} for r in records],
        "loss_matrix": matrix,
        "routing_accuracy": routing_accuracy(correct, totals),
        "routing_accuracy_per_skill": [c / t if t else 0.0 for c, t in zip(correct, totals, strict=True)],
        "routing_entropy": final.routing_entropy if final else [],
        "bwt_loss": bwt_loss(matrix, labels) if records else 0.0,
        "max_transient_forgetting": max_transient_forgetting(matrix) if records else 0.0,
        "expert_count": [r.experts for r in records],
        "train_seconds": [r.train_seconds for r in records],
    }


def plot_loss_matrix(summary: dict, path: Path) -> None:
    skills = summary["skills"]
    values = [[float("nan") if v is None else v for v in row] for row in summary["loss_matrix"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(skills) + 3, 0.8 * len(skills) + 2))
    im = ax.imshow(values, cmap="viridis_r")
    seen = [v for row in values for v in row if v == v]  # v == v: not NaN
    low, span = min(seen), (max(seen) - min(seen)) or 1.0
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:
                light = (v - low) / span < 0.6  # viridis_r is light at the low end
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="k" if light else "w", fontsize=8)
    ax.set_xticks(range(len(skills)), [f"{j}: {s}" for j, s in enumerate(skills)], rotation=30, ha="right")
    ax.set_yticks(range(len(skills)), [f"after {i}" for i in range(len(skills))])
    ax.set_title("eval loss (nats) on skill j after stream step i")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing(records: Sequence[StepRecord], experts: Sequence[int], path: Path) -> None:
    final = records[-1]
    grid = [[final.routing[j].get(e, 0.0) for e in experts] for j in range(len(records))]
    fig, ax = plt.subplots(figsize=(0.9 * len(experts) + 4, 0.7 * len(records) + 2))
    im = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1)
    for j, row in enumerate(grid):
        for k, v in enumerate(row):
            ax.text(k, j, f"{v:.2f}", ha="center", va="center", color="k" if v < 0.6 else "w", fontsize=8)
    ax.set_xticks(range(len(experts)), [f"expert {e}" for e in experts])
    ax.set_yticks(range(len(records)), [f"{j}: {r.skill}" for j, r in enumerate(records)])
    ax.set_title("share of held-out prompts routed (top-1) at the end")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_count(summary: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.step(range(len(summary["expert_count"])), summary["expert_count"], where="post", marker="o")
    ax.set_xticks(range(len(summary["skills"])), summary["skills"], rotation=30, ha="right")
    ax.set_ylabel("experts")
    ax.set_title("expert pool over the stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, records: Sequence[StepRecord], *, stream: str, model: str, experts: Sequence[int],
                 seconds: float, sources: str = "", freeform: Sequence = (), merges: dict[int, int] | None = None,
                 labels: Sequence[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(records, stream=stream, model=model, experts=experts, merges=merges, labels=labels)
    summary["total_seconds"] = seconds
    summary["freeform"] = [r if isinstance(r, dict) else dataclasses.asdict(r) for r in freeform]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_loss_matrix(summary, out / "loss_matrix.png")
    plot_routing(records, experts, out / "routing.png")
    plot_expert_count(summary, out / "experts.png")
    (out / "report.md").write_text(render_markdown(summary, records, sources), encoding="utf-8")
    return summary


def render_markdown(summary: dict, records: Sequence[StepRecord], sources: str) -> str:
    lines = [
        f"# Continual-learning run: {summary['stream']}", "",
        f"Model `{summary['model']}`; {summary['experts']} experts after {len(records)} steps; "
        f"{summary['total_seconds']:.0f} s.", "",
        f"- routing accuracy (held-out prompts to their skill's expert): **{summary['routing_accuracy']:.3f}**",
        f"- backward transfer on loss (final - just learned, mean over earlier skills; a skill trained again "
        f"later counts at its last step; positive: forgetting): "
        f"**{summary['bwt_loss']:+.4f} nats**",
        f"- max transient forgetting (largest rise of any skill's loss above its just-learned value, at any "
        f"later step): **{summary['max_transient_forgetting']:.4f} nats**", "",
        "## Stream", "",
        "| step | skill | novel | novelty evidence | expert | train / eval ex. | train s |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r.step} | {r.skill} | {'yes' if r.novelty.is_novel else 'no'} | {r.novelty.evidence()} | "
                     f"{r.novelty.expert_id} | {r.train_examples} / {r.eval_examples} | {r.train_seconds:.0f} |")
    lines += ["", "## Loss matrix (eval loss on skill j after step i)", "",
              "| after step | " + " | ".join(f"{j}: {s}" for j, s in enumerate(summary["skills"])) + " |",
              "|---|" + "---:|" * len(records)]
    for i, row in enumerate(summary["loss_matrix"]):
        lines.append(f"| {i} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row) + " |")
    if summary.get("freeform"):
        lines += ["", "## Free-form requests (not in any training format)", "",
                  "Requests of each skill's domain from another source, with the chat template and as a raw "
                  "completion, answered greedily by the trained system and by the frozen model. Degenerate: "
                  "empty, whitespace only, or a repetition loop (`evaluation/degenerate.py`).", "",
                  *markdown_table(summary["freeform"])]
        for r in summary["freeform"]:
            for sample in r["samples"][:1]:
                request = repr(sample["request"][:200]) if "request" in sample else \
                    f"request {sample['index']} of {r['source']}"
                lines += ["", f"**{r['skill']}, {r['form']}:** {request}", "",
                          f"- system: `{sample['routed'][:300]!r}`", f"- frozen: `{sample['frozen'][:300]!r}`"]
    lines += ["", "![loss matrix](loss_matrix.png)", "", "![routing](routing.png)", "",
              "![experts](experts.png)", ""]
    if sources:
        lines += ["## Data", "", sources, ""]
    return "\n".join(lines)
