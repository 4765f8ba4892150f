"""The greedy-decoding score matrix in ``report.md``: the papers' AP, forgetting, BWT and FWT per method, the ratio
to the multi-task bound (``joint_lora``), every method's matrix, and which expert each step trained."""

from __future__ import annotations


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_table(results: dict, names: list[str]) -> list[str]:
    scored = [n for n in names if "scores" in results["methods"][n]]
    if not scored:
        return []
    metric = results["methods"][scored[0]]["scores"]["metric"]
    joint = results["methods"].get("joint_lora", {}).get("scores", {}).get("ap")
    lines = ["", f"## Greedy decoding after every step ({metric})", "",
             "`AP`: mean final score over all steps on the final examples (n per step below); `acc`, `bwt`, "
             "`forgetting` (mean drop from each step's best earlier score) and `fwt` (against `base`) come from "
             "the score matrix, whose cells use the first examples of each step (the same ones in every row).", "",
             "| method | AP | AP / joint_lora AP | acc (matrix) | bwt | forgetting | fwt | experts "
             "| trainable params |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in scored:
        m = results["methods"][name]
        s = m["scores"]
        ratio = s["ap"] / joint if joint else None
        lines.append(f"| {name} | {s['ap']:.2f} | {fmt(ratio, '.3f')} | {s['acc']:.2f} | {s['bwt']:+.2f} "
                     f"| {s['forgetting']:+.2f} | {fmt(s['fwt'], '+.2f')} | {m['experts']} "
                     f"| {m['trainable_params']:,} |")
    first = results["methods"][scored[0]]["scores"]["final"]
    lines += ["", "Final score per step:", "",
              "| method | " + " | ".join(f"{j}: {g['skill']} (n={g['n']})" for j, g in enumerate(first)) + " |",
              "|---|" + "---:|" * len(first)]
    for name in scored:
        final = results["methods"][name]["scores"]["final"]
        lines.append(f"| {name} | " + " | ".join(f"{g['score']:.1f}" for g in final) + " |")
    return lines


def matrices(results: dict, names: list[str]) -> list[str]:
    lines = []
    n = len(results["skills"])
    for name in [x for x in names if "scores" in results["methods"][x]]:
        lines += ["", f"### {name}: score on step j after step i", "",
                  "| after | " + " | ".join(str(j) for j in range(n)) + " |", "|---|" + "---:|" * n]
        for i, row in enumerate(results["methods"][name]["scores"]["matrix"]):
            lines.append(f"| {i} | " + " | ".join(fmt(v, ".1f") for v in row) + " |")
    return lines


def expert_steps(results: dict, names: list[str]) -> list[str]:
    """Per step: the expert it trained and whether the detector called it new."""
    methods = results["methods"]
    decided = [n for n in names if methods[n].get("expert_of_step") and "novelty" in methods[n]]
    lines = []
    for name in decided:
        m = methods[name]
        lines += ["", f"### {name}: novelty decisions", "", "| step | skill | decision | expert |",
                  "|---:|---|---|---:|"]
        for j, (skill, novel, expert) in enumerate(zip(results["skills"], m["novel"], m["expert_of_step"],
                                                       strict=True)):
            lines.append(f"| {j} | {skill} | {'new' if novel else 'recognised'} | {expert} |")
    return lines


def score_targets(results: dict) -> list[str]:
    """The SuperNI issue's targets on the score matrix: AP >= 0.95 x joint_lora AP, forgetting <= 1.0 point."""
    m = results["methods"]
    d = m.get("dylora", {}).get("scores")
    if d is None:
        return []
    notes = [f"dylora forgetting {d['forgetting']:+.2f} <= 1.0 point: {'met' if d['forgetting'] <= 1.0 else 'MISSED'}"]
    joint = m.get("joint_lora", {}).get("scores")
    if joint and joint["ap"]:
        ratio = d["ap"] / joint["ap"]
        notes.append(f"dylora AP {d['ap']:.2f} >= 0.95 x joint_lora AP {joint['ap']:.2f}: ratio {ratio:.3f} "
                     f"{'met' if ratio >= 0.95 else 'MISSED'}")
    return notes


def score_lines(results: dict, names: list[str]) -> list[str]:
    table = summary_table(results, names)
    return table + matrices(results, names) + expert_steps(results, names) if table else []


def partial_lines(partials: dict, skills: list) -> list[str]:
    """Methods stopped before the end of the stream (``NAME.partial.json``): steps done, time, novelty decisions
    and the rows of the score matrix measured so far."""
    lines = []
    for name, p in partials.items():
        done = p["steps_done"]
        lines += ["", f"## {name}: stopped after {done} of {len(p['skills'])} steps ({p['seconds'] / 60:.0f} min)", "",
                  f"Train seconds per step: {', '.join(f'{s:.0f}' for s in p['step_seconds'])}; experts "
                  f"{p['experts']}; expert per step: {p['expert_of_step']} (new: {p['novel']})."]
        rows = p.get("score_matrix") or []
        if rows:
            n = len(p["skills"])
            lines += ["", "| after | " + " | ".join(str(j) for j in range(n)) + " |", "|---|" + "---:|" * n]
            lines += [f"| {i} | " + " | ".join(fmt(v, ".1f") for v in row) + " |" for i, row in enumerate(rows)]
    return lines
