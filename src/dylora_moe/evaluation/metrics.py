"""Pure continual-learning metrics over a score matrix ``R[i][j]`` = score on skill j after stream step i.

Sign convention: every function takes ``higher_is_better``. For accuracy-like scores (pass@1, exact match)
it is ``True`` and the formulas are the papers'. For loss-like scores (nats) it is ``False`` and scores are
negated first, so that for both kinds a negative BWT and a positive forgetting mean the same thing: the
model got worse on earlier skills. ``bwt_loss`` keeps the loss-native sign used in run summaries (final -
just learned: positive = forgetting). Entries for skills not yet seen may be ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _oriented(matrix: Matrix, higher_is_better: bool) -> list[list[float | None]]:
    sign = 1.0 if higher_is_better else -1.0
    return [[None if v is None else sign * v for v in row] for row in matrix]


def average_accuracy(matrix: Matrix) -> float:
    """ACC: mean score over all skills after the last step (in the matrix's own units, either kind)."""
    if not matrix or not matrix[-1]:
        raise ValueError("ACC needs the scores after at least one step: the score matrix is empty")
    last = matrix[-1]
    unmeasured = [j for j, v in enumerate(last) if v is None]
    if unmeasured:
        raise ValueError(f"ACC needs every skill's score after the last step; skill(s) {unmeasured} of the last row "
                         "were not measured")
    return sum(last) / len(last)


Labels = Sequence[str] | None  # the true skill of each step: a skill may return at a later step


def _check(labels: Labels, n: int) -> None:
    if labels is not None and len(labels) != n:
        raise ValueError(f"one label per stream step is needed: {len(labels)} labels for {n} steps")


def first_steps(labels: Labels, n: int) -> list[int]:
    """Steps that bring a skill for the first time (every step without labels)."""
    _check(labels, n)
    return [j for j in range(n) if labels is None or labels[j] not in labels[:j]]


def settled_steps(labels: Labels, n: int) -> list[int]:
    """Steps before the last whose skill is not trained again later (every step but the last without labels):
    the columns whose later change is transfer from other skills, not the skill's own return."""
    _check(labels, n)
    return [j for j in range(n - 1) if labels is None or labels[j] not in labels[j + 1 :]]


def backward_transfer(matrix: Matrix, higher_is_better: bool = True, labels: Labels = None) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean over j < T-1 of R[T-1][j] - R[j][j] (oriented). With ``labels``, a
    skill that returns counts once, at its last step (``settled_steps``): its first column's gain from being
    trained again is relearning, not backward transfer. 0.0 when no column qualifies."""
    r = _oriented(matrix, higher_is_better)
    last = len(r) - 1
    deltas = [r[last][j] - r[j][j] for j in settled_steps(labels, len(r))]
    return sum(deltas) / len(deltas) if deltas else 0.0


def forward_transfer(matrix: Matrix, base: Sequence[float], higher_is_better: bool = True,
                     labels: Labels = None) -> float:
    """FWT (Lopez-Paz & Ranzato 2017): mean over j >= 1 of R[j-1][j] - b[j], with b the untrained base
    model's score on skill j (oriented). Needs the entries above the diagonal. With ``labels``, only the steps
    that bring a new skill count (``first_steps``): before a returning skill's step the model has already
    learned it, which is retention, not forward transfer. A missing base score or cell is a ValueError."""
    r = _oriented(matrix, higher_is_better)
    if len(base) < len(r):
        raise ValueError(f"FWT needs the base model's score on every skill: {len(base)} base scores for {len(r)} "
                         "skills")
    b = [None if v is None else v if higher_is_better else -v for v in base]
    columns = [j for j in first_steps(labels, len(r)) if j >= 1]
    unmeasured = [j for j in columns if j >= len(r[j - 1]) or r[j - 1][j] is None or b[j] is None]
    if unmeasured:
        raise ValueError(f"FWT needs each skill's score before its step (above the diagonal) and the base model's; "
                         f"skill(s) {unmeasured} were not measured: evaluate the skills ahead or leave FWT out")
    deltas = [r[j - 1][j] - b[j] for j in columns]
    return sum(deltas) / len(deltas) if deltas else 0.0


def forgetting(matrix: Matrix, higher_is_better: bool = True, labels: Labels = None) -> float:
    """Average forgetting (Chaudhry et al. 2018): mean over j < T-1 of max_{l < T-1} R[l][j] - R[T-1][j]
    (oriented, over the steps at which j had been seen; with ``labels``, over ``settled_steps``). A non-finite
    cell (a diverged run) makes it NaN."""
    r = _oriented(matrix, higher_is_better)
    last = len(r) - 1
    drops = [_max(r[step][j] for step in range(j, last)) - r[last][j] for j in settled_steps(labels, len(r))]
    return sum(drops) / len(drops) if drops else 0.0


def bwt_loss(matrix: Matrix, labels: Labels = None) -> float:
    """Mean over the settled skills of (final loss - loss right after learning it) (``backward_transfer``'s
    columns, loss-native sign: positive = forgetting); 0.0 for one skill."""
    return -backward_transfer(matrix, higher_is_better=False, labels=labels)


def max_transient_forgetting(matrix: Matrix) -> float:
    """The largest rise of any skill's loss above its just-learned value at any later step (not only the
    last): what a user of the system sees between two skills, which BWT (final - just learned) hides. 0.0 when
    no loss ever rose, NaN when a loss is not finite (a diverged run hides nothing); ``matrix[i][j]`` is skill
    j's loss after step i (``None`` before it is learned)."""
    rises = [row[j] - matrix[j][j] for i, row in enumerate(matrix) for j in range(i)
             if row[j] is not None and matrix[j][j] is not None]
    return _max([0.0, *rises])


