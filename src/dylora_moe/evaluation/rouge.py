"""ROUGE-L as the SuperNI continual-learning papers score it: the F-measure of the longest common subsequence,
tokenised and Porter-stemmed by Google's ``rouge-score`` package, best over a task's reference outputs, in
points (0-100). Greedy outputs are scored as generated, with surrounding blanks removed."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from ..data.sources import Example


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (points) of ``prediction`` against the best-matching of ``references``."""
    if not references:
        raise ValueError("ROUGE-L needs at least one reference")
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction.strip())["rougeL"].fmeasure for ref in references)


def rouge_l_example(example: Example, completion: str) -> float:
    """ROUGE-L of a completion against an example's references (``meta["references"]``, else its response)."""
    return rouge_l(completion, example.meta.get("references") or [example.response])
