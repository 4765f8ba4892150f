"""Composed tasks: requests that need two skills at once, built from single-skill datasets by fixed templates.

Each pair turns one record of a data directory's dataset into a request whose answer needs both skills, and
keeps the ground truth of each skill in ``meta`` so that both parts can be scored:

``sql-python`` (Spider dev): the schema and the question, asked as a Python function ``answer(db_path)`` that
runs the query with ``sqlite3``. The response wraps the gold SQL::

    # Write a Python function `answer(db_path)` that answers the question with one SQL query, run with sqlite3
    # on the database at db_path, and returns all rows it fetches.
    # database: concert_singer
    # singer(Singer_ID, Name, Country, ...)
    # question: How many singers do we have?
    ---
    import sqlite3


    def answer(db_path):
        conn = sqlite3.connect(db_path)
        try:
            return conn.execute(\"\"\"SELECT count(*) FROM singer\"\"\").fetchall()
        finally:
            conn.close()

  ``meta``: ``db``, ``gold`` (the SQL), ``hardness``. Checked by execution against the Spider databases
  (``evaluation/composed.py``): the whole program, and the SQL it contains on its own.

``bash-python`` (NL2Bash): the description, asked as a Python function ``run()`` that runs the shell command
with ``subprocess`` and returns its output. The response assigns the gold command to ``command`` and runs it
with ``subprocess.run(command, shell=True, capture_output=True, text=True).stdout``. ``meta``: ``command``.
Shell commands are not executed (they read and change the file system): the Python part is checked by
parsing, the command by exact match after whitespace normalisation.

``python-js`` (HumanEval-X): the Python problem, asked first in Python and then, after a line
``// JavaScript``, in JavaScript from the given declaration. The response is the Python reference body, the
marker line, and the JavaScript declaration and reference body. ``meta``: both languages' tests and entry
points. Both parts are checked by execution with their own tests.

Every example carries ``meta["skills"]``, the two skills it needs (``python``, ``sql``, ``shell``,
``javascript``): the label set that multi-label routing learns from.
"""

from __future__ import annotations

from pathlib import Path

from .sources import Example, data_file, nl2bash, read_jsonl, spider

PAIRS = ("sql-python", "bash-python", "python-js")
JS_MARKER = "// JavaScript"

SQL_PYTHON_PROMPT = (
    "# Write a Python function `answer(db_path)` that answers the question with one SQL query, run with sqlite3\n"
    "# on the database at db_path, and returns all rows it fetches.\n"
    "# database: {db}\n{schema}\n# question: {question}\n"
)
SQL_PYTHON_RESPONSE = (
    "import sqlite3\n\n\ndef answer(db_path):\n    conn = sqlite3.connect(db_path)\n    try:\n"
    "        return conn.execute({query}).fetchall()\n    finally:\n        conn.close()\n"
)
BASH_PYTHON_PROMPT = (
    "# Write a Python function `run()` that runs this shell command with subprocess and returns its output.\n"
    "# {description}\n"
)
BASH_PYTHON_RESPONSE = (
    "import subprocess\n\n\ndef run():\n    command = {command}\n"
    "    return subprocess.run(command, shell=True, capture_output=True, text=True).stdout\n"
)
PYTHON_JS_PROMPT = (
    "# Complete this Python function. Then, after a line `{marker}`, write the same function in JavaScript,\n"
    "# starting with `{declaration}`.\n{prompt}"
)


def composed(data_dir: str | Path, pair: str | None) -> list[Example]:
    """The composed examples of ``pair`` (one of ``PAIRS``), in the order of the source dataset."""
    if pair not in PAIRS:
        raise ValueError(f"composed pair {pair!r} is not available; choose one of {', '.join(PAIRS)}")
    if pair == "sql-python":
        return sql_python(data_dir)
    if pair == "bash-python":
        return bash_python(data_dir)
    return python_js(data_dir)


def python_literal(text: str) -> str:
    """A Python string literal of ``text``: triple-quoted when it can be (SQL reads as SQL), else ``repr``."""
    if '"""' not in text and "\\" not in text and not text.endswith('"'):
        return f'"""{text}"""'
    return repr(text)


def sql_python(data_dir: str | Path) -> list[Example]:
    examples = []
    for e in spider(data_dir):
        lines = e.prompt.splitlines()  # "-- database: db", "-- table(cols)"..., "-- question: ..."
        schema = "\n".join("# " + line.removeprefix("-- ") for line in lines[1:-1])
        question = lines[-1].removeprefix("-- question: ")
        gold = e.response.strip().rstrip(";").strip()
        prompt = SQL_PYTHON_PROMPT.format(db=e.meta["db"], schema=schema, question=question)
        response = SQL_PYTHON_RESPONSE.format(query=python_literal(gold))
        examples.append(Example(prompt, response, {"pair": "sql-python", "skills": ["sql", "python"],
                                                   "db": e.meta["db"], "gold": gold,
                                                   "hardness": e.meta["hardness"]}))
    return examples


def bash_python(data_dir: str | Path) -> list[Example]:
    examples = []
    for e in nl2bash(data_dir):
        command = e.response.strip()
        prompt = BASH_PYTHON_PROMPT.format(description=e.prompt.removeprefix("# ").strip())
        response = BASH_PYTHON_RESPONSE.format(command=repr(command))
        examples.append(Example(prompt, response, {"pair": "bash-python", "skills": ["shell", "python"],
                                                   "command": command}))
    return examples


def python_js(data_dir: str | Path) -> list[Example]:
    python = read_jsonl(data_file(data_dir, "humaneval-x/humaneval_python.jsonl.gz"))
    js = {r["task_id"].split("/")[1]: r for r in read_jsonl(data_file(data_dir, "humaneval-x/humaneval_js.jsonl.gz"))}
    examples = []
    for p in python:
        j = js.get(p["task_id"].split("/")[1])
        if j is None:
            continue
        declaration = j["declaration"].strip()
        prompt = PYTHON_JS_PROMPT.format(marker=JS_MARKER, declaration=declaration, prompt=p["prompt"])
        response = f"{p['canonical_solution'].rstrip()}\n\n\n{JS_MARKER}\n{declaration}\n{j['canonical_solution']}"
        entry = declaration.split("=")[0].replace("const", "").strip()
        examples.append(Example(prompt, response, {
            "pair": "python-js", "skills": ["python", "javascript"], "task_id": p["task_id"],
            "python_prompt": p["prompt"], "python_test": p["test"],
            "js_declaration": declaration, "js_entry_point": entry, "js_test": j["test"]}))
    return examples

