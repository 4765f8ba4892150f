"""Greedy-decoding scores: code extraction, program assembly and every checker on real and broken programs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dylora_moe.data import sources
from dylora_moe.data.sources import Example, humaneval
from dylora_moe.data.stream import SkillSpec
from dylora_moe.evaluation.generation import (
    Checker,
    check_javascript_example,
    check_python_example,
    checker_for,
    exact_match,
    extract_code,
    first_statement,
    javascript_program,
    normalise,
    score_examples,
    trim_python,
)
from tests.conftest import build

JS_PROMPT = "/* Add two numbers.\n>>> add(2, 3)\n5\n*/\nconst add = (x, y) => {\n"
JS_TEST = ("const testAdd = () => {\n  console.assert(add(2, 3) === 5)\n  console.assert(add(0, 0) === 0)\n}\n"
           "testAdd()\n")
DATA_DIR = Path(os.environ.get("DYLORA_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
MBPP = Example('"""Write a function to square a number.\nassert square(3) == 9\n"""\n',
               "def square(x):\n    return x * x\n",
               {"test_list": ["assert square(3) == 9", "assert square(-2) == 4"], "test_setup_code": ""})


def test_extract_code_takes_the_first_fenced_block_or_everything():
    assert extract_code("Here:\n```python\nx = 1\n```\nmore\n```\ny\n```") == "x = 1\n"
    assert extract_code("```js\nlet a\n") == "let a\n"  # unterminated fence at the token limit
    assert extract_code("    return 1\n") == "    return 1\n"


def test_trim_python_keeps_definitions_and_drops_usage():
    code = "import math\n\ndef f(x):\n    return x\n\n# helper\ndef g():\n    pass\nprint(f(2))\nassert f(1) =="
    assert trim_python(code) == "import math\n\ndef f(x):\n    return x\n\n# helper\ndef g():\n    pass\n"
    assert trim_python("    return x + 1\n\nprint(") == "    return x + 1\n"


def test_humaneval_reference_bodies_pass_and_wrong_ones_fail():
    problems = humaneval()[:3]
    for p in problems:
        assert check_python_example(p, p.response), p.meta["task_id"]
        assert check_python_example(p, f"```python\n{p.response}```\nExplanation follows.")
        assert not check_python_example(p, "    return None\n")


def test_humaneval_accepts_a_whole_redefinition_after_the_prompt():
    p = humaneval()[0]  # has_close_elements
    whole = ("```python\nfrom typing import List\n\ndef has_close_elements(numbers: List[float], threshold: float)"
             " -> bool:\n" + p.response + "```\n\nprint(has_close_elements([1.0, 2.0], 0.5))")
    assert check_python_example(p, whole)


def test_mbpp_runs_every_listed_test():
    assert check_python_example(MBPP, "def square(x):\n    return x * x\n")
    assert not check_python_example(MBPP, "def square(x):\n    return 9\n")  # passes only the first test


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_javascript_body_or_whole_function_pass_and_wrong_fails():
    ex = Example(JS_PROMPT, "  return x + y;\n}\n", {"test": JS_TEST})
    assert check_javascript_example(ex, ex.response)
    assert check_javascript_example(ex, "```javascript\nconst add = (x, y) => {\n  return x + y;\n}\n```")
    assert check_javascript_example(ex, "  return x + y;\n}\nconsole.log(add(1, 2)); add(")  # cut-off usage
    assert not check_javascript_example(ex, "  return x - y;\n}\n")


def test_javascript_program_keeps_the_function_and_cuts_what_follows():
    ex = Example(JS_PROMPT, "", {"test": JS_TEST})
    program = javascript_program(ex, "  return x + y;\n}\nconsole.log(1)\n")
    assert program.endswith("return x + y;\n}\n") and "console.log" not in program


def test_javascript_program_completes_the_last_function_of_a_prompt_with_a_helper():
    # the prompt defines a helper first and ends inside the function to complete
    prompt = ("const isSame = (s) => {\n  return s == s.split('').reverse().join('');\n}\n\n"
              "/* Double x. */\nconst twice = (x) => {\n")
    ex = Example(prompt, "", {"test": "const assert = require('node:assert');\nassert.equal(twice(3), 6);\n"})
    program = javascript_program(ex, "  return 2 * x;\n}\n\nconsole.log(twice(3));\n")
    assert program == prompt + "  return 2 * x;\n}\n"
    whole = "```javascript\nconst twice = (x) => {\n  return x + x;\n}\n```\nDone."
    helper = prompt[:prompt.index("const twice")]
    assert javascript_program(ex, whole) == helper + "const twice = (x) => {\n  return x + x;\n}\n"
    both = "const isSame = (s) => {\n  return true;\n}\nconst twice = (x) => {\n  return x + x;\n}\n"
    assert javascript_program(ex, both) == both  # the model rewrote the helper too: not defined twice


def test_a_whole_javascript_function_is_cut_where_it_closes_when_the_prompt_indents_its_declaration():
    """The cut looked for the prompt's declaration line as written, indentation included, in the model's whole
    function: written at the margin, it was never found, and a cut-off call after the function was kept."""
    ex = Example("/* Add x and y. */\n  const add = (x, y) => {\n", "", {"test": JS_TEST})
    program = javascript_program(ex, "const add = (x, y) => {\n  return x + y;\n}\nconsole.log(add(1, 2));\nadd(")
    assert program == "/* Add x and y. */\nconst add = (x, y) => {\n  return x + y;\n}\n"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_a_whole_javascript_function_can_call_the_prompts_helper():
    prompt = ("const isSame = (s) => {\n  return s == s.split('').reverse().join('');\n}\n\n"
              "/* Is x a palindrome twice over? */\nconst both = (x) => {\n")
    test = "const assert = require('node:assert');\nassert.equal(both('aba'), true);\n"
    ex = Example(prompt, "", {"test": test})
    assert check_javascript_example(ex, "const both = (x) => {\n  return isSame(x) && isSame(x + x);\n}\n")


def test_exact_match_and_sql_statement_normalisation():
    ex = Example("# list files\n", "ls -la\n")
    assert exact_match(ex, "```bash\nls   -la\n```\nThis lists files.")
    assert not exact_match(ex, "ls\n")
    assert first_statement("```sql\nSELECT count(*) FROM singer;\nSELECT 1;\n```") == "SELECT count(*) FROM singer"


def test_a_semicolon_inside_a_sql_string_does_not_end_the_statement():
    """The statement was cut at the first semicolon anywhere: a correct query comparing with 'a;b' ran as
    ``... = 'a`` and failed."""
    query = "SELECT name FROM singer WHERE note = 'a;b' OR note = \"c;d\" OR note = 'it''s; ok'"
    assert first_statement(f"{query}; SELECT 1;") == query
    assert first_statement(f"```sql\n{query};\n```") == query
    assert first_statement("SELECT 1;;") == "SELECT 1"


