"""Judge the free-form answers a run kept again, with the current degenerate-output detector and with the
loop rule's former 64-character cap on the unit, at the run's generation length and at each shorter length the
reports judge (answers cut to their first N tokens, as ``evaluate_set`` cuts them).

    python benchmarks/freeform_rejudge.py results/freeform-shared-code-noecho-256-n16/methods/dylora.json \\
        results/freeform-default-full/route_layer6_separate_256.json --out results/freeform_rejudge.json

Reads every file's ``freeform`` cells (a benchmark's method file or ``dylora train``'s summary) and their
``samples``: the routed system's and the frozen model's answers to the same requests. Kept answers are redacted
(what an answer copies from its request or reference reads ``[...]``), so a re-judgement is close to, not
exactly, a judgement of the answers as generated: a copied span repeated in a loop is redacted in every copy
and still loops, but a loop that only partly copies can read differently. The figures a run reports were
judged on the answers as generated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from dylora_moe.backbone import resolve_model
from dylora_moe.evaluation.degenerate import degenerate_kind, paired_excess
from dylora_moe.evaluation.freeform import PREFIX_TOKENS, truncated
from results import write_json

RULES = {"current": {}, "unit<=64": {"max_unit": 64}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="JSON files with free-form cells and their samples")
    p.add_argument("--model", default="default", help="whose tokenizer cuts answers to shorter lengths")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def rejudge_cell(cell: dict, tokenizer) -> dict | None:
    """One cell's counts per length and rule: degenerate answers of the system and of the frozen model, and the
    paired comparison; ``None`` for a cell that kept no samples."""
    samples = cell.get("samples") or []
    if not samples:
        return None
    routed, frozen = [s["routed"] for s in samples], [s["frozen"] for s in samples]
    full = cell.get("max_new_tokens")
    lengths = [n for n in PREFIX_TOKENS if full is None or n < full] + [full]
    out = {"skill": cell["skill"], "form": cell["form"], "n": len(samples), "max_new_tokens": full, "at": {}}
    for n in lengths:
        cut = (routed, frozen) if n == full else (truncated(tokenizer, routed, n), truncated(tokenizer, frozen, n))
        out["at"][str(n)] = {}
        for rule, kwargs in RULES.items():
            flags = [[degenerate_kind(t, **kwargs) is not None for t in texts] for texts in cut]
            out["at"][str(n)][rule] = {"system": sum(flags[0]), "frozen": sum(flags[1]), **paired_excess(*flags)}
    return out


def rejudge_file(path: Path, tokenizer) -> list[dict]:
    data = json.loads(path.read_text())
    cells = data.get("freeform") or []
    if not cells:
        raise SystemExit(f"{path}: no free-form cells (a run made with --freeform-limit 0 keeps none)")
    return [c for c in (rejudge_cell(cell, tokenizer) for cell in cells) if c is not None]


def table(path: str, cells: list[dict]) -> str:
    lengths = list(cells[0]["at"])
    head = " | ".join(f"{n} tok: {rule}" for n in lengths for rule in RULES)
    lines = [f"{path} (system / frozen, degenerate answers)", f"| cell | n | {head} |",
             "|---|---:|" + "---:|" * (len(lengths) * len(RULES))]
    for c in cells:
        counts = " | ".join(f"{c['at'][n][r]['system']}/{c['at'][n][r]['frozen']}" if n in c["at"] else "-"
                            for n in lengths for r in RULES)
        lines.append(f"| {c['skill']} {c['form']} | {c['n']} | {counts} |")
    totals = " | ".join(f"{sum(c['at'][n][r]['system'] for c in cells if n in c['at'])}/"
                        f"{sum(c['at'][n][r]['frozen'] for c in cells if n in c['at'])}"
                        for n in lengths for r in RULES)
    lines.append(f"| all | {sum(c['n'] for c in cells)} | {totals} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    report = {}
    for path in args.files:
        cells = rejudge_file(path, tokenizer)
        report[str(path)] = cells
        print(table(str(path), cells), flush=True)
    write_json(args.out, {"rules": RULES, "files": report})


if __name__ == "__main__":
    main()
