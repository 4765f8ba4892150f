"""The degenerate-output detector on hand-written answers: collapsed ones flagged, ordinary code kept."""

from __future__ import annotations

import pytest

from dylora_moe.evaluation.degenerate import (
    degenerate_kind,
    degenerate_rate,
    is_degenerate,
    paired_excess,
    repeated_run,
)

VERILOG_AND = "module and_gate(input a, input b, output y);\n    assign y = a & b;\nendmodule\n"
PYTHON = ("def factorial(n):\n    if n == 0:\n        return 1\n    return n * factorial(n - 1)\n\n"
          "print(factorial(5))  # 120\n")
TRUTH_TABLE = "a b | y\n0 0 | 0\n0 1 | 0\n1 0 | 0\n1 1 | 1\n"


@pytest.mark.parametrize("text, kind", [
    ("", "empty"),
    ("\n" * 60, "whitespace"),  # the Verilog expert's answer to "Write a Verilog module for a 2-input AND gate."
    ("\n\t\t\n\t \n", "whitespace"),
    ("module top_module(input a);\n" + "\n\t" * 40, "loop"),  # a start, then a whitespace cycle
    ("The answer is " + "a = a;\n" * 20, "loop"),
    ("To do this, you can use the following code: " * 6, "loop"),
    (VERILOG_AND, None),
    (PYTHON, None),
    (TRUTH_TABLE, None),
    ("x = [0, 0, 0, 0, 0, 0]\nprint(sum(x))\n", None),
    ("ls -la", None),
    # loops whose unit begins with a run of its own: the shortest repeating unit from the start is that run
    ("    x = x\n" * 4, "loop"),
    ("    return x\n" * 4, "loop"),
    ("====\n" * 4, "loop"),
    ("aaaaX" * 4, "loop"),
    ("Answer: " + "0000\n" * 4, "loop"),
])
def test_kinds(text, kind):
    assert degenerate_kind(text) == kind
    assert is_degenerate(text) == (kind is not None)


def test_indentation_and_short_repeats_are_not_loops():
    code = "        " + "\n        ".join(f"q[{i}] <= d[{i}];" for i in range(8)) + "\n"
    assert degenerate_kind(code) is None
    assert repeated_run("abababab")[0] == 8 and repeated_run("abababab")[1] == "ab"
    assert repeated_run("abcabc")[0] == 0  # two repeats are not a loop


def test_thresholds_are_parameters():
    text = "def f():\n    return 1\n" + "# x\n" * 4
    assert degenerate_kind(text) is None
    assert degenerate_kind(text, min_share=0.3) == "loop"
    assert degenerate_kind("abab" * 2, min_repeats=5) is None


def test_rate():
    assert degenerate_rate([]) == 0.0
    assert degenerate_rate(["\n\n", VERILOG_AND, "", PYTHON]) == 0.5


def test_paired_excess_counts_discordant_requests_and_its_exact_tail():
    system = [True, True, False, True, False, False]
    frozen = [True, False, False, False, True, False]
    assert paired_excess(system, frozen) == {"worse": 2, "better": 1, "p": 0.5}  # P(X >= 2 | 3 pairs) = 4/8
    assert paired_excess([True] * 2 + [False] * 14, [False] * 16)["p"] == 0.25  # 2 more loops of 16: p = 1/4
    assert paired_excess([True] * 6, [False] * 6)["p"] == 1 / 64
    assert paired_excess([False] * 3, [True] * 3)["p"] == 1.0  # the system is better on every pair
    assert paired_excess([True, False], [True, False]) == {"worse": 0, "better": 0, "p": 1.0}
    with pytest.raises(ValueError, match="equal lengths"):
        paired_excess([True], [True, False])


def test_a_loop_is_measured_to_its_last_whole_cycle():
    # nine copies of a 10-character line: the longest unit repeating four times is two lines (80 characters),
    # but the run of the line itself is 90
    loop = "    x = x\n" * 9
    assert repeated_run(loop) == (90, "    x = x\n")
    assert repeated_run("aaaaX" * 9) == (45, "aaaaX")
    prose = "Here is the module you asked for; please check the port names before you use it, thanks!"
    assert degenerate_kind(prose) is None
    # the run covers 90 of 178 characters (over half): a loop by the rule, missed when measured as 80
    assert degenerate_kind(prose + loop) == "loop"


SENTENCE = "I am using the find command to find files that match a pattern that is a substring of a pattern.\n\n"


def test_a_sentence_said_over_and_over_is_a_loop_whatever_its_length():
    # a 98-character unit: longer than any fixed cap of 64 would allow
    answer = "\nI am using bash 2.0.11.\n\n" + SENTENCE * 10 + "I am"
    assert len(SENTENCE) > 64
    run, unit = repeated_run(answer)
    # ten copies; the run starts where the repetition does, three characters early (the prefix also ends ".\n\n")
    assert run == 10 * len(SENTENCE) and len(unit) == len(SENTENCE) and unit in SENTENCE * 2
    assert degenerate_kind(answer) == "loop"
    assert degenerate_kind(answer, max_unit=64) is None  # the old cap missed it
    # three copies are not a loop, however long the unit
    assert degenerate_kind(SENTENCE * 3) is None
    # a paragraph of two alternating lines repeated: the unit is both lines
    paragraph = "The output should be:\n\n```\n/path/a.png\n```\n\nThe output should be:\n\n```\n/path/a.jpg\n```\n\n"
    assert degenerate_kind("Try this:\n" + paragraph * 4) == "loop"


def test_the_run_is_found_wherever_it_starts_and_in_any_script():
    assert repeated_run("prefix " + "ab" * 5 + " suffix") == (10, "ab")
    assert repeated_run("été " * 4) == (16, "été ")  # characters, not bytes
    assert repeated_run("x") == (0, "")
    assert repeated_run("") == (0, "")
