"""Format augmentation: leading blank lines go, the first line's indentation and everything else stay."""

from __future__ import annotations

import re
from dataclasses import replace

from dylora_moe.data.augment import instruction_view, language_request, normalise_example, strip_leading_blank_lines
from dylora_moe.data.sources import Example, humaneval


def test_strip_leading_blank_lines():
    assert strip_leading_blank_lines("\n\tassign y = a;\nendmodule\n") == "\tassign y = a;\nendmodule\n"
    assert strip_leading_blank_lines("\t\n\t\n\talways @(posedge clk)\n") == "\talways @(posedge clk)\n"
    assert strip_leading_blank_lines("    return 1\n\n") == "    return 1\n\n"
    assert strip_leading_blank_lines("\n\n") == ""
    assert strip_leading_blank_lines("") == ""


def test_normalise_example_keeps_prompt_and_meta():
    e = normalise_example(Example("module m();\n", "\n\tassign y = 1;\nendmodule\n", {"task_id": "t"}))
    assert e.prompt == "module m();\n" and e.response == "\tassign y = 1;\nendmodule\n" and e.meta == {"task_id": "t"}


VERILOG = Example("// Create a 2-input AND gate.\n// Name it top_module.\n\nmodule top_module(\n\tinput a,\n"
                  "\tinput b,\n\toutput out);\n", "\n\tassign out = a & b;\nendmodule\n")
PYTHON = Example('from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """ Return the sum of xs.\n'
                 '    >>> total([1, 2])\n    3\n    Empty lists sum to 0.\n    """\n', "    return sum(xs)\n")


def test_a_commented_header_becomes_a_request_for_the_whole_module():
    view = instruction_view(VERILOG)
    assert view.prompt == "Create a 2-input AND gate. Name it top_module."
    assert view.response == "module top_module(\n\tinput a,\n\tinput b,\n\toutput out);\n\tassign out = a & b;\n" \
                            "endmodule\n"


def test_a_docstring_becomes_a_request_for_the_whole_function_without_its_doctests():
    view = instruction_view(PYTHON)
    assert view.prompt == "Return the sum of xs. Empty lists sum to 0."
    assert view.response == PYTHON.prompt + PYTHON.response  # the docstring stays in the program


def test_the_line_after_an_example_with_its_result_on_its_line_is_kept():
    """``f(x) -> y`` holds its result, but the line after it was dropped as its output: HumanEval/46 lost its
    request after the sequence's definition, HumanEval/110 a constraint after its examples."""
    def line_after_last_result(prompt: str) -> str:
        lines = [line.strip() for line in prompt.split("\n")]
        last = max(i for i, line in enumerate(lines) if re.search(r"\)\s*(->|=>)", line))
        return " ".join(lines[last + 1].split())

    problems = humaneval()
    for index in (46, 110):
        view = " ".join(instruction_view(problems[index]).prompt.split())
        assert line_after_last_result(problems[index].prompt) in view
    assert "fib4(5)" not in instruction_view(problems[46]).prompt  # a >>> doctest and its output are still left out
    plain = Example('def f(xs):\n    """Sort xs.\n    f([2, 1]) == [1, 2]\n    Keep xs unchanged.\n    """\n',
                    "    return sorted(xs)\n")
    assert instruction_view(plain).prompt == "Sort xs. Keep xs unchanged."


def test_block_comments_and_one_line_docstrings():
    js = Example("/* Add two numbers.\n  >>> add(1, 2)\n  3\n  */\nconst add = (a, b) => {\n", "  return a + b;\n};\n")
    assert instruction_view(js).prompt == "Add two numbers."
    assert instruction_view(js).response.startswith("const add = (a, b) => {\n  return a + b;")
    one = Example('def f():\n    """Return one."""\n', "    return 1\n")
    assert instruction_view(one).prompt == "Return one."


def test_code_after_a_closed_block_comment_on_its_line_is_code():
    """``/* desc */ module top(...);`` counted as a header line of prose: the module header was dropped from the
    view (with ``comments=True`` the request was answered by the body alone), or there was no view."""
    body = "  assign out = a & b;\nendmodule\n"
    one = Example("/* Build an AND gate. */ module top_module(input a, input b, output out);\n", body)
    for comments in (False, True):
        view = instruction_view(one, comments=comments)
        assert view.prompt == "Build an AND gate." and view.response == one.prompt + body
    two = Example("// Gates.\n\n/* Build\n   an AND gate. */ module top_module(input a, output out);\n", body)
    view = instruction_view(two)
    assert view.prompt == "Gates. Build an AND gate."
    assert view.response == "/* Build\n   an AND gate. */ module top_module(input a, output out);\n" + body
    assert instruction_view(Example("/* Add. */ // two numbers\n", "x"), comments=True).prompt == "Add."


