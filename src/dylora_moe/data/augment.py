"""Format augmentation of a skill's training examples, so an expert does not learn its dataset's layout as
part of the skill.

``strip_leading_blank_lines`` drops the blank (whitespace-only) lines a response starts with: VerilogEval's
reference bodies start with a newline and tabs after the module header, and an expert trained on them learns
to open every answer with whitespace. The indentation of the first non-blank line is kept.
"""

from __future__ import annotations

from dataclasses import replace

from .sources import Example


def strip_leading_blank_lines(text: str) -> str:
    lines = text.split("\n")
    while len(lines) > 1 and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def normalise_example(example: Example) -> Example:
    return replace(example, response=strip_leading_blank_lines(example.response))
