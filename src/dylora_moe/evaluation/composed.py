"""Scoring of composed tasks (``data/composed.py``): the whole answer, and each skill's part on its own.

A checker maps (example, completion) to ``{"pass": bool, <skill>: bool, ...}``: ``pass`` is the composed
task solved (both skills right together), the other keys score one skill's part against its own ground truth.

- ``sql-python``: ``pass`` runs the candidate's ``answer(db_path)`` in the sandbox on a copy of the Spider
  database and compares the rows with the gold query's (in order when the gold query orders them, else as a
  multiset); ``sql`` executes the SQL string the candidate passes to ``execute`` on its own (``sql.py``).
- ``bash-python``: the command is not run (NL2Bash commands read and change the file system). ``python``: the
  candidate parses, defines ``run()`` and calls ``subprocess``; ``shell``: the command it passes (a literal, or
  a name bound to one) equals the gold command after whitespace normalisation. ``pass`` needs both.
- ``python-js``: the completion is split at the ``// JavaScript`` line; ``python`` runs the Python part with
  HumanEval-X's Python tests, ``javascript`` the JavaScript part with its tests (Node); ``pass`` needs both.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

from ..data.composed import JS_MARKER, PAIRS
from ..data.sources import Example
from .execution import check_javascript, check_python
from .generation import extract_code, javascript_program, trim_python
from .sql import execution_match, mysql_dump_to_sqlite, run_query

ComposedChecker = Callable[[Example, str], dict[str, bool]]
SUBPROCESS_CALLS = ("run", "call", "check_call", "check_output", "Popen", "getoutput", "getstatusoutput")
# Generation length per pair: above the 95th percentile of the reference answers' length in SmolLM2 tokens
# (126, 79 and 370; the longest are 197, 225 and 629).
MAX_NEW_TOKENS = {"sql-python": 160, "bash-python": 128, "python-js": 448}


def composed_checker(pair: str, *, data_dir: str | Path | None = None,
                     cache: str | Path | None = None) -> ComposedChecker:
    """The checker of ``pair``; ``sql-python`` needs the data directory (Spider's databases) and a cache
    folder for their SQLite files."""
    if pair not in PAIRS:
        raise ValueError(f"composed pair {pair!r} is not available; choose one of {', '.join(PAIRS)}")
    if pair == "sql-python":
        if data_dir is None or cache is None:
            raise ValueError("sql-python is scored on the Spider databases: pass data_dir and cache")
        return sql_python_checker(mysql_dump_to_sqlite(Path(data_dir) / "spider" / "spider_dev_dbs.mysql.sql",
                                                       cache))
    return check_bash_python if pair == "bash-python" else check_python_js


def python_code(completion: str) -> str:
    return trim_python(extract_code(completion, "python"))


def sql_python_checker(dbs: dict[str, Path]) -> ComposedChecker:
    def check(example: Example, completion: str) -> dict[str, bool]:
        db = dbs.get(example.meta["db"])
        if db is None:
            raise KeyError(f"database {example.meta['db']!r} is not in the Spider dump")
        gold = example.meta["gold"]
        program = python_code(completion)
        query = executed_sql(program)
        sql_ok = query is not None and execution_match(db, query, gold)
        return {"pass": check_python(program, rows_test(db, gold), files={"db.sqlite": db}).passed, "sql": sql_ok}

    return check


def rows_test(db: Path, gold: str) -> str:
    """Python that calls the candidate's ``answer`` on ``db.sqlite`` (a copy of ``db`` the sandbox puts beside it)
    and asserts the gold rows."""
    expected = [repr(tuple(r)) for r in run_query(db, gold)]
    ordered = re.search(r"\border\s+by\b", gold, re.IGNORECASE) is not None
    compare = "_rows == _expected" if ordered else "sorted(_rows) == sorted(_expected)"
    return (f"_rows = [repr(tuple(r)) for r in answer('db.sqlite')]\n_expected = {expected!r}\n"
            f"assert {compare}, 'wrong rows'\n")


def executed_sql(program: str) -> str | None:
    """The string literal a program passes to an ``execute`` call (the SQL part of a sql-python answer)."""
    tree = _parse(program)
    if tree is None:
        return None
    strings = _string_bindings(tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "execute"
                and node.args and (text := _literal(node.args[0], strings)) is not None):
            return text
    return None


def check_bash_python(example: Example, completion: str) -> dict[str, bool]:
    tree = _parse(python_code(completion))
    run = None if tree is None else next((n for n in tree.body if isinstance(n, ast.FunctionDef)
                                          and n.name == "run" and not n.args.args), None)
    call = None if run is None else _subprocess_call(run, tree)
    command = None
    if call is not None and call.args:  # a literal, or a name bound to one in run() or at module level
        command = _literal(call.args[0], {**_string_bindings(tree), **_string_bindings(run)})
    shell_ok = command is not None and " ".join(command.split()) == " ".join(example.meta["command"].split())
    python_ok = call is not None
    return {"pass": python_ok and shell_ok, "python": python_ok, "shell": shell_ok}


def check_python_js(example: Example, completion: str) -> dict[str, bool]:
    meta = example.meta
    head, marker, tail = completion.partition(JS_MARKER)
    python_ok = check_python(meta["python_prompt"] + python_code(head), meta["python_test"]).passed
    js_ok = False
    if marker:
        program = javascript_program(Example(meta["js_declaration"] + "\n", ""), tail)
        js_ok = check_javascript(program, meta["js_test"]).passed
    return {"pass": python_ok and js_ok, "python": python_ok, "javascript": js_ok}


def _parse(program: str) -> ast.Module | None:
    try:
        return ast.parse(program)
    except (SyntaxError, ValueError):
        return None


def _string_bindings(tree: ast.AST) -> dict[str, str]:
    """Names assigned a string literal anywhere in ``tree`` (first binding wins)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out.setdefault(target.id, node.value.value)
    return out


def _literal(node: ast.AST, strings: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return strings.get(node.id)
    return None


def _subprocess_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """The names under which ``tree`` imports the ``subprocess`` module (``import subprocess as sp``) and its
    call functions (``from subprocess import run as sh``)."""
    modules, functions = {"subprocess"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "subprocess"}
        elif isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            functions |= {a.asname or a.name for a in node.names if a.name in SUBPROCESS_CALLS}
    return modules, functions


def _subprocess_call(function: ast.FunctionDef, tree: ast.AST | None = None) -> ast.Call | None:
    """The first call of a ``subprocess`` function in ``function`` (``subprocess.run(...)``, through an alias of
    the module, or a function imported from it, under its own name or an alias, anywhere in ``tree``)."""
    modules, functions = _subprocess_names(tree if tree is not None else function)
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr in SUBPROCESS_CALLS and isinstance(func.value, ast.Name)
                and func.value.id in modules) or (isinstance(func, ast.Name) and func.id in functions):
            return node
    return None
