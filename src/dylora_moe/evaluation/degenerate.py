"""Degenerate outputs: what a model writes when it has collapsed instead of answering.

A completion is degenerate when it is

- ``empty``: no characters at all;
- ``whitespace``: only spaces, tabs and newlines (the failure of an expert over-fitted to responses that start
  with a newline and tabs: it answers an ordinary request with a run of newlines);
- ``loop``: one unit of at most ``max_unit`` characters repeated at least ``min_repeats`` times in a row,
  the run covering at least ``min_share`` of the completion (greedy decoding stuck in a cycle such as
  ``"a = a;\\n" * 20`` or ``"\\n\\t" * 40`` after a few words).

Ordinary code repeats short units too (indentation, ``0000``, a few similar lines), but not over half of
what it writes; the thresholds are set so that ordinary code pass and the collapsed answers of an
over-fitted Verilog expert (newlines, a newline-tab cycle) do not (both kinds are in the tests).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

KINDS = ("empty", "whitespace", "loop")


def repeated_run(text: str, *, max_unit: int = 64, min_repeats: int = 4) -> tuple[int, str]:
    """Length and unit of the longest run of one unit repeated ``min_repeats``+ times back to back. From each
    start both the shortest unit that repeats and the longest one are tried: the shortest alone measures only
    its own run when the loop's unit begins with a run of its own (``"    x = x\n" * 4`` would give four
    spaces), the longest alone can miss a finer cycle that runs further. A unit found is reduced to the cycle it
    repeats and the run measured in copies of that cycle: the longest unit is a whole number of cycles, so it
    stops short of a run whose length is not a multiple of it (nine copies of a 10-character line match a
    20-character unit four times, 80 characters of the 90)."""
    patterns = [re.compile(rf"(.{{1,{max_unit}}}{lazy})\1{{{min_repeats - 1},}}", re.DOTALL) for lazy in ("?", "")]
    best, unit = 0, ""
    for start in range(len(text)):
        for pattern in patterns:
            match = pattern.match(text, start)
            if match:
                cycle = _cycle(match.group(1))
                run = _extent(text, start, cycle)
                if run > best:
                    best, unit = run, cycle
        if best >= len(text) - start:
            break  # no later run can be longer
    return best, unit


def _cycle(unit: str) -> str:
    """The shortest string whose copies make up ``unit`` (``"abab"`` -> ``"ab"``; ``unit`` itself if none)."""
    n = len(unit)
    return next(unit[:size] for size in range(1, n + 1) if n % size == 0 and unit[:size] * (n // size) == unit)


def _extent(text: str, start: int, cycle: str) -> int:
    """Length of the run of back-to-back copies of ``cycle`` in ``text`` from ``start``."""
    end = start
    while text.startswith(cycle, end):
        end += len(cycle)
    return end - start


def degenerate_kind(text: str, *, max_unit: int = 64, min_repeats: int = 4, min_share: float = 0.5) -> str | None:
    """``"empty"``, ``"whitespace"``, ``"loop"`` or ``None`` for an answer that is none of these."""
    if not text:
        return "empty"
    if not text.strip():
        return "whitespace"
    run, _ = repeated_run(text, max_unit=max_unit, min_repeats=min_repeats)
    return "loop" if run >= min_share * len(text) else None


def is_degenerate(text: str, **kwargs) -> bool:
    return degenerate_kind(text, **kwargs) is not None


def degenerate_rate(texts: Sequence[str], **kwargs) -> float:
    """Share of ``texts`` that are degenerate (0.0 for no texts)."""
    return sum(is_degenerate(t, **kwargs) for t in texts) / len(texts) if texts else 0.0


def paired_excess(system: Sequence[bool], frozen: Sequence[bool]) -> dict[str, float | int]:
    """Whether the system degenerates more often than the frozen model on the same requests (pairs in order):
    ``worse`` requests degenerate for the system only, ``better`` for the frozen model only, and ``p`` is the
    exact one-sided McNemar p-value of ``worse`` given the discordant pairs (a binomial tail at one half;
    1.0 without discordant pairs). A cell of 16 requests where the system loops on 2 more than the frozen model
    has p >= 0.25: read such a cell as a count, not as a difference shown."""
    if len(system) != len(frozen):
        raise ValueError(f"paired answers need equal lengths, got {len(system)} and {len(frozen)}")
    worse = sum(bool(s) and not bool(f) for s, f in zip(system, frozen, strict=True))
    better = sum(bool(f) and not bool(s) for s, f in zip(system, frozen, strict=True))
    n = worse + better
    p = sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n
    return {"worse": worse, "better": better, "p": p}
