"""CopyFilter: stretches of an answer that repeat n consecutive words of a source become one marker; the rest,
whitespace included, is kept."""

from __future__ import annotations

import pytest

from dylora_moe.data.sources import Example
from dylora_moe.evaluation.freeform import FreeformSet, sample
from dylora_moe.evaluation.redact import MARK, CopyFilter, words

REQUEST = 'What is the bash command to list every hidden folder kept under "old" but missing from "new"?'


def test_words_ignore_case_and_end_punctuation_but_keep_pure_punctuation():
    assert words('Print "dir1", then ```') == ["print", "dir1", "then", "```"]


def test_a_copied_stretch_becomes_one_marker_and_the_rest_is_kept():
    answer = 'To list every hidden folder kept under "old" but missing from "new", you can use:\n\n```bash\ndiff\n'
    assert CopyFilter.of([REQUEST])(answer) == f"{MARK} you can use:\n\n```bash\ndiff\n"  # "to list ..." too


def test_fewer_than_n_shared_words_are_kept():
    assert CopyFilter.of([REQUEST], n=5)("list every hidden folder") == "list every hidden folder"
    assert CopyFilter.of([REQUEST], n=4)("list every hidden folder") == MARK


def test_two_separate_copies_and_whitespace_only_answers():
    copies = CopyFilter.of(["alpha beta gamma delta epsilon", "one two three four five six"])
    text = "x alpha beta gamma delta epsilon y\tone two three four five six\n"
    assert copies(text) == f"x {MARK} y\t{MARK}\n"
    assert copies("\n" * 30) == "\n" * 30
    assert copies("") == ""


def test_overlapping_ngrams_merge_into_one_stretch():
    copies = CopyFilter.of(["a b c d e f g"], n=3)
    assert copies("a b c d e f g h") == f"{MARK} h"


def test_n_must_be_positive():
    with pytest.raises(ValueError, match="n >= 1"):
        CopyFilter.of(["a"], n=0)


def test_samples_quote_only_the_projects_own_requests_and_redact_copies_otherwise():
    own = FreeformSet("examples", "README", [Example("Write a Python function that adds two numbers.", "")],
                      quotable=True)
    row = sample(own, 0, "r", "\n\n", kind=None, kind_frozen="whitespace")
    assert row == {"index": 0, "request": own.examples[0].prompt, "routed": "r", "frozen": "\n\n", "kind": None,
                   "kind_frozen": "whitespace"}
    data = FreeformSet("nl2bash", "NL2Bash", [Example(REQUEST, 'diff -rq "old" "new" | grep Only')])
    row = sample(data, 0, 'Sure: list every hidden folder kept under "old" now', 'diff -rq "old" "new" | grep Only',
                 kind=None, kind_frozen=None)
    assert row == {"index": 0, "routed": f"Sure: {MARK} now", "frozen": MARK, "kind": None, "kind_frozen": None}
