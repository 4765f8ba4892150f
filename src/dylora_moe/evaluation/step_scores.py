"""Greedy-decoding scores after every stream step: the score matrix the continual-learning papers report.

After step i each skill's answer metric (its checker's: ROUGE-L for SuperNI, pass@1 or exact match otherwise)
is measured on the first ``limit`` held-out examples of every skill seen so far and of the next one, the cell
forward transfer needs; later cells stay ``None``. After the last step every skill is also scored on its first
``final_limit`` held-out examples (the final scores, e.g. SuperNI's whole test split); the matrix cell of that
row is the mean over the first ``limit`` of them, so all cells of a column are measured on the same examples.
The held-out examples are the skill's whole held-out split, not the ``max_eval`` cap the loss matrix uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from ..data.sources import Example
from ..data.stream import SkillSpec, load_examples, split_examples
from ..model import DyLoRAMoE
from ..training.loop import ContinualLearner
from .generation import checker_for, score_examples


def held_out_examples(skill: SkillSpec, data_dir: str | Path | None) -> list[Example]:
    """A skill's whole held-out split (the same split the learner uses, without the ``max_eval`` cap)."""
    return split_examples(load_examples(skill, data_dir), skill.eval_share)[1]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class StepScorer:
    """Fills the score matrix of one method; call it after every step (the learner's ``after_skill`` hook).

    Args:
        model, learner: the system and the learner running the stream (its ``eval_routing`` routes each skill).
        limit: held-out examples per skill scored after every step.
        final_limit: held-out examples per skill scored after the last step.
        max_new_tokens: generation length (default: each checker's own).
        data_dir, batch_size, cache: as for ``checker_for`` and ``score_examples``.
    """

    def __init__(self, model: DyLoRAMoE, learner: ContinualLearner, *, limit: int, final_limit: int,
                 max_new_tokens: int | None = None, data_dir: str | Path | None = None, batch_size: int = 16,
                 cache: str | Path | None = None) -> None:
        if limit < 1 or final_limit < limit:
            raise ValueError(f"need 1 <= limit <= final_limit, got limit={limit} final_limit={final_limit}")
        self.model, self.learner = model, learner
        self.limit, self.final_limit, self.batch_size = limit, final_limit, batch_size
        skills = learner.skills
        self.examples = [held_out_examples(s, data_dir) for s in skills]
        self.checkers = [checker_for(s, data_dir=data_dir, cache=cache) for s in skills]
        if max_new_tokens is not None:
            self.checkers = [dataclasses.replace(c, max_new_tokens=max_new_tokens) for c in self.checkers]
        self.rows: list[list[float | None]] = []
        self.final: list[dict] = []

    def __call__(self, i: int, record: object = None) -> list[float | None]:
        """Score the system as it is after step ``i``; returns (and keeps) the matrix row."""
        n = len(self.learner.skills)
        last = i == n - 1
        row: list[float | None] = [None] * n
        for j in range(min(i + 2, n)):
            values = self.values(j, self.final_limit if last else self.limit)
            row[j] = mean(values[: self.limit])
            if last:
                checker = self.checkers[j]
                self.final.append({"skill": self.learner.skills[j].name, "metric": checker.metric,
                                   "checker": checker.name, "score": mean(values), "n": len(values)})
        self.rows.append(row)
        return row

    def values(self, j: int, limit: int) -> list[float]:
        skill, checker = self.learner.skills[j], self.checkers[j]
        with self.learner.eval_routing(j):
            return score_examples(self.model, self.examples[j][:limit], checker, chat=skill.format.chat,
                                  batch_size=self.batch_size).values

    @property
    def metric(self) -> str:
        return self.checkers[0].metric if self.checkers else ""


def chain(*hooks) -> object:
    """One ``after_skill`` hook calling every given hook (``None`` entries skipped) in order."""
    present = [h for h in hooks if h is not None]

    def hook(i: int, record: object) -> None:
        for h in present:
            h(i, record)

    return hook

