"""The composed source and its checkers on a tiny folder in the shared data's layout (never the shared data)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from dylora_moe.data.composed import JS_MARKER, composed
from dylora_moe.data.stream import SkillSource, SkillSpec, load_examples
from dylora_moe.evaluation.composed import composed_checker
from tests.evaluation.test_sql import SMALL_DUMP

SPIDER = [{"db": "shop", "query": "What is the price of cake?", "gold": "SELECT price FROM item WHERE name = 'cake'",
           "hardness": "easy", "db_tables": {"item": ["id", "name", "price"]}},
          {"db": "shop", "query": "List the names by price.", "gold": 'SELECT name FROM item ORDER BY price',
           "hardness": "easy", "db_tables": {"item": ["id", "name", "price"]}}]
PYTHON = {"task_id": "Python/0", "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
          "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(1, 2) == 3\n\ncheck(add)",
          "declaration": "def add(a, b):\n"}
JS = {"task_id": "JavaScript/0", "prompt": "/* Add two numbers. */\nconst add = (a, b) => {\n",
      "canonical_solution": "  return a + b;\n}\n", "test": "console.assert(add(1, 2) === 3)\n",
      "declaration": "\nconst add = (a, b) => {\n"}


def write_data(root: Path) -> Path:
    (root / "spider").mkdir(parents=True)
    (root / "spider" / "spider_dev.json").write_text(json.dumps(SPIDER))
    (root / "spider" / "spider_dev_dbs.mysql.sql").write_text(SMALL_DUMP)
    (root / "nl2bash").mkdir()
    (root / "nl2bash" / "all.nl").write_text("List files in the current directory.\nCount lines of a.txt\n")
    (root / "nl2bash" / "all.cm").write_text("ls\nwc -l  a.txt\n")
    (root / "humaneval-x").mkdir()
    for language, row in (("python", PYTHON), ("js", JS)):
        with gzip.open(root / "humaneval-x" / f"humaneval_{language}.jsonl.gz", "wt") as fh:
            fh.write(json.dumps(row) + "\n")
    return root


def test_sql_python_wraps_the_gold_query_and_keeps_both_ground_truths(tmp_path):
    skill = SkillSpec("sql-python", source=SkillSource(name="composed", pair="sql-python"))
    examples = load_examples(skill, write_data(tmp_path))
    first = examples[0]
    assert "# question: What is the price of cake?" in first.prompt and "# item(id, name, price)" in first.prompt
    assert "conn.execute(\"\"\"SELECT price FROM item WHERE name = 'cake'\"\"\")" in first.response
    assert first.meta["skills"] == ["sql", "python"] and first.meta["gold"].startswith("SELECT price")


def test_sql_python_checker_executes_the_program_and_its_sql(tmp_path):
    data = write_data(tmp_path / "data")
    check = composed_checker("sql-python", data_dir=data, cache=tmp_path / "cache")
    first, ordered = composed(data, "sql-python")
    assert check(first, first.response) == {"pass": True, "sql": True}
    assert check(ordered, ordered.response) == {"pass": True, "sql": True}
    wrong = first.response.replace("'cake'", "'tea'")
    assert check(first, wrong) == {"pass": False, "sql": False}
    # right SQL, but the function returns something else: the SQL part passes, the composed task fails
    assert check(first, first.response.replace(".fetchall()", ".fetchone()")) == {"pass": False, "sql": True}
    reversed_order = ordered.response.replace("ORDER BY price", "ORDER BY price DESC")
    assert check(ordered, reversed_order)["pass"] is False


def test_bash_python_checks_the_wrapper_and_the_command(tmp_path):
    data = write_data(tmp_path)
    check = composed_checker("bash-python")
    ls, wc = composed(data, "bash-python")
    assert ls.meta == {"pair": "bash-python", "skills": ["shell", "python"], "command": "ls"}
    assert check(wc, wc.response) == {"pass": True, "python": True, "shell": True}
    assert check(wc, wc.response.replace("wc -l", "wc   -l")) == {"pass": True, "python": True, "shell": True}
    assert check(wc, wc.response.replace("wc -l", "wc -c")) == {"pass": False, "python": True, "shell": False}
    assert check(ls, "import os\n\n\ndef run():\n    return os.listdir('.')\n") == {
        "pass": False, "python": False, "shell": False}
    right = {"pass": True, "python": True, "shell": True}
    for wrapper in ("from subprocess import run as sh\n\ndef run():\n    return sh('ls', shell=True)\n",
                    "import subprocess as sp\n\ndef run():\n    return sp.check_output('ls', shell=True)\n",
                    "import subprocess\n\nCMD = 'ls'\n\ndef run():\n    return subprocess.run(CMD, shell=True)\n"):
        assert check(ls, wrapper) == right, wrapper


@pytest.mark.skipif(shutil.which("node") is None, reason="JavaScript checks need Node.js")
def test_python_js_checks_both_languages(tmp_path):
    data = write_data(tmp_path)
    check = composed_checker("python-js")
    (example,) = composed(data, "python-js")
    assert JS_MARKER in example.response and "`const add = (a, b) => {`" in example.prompt
    assert check(example, example.response) == {"pass": True, "python": True, "javascript": True}
    assert check(example, example.response.replace("a + b;", "a - b;")) == {
        "pass": False, "python": True, "javascript": False}
    assert check(example, "    return a + b\n") == {"pass": False, "python": True, "javascript": False}


def test_the_pair_is_required_and_checked():
    with pytest.raises(ValueError, match="needs `pair`"):
        SkillSource(name="composed")
    with pytest.raises(ValueError, match="sql-python, bash-python, python-js"):
        composed_checker("sql-js")