def _max(values) -> float:
    """``max``, but NaN as soon as a value is NaN or infinite (``max`` would skip a NaN unless it came first)."""
    values = list(values)
    return math.nan if any(not math.isfinite(v) for v in values) else max(values)


def routing_accuracy(correct: Sequence[int], totals: Sequence[int]) -> float:
    """Share of all examples routed to their own skill's expert, pooled over skills."""
    n = sum(totals)
    return sum(correct) / n if n else 0.0


def novelty_scores(predicted_novel: Sequence[bool], true_skills: Sequence[str]) -> dict[str, float]:
    """Precision, recall and F1 of the novelty decisions of a stream whose true skill labels are known: a
    step is truly novel when its label has not appeared at an earlier step."""
    seen: set[str] = set()
    truth = []
    for label in true_skills:
        truth.append(label not in seen)
        seen.add(label)
    tp = sum(p and t for p, t in zip(predicted_novel, truth, strict=True))
    fp = sum(p and not t for p, t in zip(predicted_novel, truth, strict=True))
    fn = sum(t and not p for p, t in zip(predicted_novel, truth, strict=True))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# ---------------------------------------------------------------- sorting a mixed stream
Contingency = dict[int, dict[str, int]]  # expert (cluster) -> true skill -> examples


def purity(table: Contingency) -> float:
    """Share of sorted examples that went to an expert whose majority skill is their own (1.0: no expert mixes
    skills). Splitting a skill over several experts is not penalised here: see ``adjusted_rand_index``."""
    total = sum(sum(row.values()) for row in table.values())
    return sum(max(row.values()) for row in table.values() if row) / total if total else 1.0


def adjusted_rand_index(table: Contingency) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) of the sorting against the true skills, from the contingency
    table: 1.0 for a perfect sorting up to renaming, about 0 for a random one."""

    def pairs(n: int) -> float:
        return n * (n - 1) / 2

    cells = [v for row in table.values() for v in row.values()]
    n = sum(cells)
    rows = [sum(row.values()) for row in table.values()]
    cols: dict[str, int] = {}
    for row in table.values():
        for skill, v in row.items():
            cols[skill] = cols.get(skill, 0) + v
    index = sum(pairs(v) for v in cells)
    a, b = sum(pairs(v) for v in rows), sum(pairs(v) for v in cols.values())
    expected = a * b / pairs(n) if n > 1 else 0.0
    top = (a + b) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def main_expert(table: Contingency, skill: str) -> int | None:
    """The expert holding most of ``skill``'s sorted examples (the lowest id on a tie); ``None`` if none."""
    held = {expert: row.get(skill, 0) for expert, row in table.items()}
    return max(held, key=lambda e: (held[e], -e)) if any(held.values()) else None


def novelty_delay(drawn: Sequence[dict[str, int]], founded: Sequence[Sequence[int]],
                  table: Contingency) -> dict[str, int]:
    """Per true skill: how many of its examples arrived before the expert that now holds most of it was
    created (0 when the expert was created in the chunk that first brought the skill). A skill whose main
    expert belongs to another skill (it never got its own) counts all its examples. ``drawn[i]``: examples
    per skill in chunk i; ``founded[i]``: the experts created in chunk i; ``table``: the whole sorting."""
    created = {expert: i for i, experts in enumerate(founded) for expert in experts}
    owner = {skill: main_expert(table, skill) for skill in {s for chunk in drawn for s in chunk}}
    delay = {}
    for skill, expert in owner.items():
        row = table.get(expert, {}) if expert is not None else {}
        own = bool(row) and max(row, key=lambda s: (row[s], s == skill)) == skill
        when = created.get(expert, len(drawn)) if own else len(drawn)
        delay[skill] = sum(chunk.get(skill, 0) for chunk in drawn[:when])
    return delay
