"""Degenerate outputs: what a model writes when it has collapsed instead of answering.

A completion is degenerate when it is

- ``empty``: no characters at all;
- ``whitespace``: only spaces, tabs and newlines (the failure of an expert over-fitted to responses that start
  with a newline and tabs: it answers an ordinary request with a run of newlines);
- ``loop``: one unit repeated at least ``min_repeats`` times in a row, the run covering at least
  ``min_share`` of the completion (greedy decoding stuck in a cycle such as ``"a = a;\\n" * 20`` or
  ``"\\n\\t" * 40`` after a few words, or a whole sentence said over and over).

Ordinary code repeats short units too (indentation, ``0000``, a few similar lines), but not over half of
what it writes; the thresholds are set so that ordinary code pass and the collapsed answers of an
over-fitted Verilog expert (newlines, a newline-tab cycle) do not (both kinds are in the tests). A unit is as
long as four copies allow: capped at 64 characters (as it once was), the rule missed the loops of a
sentence or a paragraph, which is how the frozen model's answers collapse (``"I am using find command to find
files that match a pattern that is a substring of a pattern.\\n\\n"`` ten times), and so counted one
model's loops and not the other's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

KINDS = ("empty", "whitespace", "loop")


def repeated_run(text: str, *, max_unit: int | None = None, min_repeats: int = 4) -> tuple[int, str]:
    """Length and unit of the longest run of one unit repeated ``min_repeats``+ times back to back, measured in
    whole copies of the shortest unit that makes it up; ``(0, "")`` when no unit repeats that often. A unit may
    be as long as ``min_repeats`` copies allow (``max_unit`` caps it): a sentence of 90 characters said ten times
    is as much a loop as ``"a = a;\n"`` said twenty.

    Every period p is tried at once over the text: ``text[i] == text[i + p]`` along a stretch of r positions
    makes ``text[s:s + r + p]`` p-periodic, i.e. ``(r + p) // p`` copies of ``text[s:s + p]`` and a part of the
    next. The shortest period of a run counts it best (a multiple of it stops short of a run whose length is
    not a multiple of the multiple: nine copies of a 10-character line hold four copies of a 20-character unit,
    80 characters of the 90), so periods are tried from 1 up and a longer one is kept only when it runs further.
    """
    if not text:
        return 0, ""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
    longest = len(codes) // min_repeats
    if max_unit is not None:
        longest = min(longest, max_unit)
    best, unit = 0, ""
    for period in range(1, longest + 1):
        same = np.concatenate(([False], codes[:-period] == codes[period:], [False]))  # [N - p + 2]
        edges = np.flatnonzero(same[1:] != same[:-1])  # starts and ends of the stretches, alternately
        if not len(edges):
            continue
        starts, ends = edges[0::2], edges[1::2]
        k = int(np.argmax(ends - starts))
        copies = (int(ends[k] - starts[k]) + period) // period
        if copies >= min_repeats and copies * period > best:
            best, unit = copies * period, text[int(starts[k]):int(starts[k]) + period]
    return best, unit


def degenerate_kind(text: str, *, max_unit: int | None = None, min_repeats: int = 4,
                    min_share: float = 0.5) -> str | None:
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