def test_prompts_that_are_already_requests_or_hold_no_prose_have_no_view():
    assert instruction_view(Example("Write a function to add two numbers.", "def add(a, b): return a + b")) is None
    assert instruction_view(Example("How many singers are there?", "SELECT count(*) FROM singer")) is None
    assert instruction_view(Example("def f(x):\n", "    return x\n")) is None
    assert instruction_view(Example("#include <stdio.h>\nint main() {\n", "}\n")) is None
    # a task in a docstring that documents no code (MBPP's layout) is a request already: no view, whose answer
    # would start by echoing the request
    mbpp = Example('"""Write a function to add two numbers.\nassert add(1, 2) == 3\n"""\n',
                   "def add(a, b): return a + b\n", {"language": "python"})
    assert instruction_view(mbpp) is None
    assert language_request(mbpp).prompt == "In Python: Write a function to add two numbers. assert add(1, 2) == 3"
    assert language_request(mbpp).response == mbpp.response


def test_a_one_line_comment_prompt_is_viewed_as_its_text_only_when_asked():
    bash = Example("# Find all .txt files under the current directory.\n", "find . -name '*.txt'\n",
                   {"language": "bash"})
    assert instruction_view(bash) is None
    view = instruction_view(bash, comments=True)
    assert view.prompt == "Find all .txt files under the current directory."
    assert view.response == bash.response and view.meta == bash.meta  # the command, untouched
    assert instruction_view(Example("-- List the singers.\n", "SELECT name FROM singer;\n"), comments=True).prompt \
        == "List the singers."
    spider = Example("-- database: concert\n-- singer(name, age)\n-- question: How many singers are there?\n",
                     "SELECT count(*) FROM singer;\n")
    assert instruction_view(spider, comments=True) is None  # several comment lines keep their layout
    assert instruction_view(Example("How many singers are there?", "x"), comments=True) is None  # prose already
    assert instruction_view(Example("#include <stdio.h>\n", "int main() {}\n"), comments=True) is None  # code
    assert instruction_view(VERILOG, comments=True) == instruction_view(VERILOG)  # code with prose: as before


def test_a_request_names_the_language_its_source_declares():
    verilog = replace(VERILOG, meta={"language": "verilog"})
    assert language_request(verilog).prompt == "In Verilog: Create a 2-input AND gate. Name it top_module."
    python = replace(PYTHON, meta={"language": "python"})
    assert language_request(python).prompt == "In Python: Return the sum of xs. Empty lists sum to 0."
    sql = Example("-- database: concert\n-- singer(name, age)\n-- question: How many singers are there?\n",
                  "SELECT count(*) FROM singer;\n", {"language": "sql"})  # prose already: its comment lines
    assert language_request(sql).prompt == "In SQL: database: concert singer(name, age) question: How many " \
                                           "singers are there?"
    assert language_request(VERILOG) is None  # no language declared
    assert language_request(Example("x = 1\n", "", {"language": "python"})) is None  # no prose


def test_a_request_in_prose_followed_by_its_input_has_no_view():
    """An instruction-style prompt (a sentence, then the code it is about) is already a request: viewing the
    input's comments as the request would train "Definition of a node." -> "Write a function ..." + code."""
    examples = [Example("Write a function that counts the nodes of a tree.\n# A tree node.\nclass Node:\n"
                        "    def __init__(self, kids):\n        self.kids = kids\n", "def count(n):\n    return 1\n"),
                Example("Fix the bug in this code:\ndef half(x):\n    # halve x\n    return x * 2\n",
                        "def half(x):\n    return x / 2\n"),
                Example("Complete the loop below.\nfor i in range(3):\n    // TODO: print i\n", "    print(i)\n")]
    assert [instruction_view(e) for e in examples] == [None, None, None]
    assert instruction_view(VERILOG) is not None and instruction_view(PYTHON) is not None