def test_checker_for_follows_the_source():
    def skill(**source):
        return SkillSpec("s", source=source)

    assert checker_for(skill(type="builtin", name="mbpp")).name == "python"
    assert checker_for(skill(type="builtin", name="humaneval")).name == "python"
    assert checker_for(skill(type="builtin", name="humaneval-x", language="js")).name == "javascript"
    assert checker_for(skill(type="builtin", name="humaneval-x", language="python")).name == "python"
    assert checker_for(skill(type="builtin", name="nl2bash")).name == "exact_match"
    assert checker_for(skill(type="builtin", name="spider")).name == "exact_match"  # no data dir: no databases
    assert not checker_for(skill(type="builtin", name="verilogeval")).executes


def test_score_examples_decodes_greedily_and_scores_each_problem():
    model = build()
    model.create_expert()
    examples = [Example("ab", "x"), Example("cd", "y"), Example("ef", "z")]
    seen = []

    def check(example, completion):
        seen.append((example.prompt, completion))
        return example.prompt == "cd"

    result = score_examples(model, examples, Checker("probe", check, max_new_tokens=4), chat=False, batch_size=2)
    assert result.metric == "pass@1" and result.values == [0.0, 1.0, 0.0]
    assert result.score == pytest.approx(1 / 3)
    assert [p for p, _ in seen] == ["ab", "cd", "ef"]
    again = score_examples(model, examples, Checker("probe", lambda e, c: True, max_new_tokens=4), chat=False)
    assert again.score == 1.0
    with pytest.raises(ValueError, match="no examples"):
        score_examples(model, [], Checker("probe", check))


def test_trim_python_keeps_what_black_and_modules_write_and_drops_usage():
    signature = "def add(\n    a: int,\n    b: int,\n) -> int:\n    return a + b\n"
    assert trim_python(signature + "\nprint(add(1, 2))\n") == signature
    imports = "from operator import (\n    add as _add,\n)\n\ndef f(a, b):\n    return _add(a, b)\n"
    assert trim_python(imports + "assert f(1, 2) == 3\n") == imports
    constant = "MOD = 10 ** 9 + 7\nNAMES: list[str] = ['a']\n\ndef f(x):\n    return x % MOD\n"
    assert trim_python(constant + "result = f(5)\nprint(result)\n") == constant  # a value that calls is usage
    docstring = '"""Helpers."""\n\ndef f():\n    return 1\n'
    assert trim_python(docstring + "f()\n") == docstring
    assert trim_python("    return x + 1\n\nprint(") == "    return x + 1\n"


