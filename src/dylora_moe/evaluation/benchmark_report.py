"""``report.md`` and PNG plots of a benchmark's ``results.json``: matrices as heatmaps, per-skill loss after each
step, and method comparison bars."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .freeform import markdown_table
from .score_report import partial_lines, score_lines, score_targets

ORDER = ("dylora", "spec_reference", "sequential_lora", "joint_lora", "oracle_experts", "base")


def ordered(methods: dict) -> list[str]:
    return [m for m in ORDER if m in methods] + [m for m in methods if m not in ORDER]


def plot_matrices(results: dict, path: Path) -> None:
    names = ordered(results["methods"])
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    n = len(results["skills"])
    values = [v for m in names for row in results["methods"][m]["matrix"] for v in row]
    low, high = min(values), max(values)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 3.2 * rows + 0.6), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        matrix = results["methods"][name]["matrix"]
        im = ax.imshow(matrix, cmap="viridis_r", vmin=low, vmax=high)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                light = (v - low) / ((high - low) or 1.0) < 0.6
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="k" if light else "w")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(n), [str(j) for j in range(n)])
        ax.set_yticks(range(n), [str(i) for i in range(n)])
        ax.set_xlabel("skill j")
        ax.set_ylabel("after step i")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="eval loss (nats)")
    fig.suptitle("eval loss on skill j after stream step i (above the diagonal: not yet trained)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_skill_curves(results: dict, path: Path) -> None:
    names = ordered(results["methods"])
    skills = results["skills"]
    cols = min(3, len(skills))
    rows = math.ceil(len(skills) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for j, (ax, skill) in enumerate(zip(axes.flat, skills, strict=False)):
        for name in names:
            column = [row[j] for row in results["methods"][name]["matrix"]]
            ax.plot(range(len(column)), column, marker="o", markersize=3, label=name,
                    linestyle="--" if name == "base" else "-")
        ax.axvline(j, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{j}: {skill}", fontsize=9)
        ax.set_xlabel("after step")
        ax.set_ylabel("loss")
    for ax in list(axes.flat)[len(skills):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("eval loss on each skill after each step (dotted: the step that trains it)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(results: dict, path: Path) -> None:
    names = ordered(results["methods"])
    panels = [("acc", "mean final loss (lower is better)"), ("bwt", "BWT (nats, < 0: forgetting)"),
              ("forgetting", "forgetting (nats)"), ("humaneval", "HumanEval pass@1 (retention)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        vals = []
        for name in names:
            v = results["methods"][name].get(key)
            vals.append(v["score"] if isinstance(v, dict) else (v if v is not None else 0.0))
        ax.bar(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="k", linewidth=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def render(results: dict, *, command: str, seconds: float, notes: list[str], partials: dict | None = None) -> str:
    names = ordered(results["methods"])
    skills = results["skills"]
    lines = [f"# Continual-learning benchmark: {results['stream']}", "",
             f"Model `{results['model']}`; {len(skills)} stream steps; {len(names)} methods; {seconds / 60:.0f} min of "
             "method time (summed over methods; `--jobs 2` runs two at once).",
             "", "```bash", command, "```", "",
             "Scores are eval loss (nats) on each step's held-out examples; `acc` is the mean loss over all steps "
             "after the last one (lower is better), `bwt` is backward transfer (negative: forgetting), "
             "`forgetting` the mean drop from each skill's best (positive: forgetting), both over the skills not "
             "trained again later (a returning skill counts at its last step), `fwt` forward transfer "
             "against the untrained model over the steps that bring a new skill (positive: earlier skills "
             "helped). Generation scores are greedy "
             "decoding on the final system: pass@1 by execution for Python, JavaScript and SQL, exact match "
             "otherwise; HumanEval pass@1 measures a pretrained ability the stream does not train. `max transient` is "
             "the largest rise of any skill's loss above its just-learned value at any later step. `train s` is "
             "the time spent training (the experts' optimizer steps and the gate's fits), `stream s` the wall "
             "time of the method's pass through the stream, the evaluation of every skill after every step "
             "included.", "",
             "| method | acc (loss) | bwt | forgetting | fwt | max transient | routing acc. | generation (mean) "
             "| HumanEval pass@1 | experts | trainable params | train s | stream s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        m = results["methods"][name]
        he = m.get("humaneval")
        lines.append(f"| {name} | {m['acc']:.4f} | {m['bwt']:+.4f} | {m['forgetting']:+.4f} | {fmt(m['fwt'], '+.4f')} "
                     f"| {fmt(m.get('max_transient_forgetting'), '.4f')} | {fmt(m['routing_accuracy'], '.3f')} "
                     f"| {fmt(m['generation_mean'], '.3f')} | {fmt(he and he['score'], '.3f')} | {m['experts']} "
                     f"| {m['trainable_params']:,} | {fmt(m['train_seconds'], '.0f')} "
                     f"| {fmt(m['stream_seconds'], '.0f')} |")
    lines += score_lines(results, names)
    if partials:
        lines += partial_lines(partials, skills)
    lines += ["", "## Targets", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Final loss per step", "",
              "| method | " + " | ".join(f"{j}: {s}" for j, s in enumerate(skills)) + " |",
              "|---|" + "---:|" * len(skills)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in results["methods"][name]["matrix"][-1]) + " |")
    gen_rows = [n for n in names if results["methods"][n]["generation"]]
    if gen_rows:
        first = results["methods"][gen_rows[0]]["generation"]
        lines += ["", "## Greedy decoding on the final system", "",
                  "| method | " + " | ".join(f"{g['skill']} ({g['metric']}, n={g['n']})" for g in first) + " |",
                  "|---|" + "---:|" * len(first)]
        for name in gen_rows:
            scores = results["methods"][name]["generation"]
            lines.append(f"| {name} | " + " | ".join(f"{g['score']:.3f}" for g in scores) + " |")
    free = [n for n in names if results["methods"][n].get("freeform")]
    if free:
        lines += ["", "## Free-form requests on the final system (chat template and raw; system / frozen model)", "",
                  "Requests of each skill's domain from another source (`evaluation/freeform.py`); degenerate = "
                  "empty, whitespace only or a repetition loop (`evaluation/degenerate.py`)."]
        for name in free:
            lines += ["", f"### {name}", "", *markdown_table(results["methods"][name]["freeform"])]
    novelty = [n for n in names if "novelty" in results["methods"][n]]
    if novelty:
        lines += ["", "## Novelty decisions against the true skill labels", "",
                  "| method | precision | recall | F1 |", "|---|---:|---:|---:|"]
        for name in novelty:
            s = results["methods"][name]["novelty"]
            lines.append(f"| {name} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} |")
    gated = [n for n in names if results["methods"][n].get("final_routing")]
    if gated:
        lines += ["", "## Where the final gate routes each step's held-out prompts (top-1 shares by expert)", "",
                  "| method | " + " | ".join(f"{j}: {s}" for j, s in enumerate(skills)) + " |",
                  "|---|" + "---|" * len(skills)]
        for name in gated:
            cells = [", ".join(f"e{e}: {v:.2f}" for e, v in sorted(shares.items(), key=lambda kv: -kv[1]))
                     for shares in results["methods"][name]["final_routing"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![score matrices](matrices.png)", "", "![per-skill loss](skills.png)", "",
              "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    """The issue's targets, checked against the numbers (in loss units the BWT target applies)."""
    m = results["methods"]
    notes = []
    if "dylora" not in m:
        return notes
    d = m["dylora"]
    ok = d["bwt"] >= -0.02
    notes.append(f"dylora BWT {d['bwt']:+.4f} nats >= -0.02: {'met' if ok else 'MISSED'}")
    if "sequential_lora" in m:
        s = m["sequential_lora"]
        better = d["bwt"] > s["bwt"] and d["forgetting"] < s["forgetting"]
        notes.append(f"clearly better than sequential_lora (BWT {s['bwt']:+.4f}, forgetting {s['forgetting']:+.4f}): "
                     f"{'met' if better else 'MISSED'}")
    if "oracle_experts" in m:
        o = m["oracle_experts"]
        gap = (d["acc"] - o["acc"]) / o["acc"]
        notes.append(f"dylora mean final loss within 3% of oracle_experts ({o['acc']:.4f}): {gap:+.1%} "
                     f"{'met' if gap <= 0.03 else 'MISSED'}")
    if d["routing_accuracy"] is not None:
        notes.append(f"routing accuracy {d['routing_accuracy']:.3f} >= 0.95: "
                     f"{'met' if d['routing_accuracy'] >= 0.95 else 'MISSED'}")
    if d.get("humaneval") and m.get("base", {}).get("humaneval"):
        a, b = d["humaneval"]["score"], m["base"]["humaneval"]["score"]
        notes.append(f"HumanEval pass@1 after the stream {a:.3f} >= base {b:.3f}: {'met' if a >= b else 'MISSED'}")
    for r in d.get("freeform", []):
        ok = r["degenerate"] <= r["degenerate_frozen"]
        notes.append(f"free-form {r['skill']} ({r['form']}): degenerate {r['degenerate']:.3f} <= frozen "
                     f"{r['degenerate_frozen']:.3f}: {'met' if ok else 'MISSED'}")
        if r["score"] is not None:
            ok = r["score"] >= r["score_frozen"]
            notes.append(f"free-form {r['skill']} ({r['form']}): {r['metric']} {r['score']:.3f} >= frozen "
                         f"{r['score_frozen']:.3f}: {'met' if ok else 'MISSED'}")
    return notes


