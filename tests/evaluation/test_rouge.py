"""ROUGE-L as the SuperNI papers compute it, against values worked out by hand."""

from __future__ import annotations

import pytest

from dylora_moe.data.sources import Example
from dylora_moe.evaluation.rouge import rouge_l, rouge_l_example


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": P = R = 5/6
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    # 2 of 3 prediction tokens and 2 of 5 reference tokens in order: P = 2/3, R = 2/5, F = 2PR / (P + R) = 1/2
    assert rouge_l("a b c", ["a x c y z"]) == pytest.approx(50.0)


def test_stemming_and_the_best_reference():
    # stemmed: "run cat" vs "the cat run": LCS 1 -> P = 1/2, R = 1/3, F = 0.4 (0 without stemming)
    assert rouge_l("running cats", ["the cat runs"]) == pytest.approx(40.0)
    assert rouge_l("POS", ["NEG", "pos"]) == pytest.approx(100.0)  # case-folded, best of the references
    assert rouge_l("", ["joy"]) == 0.0
    with pytest.raises(ValueError, match="reference"):
        rouge_l("joy", [])


def test_example_references_fall_back_to_the_response():
    assert rouge_l_example(Example("p", "joy"), " joy\n") == pytest.approx(100.0)
    assert rouge_l_example(Example("p", "x", {"references": ["love", "joy"]}), "joy") == pytest.approx(100.0)
