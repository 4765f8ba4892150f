"""Pure continual-learning metrics over a score matrix ``R[i][j]`` = score on skill j after stream step i.

Entries for skills not yet seen may be ``None``. Loss-like matrices: lower is better, so a positive
``bwt_loss`` means forgetting (the loss rose after later steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def bwt_loss(matrix: Matrix) -> float:
    """Mean over all but the last skill of (final loss - loss right after learning it); 0.0 for one skill."""
    last = len(matrix) - 1
    deltas = [matrix[last][j] - matrix[j][j] for j in range(last)]
    return sum(deltas) / len(deltas) if deltas else 0.0


def routing_entropy(counts: Sequence[float]) -> float:
    """Entropy (nats) of a routing distribution given as counts or shares per expert."""
    total = float(sum(counts))
    if total <= 0:
        return 0.0
    return max(0.0, -sum((c / total) * math.log(c / total) for c in counts if c > 0))


def routing_accuracy(correct: Sequence[int], totals: Sequence[int]) -> float:
    """Share of all examples routed to their own skill's expert, pooled over skills."""
    n = sum(totals)
    return sum(correct) / n if n else 0.0