def write(out: Path, results: dict, *, command: str, seconds: float, extra_notes: list[str] | None = None,
          partials: dict | None = None) -> None:
    plot_matrices(results, out / "matrices.png")
    plot_skill_curves(results, out / "skills.png")
    plot_comparison(results, out / "comparison.png")
    notes = targets(results) + score_targets(results) + list(extra_notes or [])
    (out / "report.md").write_text(render(results, command=command, seconds=seconds, notes=notes,
                                                   partials=partials), encoding="utf-8")


# ---------------------------------------------------------------- several orders of one stream
ORDER_COLUMNS = (("acc", "mean final loss", ".4f"), ("bwt", "BWT", "+.4f"), ("forgetting", "forgetting", "+.4f"),
                 ("fwt", "FWT", "+.4f"), ("max_transient_forgetting", "max transient", ".4f"),
                 ("routing_accuracy", "routing acc.", ".3f"), ("novelty_precision", "novelty P", ".2f"),
                 ("novelty_recall", "novelty R", ".2f"), ("experts", "experts", ".1f"),
                 ("trainable_params", "trainable params", ",.0f"), ("train_seconds", "train s", ".0f"),
                 ("stream_seconds", "stream s", ".0f"))


def spread_cell(s: dict | None, spec: str, orders: int | None = None) -> str:
    """``mean ± std (min–max)``, or the value alone when every order agrees; ``-`` when not measured; ``[n of
    N orders]`` after it when fewer of the ``orders`` that ran the method measured it."""
    if s is None:
        return "-"
    if s["min"] == s["max"]:
        cell = format(s["mean"], spec)
    else:
        cell = f"{format(s['mean'], spec)} ± {format(s['std'], spec.lstrip('+'))} ({format(s['min'], spec)}–" \
               f"{format(s['max'], spec)})"
    return cell + (f" [{s['n']} of {orders} orders]" if orders is not None and s["n"] < orders else "")