def test_trim_python_reads_a_line_at_the_margin_inside_brackets_as_part_of_its_statement():
    """``2]`` at the margin, closing a list opened on the line before, began a new statement: the one before it
    then did not parse, and it and everything after were dropped."""
    constant = "PRIMES = [2, 3,\n5, 7]\n\ndef f(x):\n    return x in PRIMES\n"
    assert trim_python(constant + "print(f(3))\n") == constant
    body = "    return [1,\n2]\n\ndef g():\n    return 3\n"
    assert trim_python(body + "print(g())\n") == body
    assert trim_python("x = 1 + \\\n2\ndef f():\n    pass\nf(") == "x = 1 + \\\n2\ndef f():\n    pass\n"


def test_trim_python_reads_the_lines_of_a_multi_line_string_as_part_of_its_statement():
    # the inner and closing lines of a string sit at the margin, but they are not statements
    module_doc = '"""\nSquares of numbers.\n"""\ndef square(x):\n    return x * x\n'
    assert trim_python(module_doc + "\nprint(square(3))\n") == module_doc
    text = 'def usage():\n    return """\nusage: tool FILE\n"""\n'
    assert trim_python(text + "\n\nassert usage()\n") == text
    cut = 'def f():\n    return """\nstill in the string\nprint(1)'  # a string still open at the token limit
    assert trim_python(cut) == cut + "\n"
    assert trim_python("    return x + 1\n\nprint(") == "    return x + 1\n"


def test_extract_code_reads_a_spaced_tag_and_prefers_the_language_asked_for():
    spaced = "Here is the code:\n``` python\ndef f():\n    return 1\n```\nThat's it."
    assert extract_code(spaced) == "def f():\n    return 1\n"
    install = "First:\n```bash\npip install numpy\n```\nThen:\n```python\nimport numpy\n```\n"
    assert extract_code(install, "python") == "import numpy\n"
    assert extract_code(install) == "pip install numpy\n"  # no language asked: the first block
    assert extract_code("```\nx = 1\n```\n```js\nlet a\n```", "javascript") == "x = 1\n"  # untagged counts


def test_sql_and_exact_match_checkers_read_the_block_of_their_language():
    """first_statement and exact_match took the first fenced block whatever its tag: a Python block before the
    SQL (or a shell, Verilog) one was scored instead of the answer."""
    sql = "```python\nimport sqlite3\nconn.execute(query)\n```\nThe query:\n```SQL\nSELECT count(*) FROM singer;\n```"
    assert first_statement(sql) == "SELECT count(*) FROM singer"
    assert first_statement("```python\nx = 1;\n```") == "x = 1"  # no SQL block: the first, as before
    shell = Example("# list files\n", "ls -la\n", {"language": "bash"})
    assert exact_match(shell, "```python\nimport os\n```\nIn a shell:\n```sh\nls   -la\n```")
    assert not exact_match(shell, "```python\nls -la\n```\n```sh\nls\n```")
    verilog = Example("module top_module(input a, output b);\n", "assign b = a;\n", {"language": "verilog"})
    assert exact_match(verilog, "```python\nb = a\n```\n```verilog\nassign b = a;\nendmodule\n```")


def test_benchmark_references_extract_as_they_are_in_their_language():
    """A reference (HumanEval, VerilogEval and, with the data directory, MBPP, HumanEval-X, Spider, NL2Bash)
    extracts to itself whether or not its language is asked for."""
    sets = [humaneval(), sources.verilogeval("Human"), sources.verilogeval("Machine")]
    if DATA_DIR.is_dir():
        sets += [sources.mbpp(DATA_DIR), sources.spider(DATA_DIR), sources.nl2bash(DATA_DIR),
                 *(sources.humaneval_x(DATA_DIR, language) for language in sources.HUMANEVAL_X_LANGUAGES)]
    for examples in sets:
        for e in examples:
            language = e.meta["language"]
            assert extract_code(e.response, language) == extract_code(e.response) == e.response, e.meta
            assert normalise(e.response, language) == normalise(e.response)
            if language == "sql":
                assert first_statement(e.response) == e.response.strip().rstrip(";")
