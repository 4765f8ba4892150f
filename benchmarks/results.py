"""Shared by the benchmark scripts: where and how a result is written."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON to ``path`` (folders created) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def ratio_table(rows: list[dict], modes: tuple[str, ...]) -> str:
    """Markdown table of ``ratio`` per pool size (``experts``) and ``mode``, as the cost benchmarks print it."""
    cell = {(r["experts"], r["mode"]): r for r in rows}
    lines = ["| experts | " + " | ".join(modes) + " |", "|---:|" + "---:|" * len(modes)]
    for n in sorted({r["experts"] for r in rows}):
        lines.append(f"| {n} | " + " | ".join(f"{cell[n, m]['ratio']:.2f}" for m in modes) + " |")
    return "\n".join(lines)