def coverage(ran: dict[str, list[int]], orders: list[int], requested: int) -> str:
    """Which orders have results for which methods, e.g. ``2 of 3 orders started; every method ran in order 0,
    the others in part (order 1: dylora)``; ``ran`` maps each method to the orders that ran it."""
    complete = [k for k in orders if all(k in ks for ks in ran.values())]
    text = f"{len(orders)} of {requested} orders started"
    if complete == orders:
        return f"all {requested} orders finished for every method" if len(orders) == requested else \
            f"{text}, every method finished in each"
    partial = [f"order {k}: {', '.join(n for n, ks in ran.items() if k in ks)}" for k in orders if k not in complete]
    done = f"order(s) {', '.join(map(str, complete))}" if complete else "no order"
    return f"{text}; every method ran in {done}, the others in part ({'; '.join(partial)})"


def render_orders(results: dict, *, command: str) -> str:
    """``report.md`` of ``--orders``: each method's metrics as mean ± standard deviation (min–max) over orders,
    and which steps each order ran."""
    names = ordered(results["methods"])
    orders = results["orders"]
    ran = {name: [o["order"] for o in orders if name in o["methods"]] for name in names}
    covered = coverage(ran, [o["order"] for o in orders], results["orders_requested"])
    lines = [f"# Continual-learning benchmark: {results['stream']}, {len(orders)} orders", "",
             f"Model `{results['model']}`; {covered} (per-order "
             f"reports in `order-K/report.md`); {results['total_seconds'] / 60:.0f} min of method time.",
             "", "```bash", command, "```", "",
             "Each cell is the mean ± sample standard deviation (min–max) over the orders that ran the method "
             "(`orders`). Loss "
             "units (nats): `mean final loss` is the mean loss over all steps after the last one, `BWT` backward "
             "transfer (negative: forgetting), `forgetting` the mean rise from each skill's best loss (both over "
             "the skills not trained again later), `FWT` forward transfer against the untrained model (over the "
             "steps that bring a new skill), `max transient` the largest rise of any skill's loss above its "
             "just-learned value at any later step. `train s` is training alone, `stream s` the whole pass through "
             "the stream with every evaluation.", "",
             "| method | orders | " + " | ".join(title for _, title, _ in ORDER_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(ORDER_COLUMNS)]
    for name in names:
        m = results["methods"][name]
        lines.append(f"| {name} | {len(ran[name])} | "
                     + " | ".join(spread_cell(m[key], spec, len(ran[name])) for key, _, spec in ORDER_COLUMNS)
                     + " |")
    lines += ["", "## Orders", "", "| order | steps |", "|---:|---|"]
    lines += [f"| {o['order']} | {', '.join(o['skills'])} |" for o in orders]
    lines += ["", "## Max transient forgetting per order", "",
              "| method | " + " | ".join(str(o["order"]) for o in orders) + " |", "|---|" + "---:|" * len(orders)]
    for name in names:
        cells = [fmt(o["methods"].get(name, {}).get("max_transient_forgetting"), ".4f") for o in orders]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
