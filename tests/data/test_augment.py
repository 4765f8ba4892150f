"""Format augmentation: leading blank lines go, the first line's indentation and everything else stay."""

from __future__ import annotations

from dylora_moe.data.augment import normalise_example, strip_leading_blank_lines
from dylora_moe.data.sources import Example


def test_strip_leading_blank_lines():
    assert strip_leading_blank_lines("\n\tassign y = a;\nendmodule\n") == "\tassign y = a;\nendmodule\n"
    assert strip_leading_blank_lines("\t\n\t\n\talways @(posedge clk)\n") == "\talways @(posedge clk)\n"
    assert strip_leading_blank_lines("    return 1\n\n") == "    return 1\n\n"
    assert strip_leading_blank_lines("\n\n") == ""
    assert strip_leading_blank_lines("") == ""


def test_normalise_example_keeps_prompt_and_meta():
    e = normalise_example(Example("module m();\n", "\n\tassign y = 1;\nendmodule\n", {"task_id": "t"}))
    assert e.prompt == "module m();\n" and e.response == "\tassign y = 1;\nendmodule\n" and e.meta == {"task_id": "t"}
