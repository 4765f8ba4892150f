"""Greedy-decoding evaluation of a skill's held-out examples, scored by execution where the data allows.

Each skill gets a checker from its source: Python problems (MBPP, HumanEval, HumanEval-X Python) run the
candidate with the dataset's tests, JavaScript (HumanEval-X JS) runs with Node, SQL (Spider) compares
execution results on the dev databases; SuperNI tasks by ROUGE-L against their references (``rouge.py``); anything
else is scored by exact match of the normalised first line.
Candidates run only in the sandbox of ``execution.py``; nothing generated is imported or evaluated here.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..backbone import cache_dir
from ..data.sources import Example
from ..data.stream import SkillSpec
from ..model import DyLoRAMoE
from .execution import check_javascript, check_python
from .rouge import rouge_l_example
from .sql import execution_match, mysql_dump_to_sqlite

FENCE = re.compile(r"```[ \t]*([\w+#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Fence tags naming one language; a language asked by any of its names (a source's ``meta["language"]``: js,
# bash, ...) prefers a block tagged with any of them.
FENCE_TAGS = ({"python", "py", "python3"}, {"javascript", "js", "node"}, {"sql", "sqlite", "mysql"},
              {"bash", "sh", "shell", "zsh"}, {"verilog", "v", "systemverilog", "sv"}, {"cpp", "c++"}, {"java"})
KEEP_TOP_LEVEL = ("def ", "class ", "import ", "from ", "@", "#", "async def ")
STRING_START = ('"', "'", 'r"', "r'", 'b"', "b'", 'f"', "f'")
# SQL text up to its first semicolon outside quotes ('' inside a literal is a quote); an unclosed quote is text
STATEMENT = re.compile(r"""(?:'(?:[^']|'')*'|"[^"]*"|[^;'"]|['"])*""")


@dataclass
class Checker:
    """How one skill's completions are scored: ``check(example, completion) -> passed`` (a bool), or a graded
    score when ``metric`` says so (``rougeL``: points, 0-100)."""

    name: str  # python, javascript, sql, exact_match or rougeL
    check: Callable[[Example, str], bool | float]
    max_new_tokens: int = 192
    executes: bool = True  # False: exact match only
    metric: str = ""  # default: pass@1 when the candidate is executed, else exact_match

    def __post_init__(self) -> None:
        self.metric = self.metric or ("pass@1" if self.executes else "exact_match")


@dataclass
class GenerationScore:
    metric: str  # pass@1, exact_match or rougeL
    score: float  # mean of ``values``
    values: list[float] = field(default_factory=list)  # per example: 1.0 / 0.0 for pass or fail, else the grade


def extract_code(completion: str, language: str | None = None) -> str:
    """A completion's fenced code block when it has one (the first tagged ``language`` or untagged, when
    ``language`` is given and such a block exists; else the first), otherwise the completion itself. The tag may
    follow the fence after spaces (```` ``` python ````) and names the language in any case or alias (``FENCE_TAGS``:
    ``JS``, ``sh``)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(completion)]
    if not blocks:
        return completion
    tags = next((names for names in FENCE_TAGS if language in names), {language})
    return next((code for tag, code in blocks if language and (tag in tags or not tag)), blocks[0][1])


def trim_python(code: str) -> str:
    """Drop what follows the program: the first top-level statement that is not a definition, an import, a
    docstring or comment, or an assignment without calls (a module constant), such as example calls, prints,
    asserts or a half-written line at the token limit. A statement's continuation lines (indented, or at the
    margin inside brackets, as black closes long signatures and imports, after a backslash or inside a
    multi-line string) belong to it."""
    kept: list[str] = []
    statement: list[str] = []  # the top-level statement being read
    continued = continuation_lines(code)
    for index, line in enumerate(code.splitlines()):
        top = (bool(line.strip()) and not line[0].isspace() and not line.startswith((")", "]", "}"))
               and index not in continued)
        if top and statement:
            if not _kept_statement(statement):
                statement = []
                break
            kept += statement
            statement = []
        (statement if top or statement else kept).append(line)
    if statement and _kept_statement(statement):
        kept += statement
    return "\n".join(kept).rstrip() + "\n"


def continuation_lines(code: str) -> set[int]:
    """Indices (from 0) of the lines that continue a statement begun on an earlier line: inside brackets, after
    a backslash or inside a multi-line string (its inner and closing lines), and every line after a bracket or
    string left open at the end. Lines after a tokenizing error (such as an inconsistent dedent) are not
    examined."""
    inside: set[int] = set()
    first = None  # the row (from 1) of the current statement's first token
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if first is None and token.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
                                                    tokenize.NEWLINE, tokenize.ENDMARKER):
                first = token.start[0]
            if first is not None:
                inside.update(range(first, token.end[0]))  # rows from 1: those after the statement's first
            if token.type == tokenize.NEWLINE:
                first = None
    except tokenize.TokenError as err:  # EOF in a multi-line statement or string: it runs to the end
        start = first if first is not None else err.args[1][0]
        inside.update(range(start, len(code.splitlines())))
    except SyntaxError:
        pass
    return inside


def _kept_statement(lines: list[str]) -> bool:
    """Is this top-level statement part of a program: a definition, import, comment or docstring, or an
    assignment whose value calls nothing?"""
    head = lines[0]
    if head.startswith(KEEP_TOP_LEVEL) or head.startswith(STRING_START):
        return True
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return False
    return all(isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
               and not any(isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)) for n in ast.walk(node.value))
               for node in tree.body)


def python_program(example: Example, completion: str) -> str:
    """HumanEval-style prompts end in a docstring (a valid body), so a body or a whole new definition both
    follow it; MBPP prompts are a task statement in a string, also valid before the code."""
    return example.prompt + trim_python(extract_code(completion, "python"))


def javascript_program(example: Example, completion: str) -> str:
    """The prompt and the completed body, or the whole function the model wrote, up to the line that closes the
    function the prompt opens: its last declaration (a prompt may define helper functions before it). A whole
    function runs after what the prompt defines before it, unless the model wrote those definitions too."""
    code = extract_code(completion, "javascript")
    lines = example.prompt.splitlines()
    at = next((i for i in range(len(lines) - 1, -1, -1) if re.match(r"\s*(const|function) ", lines[i])), None)
    declaration = lines[at].strip() if at is not None else None  # the model may indent it otherwise
    whole = declaration is not None and declaration in code  # the model wrote the whole function
    if whole:
        before = lines[:at]
        rewritten = any(line.strip() in code for line in before if re.match(r"\s*(const|function|let|var) ", line))
        program = code if rewritten or not before else "\n".join(before) + "\n" + code
    else:
        program = example.prompt + code
    kept = []
    for line in program.splitlines():
        kept.append(line)
        if line.rstrip() in ("}", "};") and declaration is not None and declaration in "\n".join(kept):
            break  # the function is closed: what follows is usage or a cut-off line
    return "\n".join(kept) + "\n"


def check_python_example(example: Example, completion: str) -> bool:
    meta = example.meta
    if "test_list" in meta:  # MBPP
        tests = meta.get("test_setup_code", "") + "\n" + "\n".join(meta["test_list"])
    else:  # HumanEval / HumanEval-X Python: a check(candidate) function
        tests = f"{meta['test']}\ncheck({meta['entry_point']})" if "entry_point" in meta else meta["test"]
    return check_python(python_program(example, completion), tests).passed


def check_javascript_example(example: Example, completion: str) -> bool:
    return check_javascript(javascript_program(example, completion), example.meta["test"]).passed


def first_statement(completion: str) -> str:
    """A SQL completion's first statement: up to its first semicolon outside a quoted string (``'a;b'`` is a
    value, not the end of the query), from its SQL block when it has several (``extract_code``)."""
    return STATEMENT.match(extract_code(completion, "sql").strip()).group().strip()


def normalise(text: str, language: str | None = None) -> str:
    lines = [line for line in extract_code(text, language).strip().splitlines() if line.strip()]
    return " ".join(lines[0].split()) if lines else ""


def exact_match(example: Example, completion: str) -> bool:
    """The completion's first line (from its block in the example's language, ``meta["language"]``, when it has
    several) against the reference's."""
    return normalise(completion, example.meta.get("language")) == normalise(example.response)


def sql_checker(data_dir: str | Path, cache: str | Path) -> Checker:
    """Spider: execution match on the dev databases, converted once from the MySQL dump into ``cache``."""
    dbs = mysql_dump_to_sqlite(Path(data_dir) / "spider" / "spider_dev_dbs.mysql.sql", cache)

    def check(example: Example, completion: str) -> bool:
        db = dbs.get(example.meta["db"])
        if db is None:
            raise KeyError(f"database {example.meta['db']!r} is not in the Spider dump")
        return execution_match(db, first_statement(completion), example.response.strip().rstrip(";"))

    return Checker("sql", check, max_new_tokens=96)


def checker_for(skill: SkillSpec, *, data_dir: str | Path | None = None,
                cache: str | Path | None = None) -> Checker:
    """The checker a skill's source allows."""
    src = skill.source
    if src.type == "builtin":
        if src.name == "superni":
            # 50 new tokens, the papers' generation length; every reference output is a few sentences at most
            return Checker("rougeL", rouge_l_example, max_new_tokens=50, executes=False, metric="rougeL")
        if src.name in ("mbpp", "humaneval") or (src.name == "humaneval-x" and src.language == "python"):
            return Checker("python", check_python_example)
        if src.name == "humaneval-x" and (src.language or "js") == "js":
            return Checker("javascript", check_javascript_example)
        if src.name == "spider" and data_dir is not None:
            return sql_checker(data_dir, cache or cache_dir() / "spider-sqlite")
    return Checker("exact_match", exact_match, max_new_tokens=96, executes=False)


def score_examples(model: DyLoRAMoE, examples: Sequence[Example], checker: Checker, *, chat: bool = True,
                   batch_size: int = 16) -> GenerationScore:
    """pass@1 (greedy, one candidate per problem), exact match or ROUGE-L over ``examples``."""
    if not examples:
        raise ValueError("no examples to score")
    completions = model.complete([e.prompt for e in examples], chat=chat, max_new_tokens=checker.max_new_tokens,
                                 batch_size=batch_size, max_prompt_tokens=1024)
    values = [float(checker.check(e, c)) for e, c in zip(examples, completions, strict=True)]
    return GenerationScore(checker.metric, sum(values) / len(values), values)
