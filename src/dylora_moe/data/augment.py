"""Format augmentation of a skill's training examples, so an expert does not learn its dataset's layout as
part of the skill.

``strip_leading_blank_lines`` drops the blank (whitespace-only) lines a response starts with: VerilogEval's
reference bodies start with a newline and tabs after the module header, and an expert trained on them learns
to open every answer with whitespace. The indentation of the first non-blank line is kept.

``instruction_view`` turns a completion-style example (a prompt that is code with its task in a comment or
docstring, a response that continues it) into the request a user would write: the prompt's prose alone as the
prompt, and the code of the prompt followed by the response as the answer. VerilogEval's "// Create 8 D
flip-flops ... module top_module(...);" + body becomes "Create 8 D flip-flops ..." -> "module top_module(...);"
+ body; a HumanEval signature and docstring + body becomes the docstring's text -> the whole function. An
expert trained on both writes whole programs for bare requests, and its skill's routing memory holds requests
phrased in prose, not only in its dataset's layout. Prompts that are already prose (MBPP, CodeAlpaca) or hold no
prose have no view.

With ``comments=True`` a prompt that is one comment line and nothing else (NL2Bash's "# find all .txt files")
has a view too: the comment's text as the request, the response unchanged. An expert trained only on the
commented form learns that a command follows a "#" line, and a bare request of its domain ("find all .txt
files", or a question) can get an end of sequence as its first token. Prompts of several comment lines
(Spider's schema and question) keep their layout: joining them into one line would lose the schema's.

``language_request`` is the request naming the language, as users write it ("In Python: return the factorial
of n."), for an example whose source declares its language (``meta["language"]``): the skill's routing memory
holds it, so the gate learns the language's name as well as its dataset's phrasing. A request that names its
language otherwise looks like any other skill's prose request (a plain-English Python request and VerilogEval's
English descriptions share their verbs and layout).
"""

from __future__ import annotations

import re
from dataclasses import replace

from .sources import Example


def strip_leading_blank_lines(text: str) -> str:
    lines = text.split("\n")
    while len(lines) > 1 and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def normalise_example(example: Example) -> Example:
    return replace(example, response=strip_leading_blank_lines(example.response))


COMMENT = re.compile(r"^\s*(//+|#(?![!a-z])|--)\s?(.*?)\s*$")
OPENERS = (("/*", "*/"), ('"""', '"""'), ("'''", "'''"))  # block comments and docstrings
DOCTEST = re.compile(r"^\s*(>>>|[A-Za-z_]\w*\(.*\)\s*(==|=>|->|➞)\s*\S)")


def is_code(text: str) -> bool:
    """Whether what follows a closed block comment or docstring on its line is code (not blank or a comment)."""
    text = text.strip()
    return bool(text) and COMMENT.match(text) is None and not text.startswith("/*")


def prose_and_code(prompt: str) -> tuple[list[str], list[str], int]:
    """The prompt's prose lines (comment and docstring text; doctests, ``>>> f(x)`` with the output line after
    it and ``f(x) -> y`` (or ``==``, ``=>``, ``➞``) alone, left out), its code lines, and how many of its first
    lines are prose or blank (the header a completion-style prompt puts before its code). A line with code after
    a block comment closed on it (``/* desc */ module top(...);``) is code, and the comment goes with it. A
    prompt with no line of code outside its comments and docstrings (MBPP's task in a docstring) has no code
    lines: its docstring documents no code, it is the request."""
    prose, code, lead = [], [], 0
    leading, closer, skip_output, proper, opened_at = True, None, False, False, 0

    def take(text: str) -> None:
        nonlocal skip_output
        text = text.strip().lstrip("*").strip()
        if DOCTEST.match(text):
            skip_output = text.startswith(">>>")  # "f(x) -> y" holds its result: the next line is no output
        elif skip_output:
            skip_output = False
        elif text:
            prose.append(text)

    for line in prompt.split("\n"):
        text = line.strip()
        if closer is not None:  # inside a block comment or docstring
            closes = closer in text
            take(text.split(closer)[0] if closes else text)
            if closes and is_code(text.split(closer, 1)[1]):  # "*/ module top(...);": code after the comment
                lead = opened_at if leading else lead  # the comment goes with the code, as a docstring does
                leading, proper = False, True
            closer = None if closes else closer
            if leading:
                lead += 1
            else:
                code.append(line)
            continue
        opener = next(((o, c) for o, c in OPENERS if re.sub(r"^[rbuRBU]", "", text).startswith(o)), None)
        comment = COMMENT.match(line)
        if opener is not None:
            rest = re.sub(r"^[rbuRBU]", "", text)[len(opener[0]):]
            skip_output = False
            if opener[1] in rest:  # closed on the same line
                take(rest.split(opener[1])[0])
            else:
                take(rest)
                closer, opened_at = opener[1], lead
            leading = leading and opener[0] == "/*"  # a docstring belongs to the code it documents
            if closer is None and is_code(rest.split(opener[1], 1)[1]):  # "/* desc */ module top(...);"
                leading, proper = False, True
        elif comment is not None:  # "#include", "#!" are code: the pattern leaves them out
            take(comment.group(2))
        elif text:
            leading, proper = False, True
        if leading:
            lead += 1
        else:
            code.append(line)
    return prose, [c for c in code if c.strip()] if proper else [], lead


SENTENCE = re.compile(r"^[A-Z][a-z']*(\s+\S+){3,}[.?!:]$")
CODE_MARKS = re.compile(r"[(){}\[\];=<>]")


def opens_with_request(prompt: str) -> bool:
    """Whether the prompt's first line is a sentence outside any comment ("Write a function to delete a node of a
    binary search tree."): a request in prose followed by its input (CodeAlpaca's layout), not code. The comments
    of that input are no request of their own, and the request is no code of the answer."""
    first = next((line.strip() for line in prompt.split("\n") if line.strip()), "")
    return SENTENCE.match(first) is not None and CODE_MARKS.search(first) is None and COMMENT.match(first) is None


def instruction_view(example, *, comments: bool = False):
    """``example`` as a bare request (see the module doc), or ``None`` when its prompt is not code with prose
    (or, with ``comments``, a one-line comment), or is already a request in prose followed by its input."""
    if opens_with_request(example.prompt):
        return None
    prose, code, lead = prose_and_code(example.prompt)
    if comments and not code and len(prose) == 1 and "\n" not in example.prompt.strip():
        return replace(example, prompt=prose[0])
    if not prose or not code:
        return None
    request = " ".join(prose)
    program = "\n".join(example.prompt.split("\n")[lead:])
    answer = strip_leading_blank_lines(program.rstrip("\n") + "\n" + strip_leading_blank_lines(example.response))
    return replace(example, prompt=request, response=answer)


LANGUAGE_NAMES = {"python": "Python", "js": "JavaScript", "javascript": "JavaScript", "cpp": "C++", "java": "Java",
                  "go": "Go", "verilog": "Verilog", "sql": "SQL", "bash": "Bash"}


def language_request(example):
    """``example``'s task as a request naming its language (see the module doc), or ``None`` when its source
    declares no language or its prompt holds no prose."""
    code = example.meta.get("language")
    if code is None:
        return None
    view = instruction_view(example)
    prose = view.prompt if view is not None else " ".join(prose_and_code(example.prompt)[0]).strip()
    if not prose:
        return None
    return replace(example, prompt=f"In {LANGUAGE_NAMES.get(code, code)}: {prose}")
