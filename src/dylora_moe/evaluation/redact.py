"""Keeping datasets' text out of results: a model's answer often repeats its request (or a memorised reference)
word for word, and results store answers. ``CopyFilter`` replaces every stretch of an answer that repeats
``n`` or more consecutive words of a source text with one marker, and keeps everything else, whitespace included
(a degenerate answer's newlines and loops stay visible).

Words are maximal runs of non-space characters, compared without case and without punctuation at their ends
(``"dir1",`` matches ``dir1``); a word that is all punctuation (```` ``` ````, ``-``) is compared as it is.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

WORD = re.compile(r"\S+")
MARK = "[...]"


def words(text: str) -> list[str]:
    """``text``'s words, normalised for comparison."""
    return [_norm(m.group()) for m in WORD.finditer(text)]


def _norm(word: str) -> str:
    return word.strip(string.punctuation).lower() or word


@dataclass(frozen=True)
class CopyFilter:
    """Every ``n``-word sequence of the sources; calling it on a text redacts the stretches that repeat one."""

    grams: frozenset[tuple[str, ...]]
    n: int = 5

    @classmethod
    def of(cls, sources: Iterable[str], n: int = 5) -> CopyFilter:
        if n < 1:
            raise ValueError(f"CopyFilter needs n >= 1 words, got {n}")
        grams = set()
        for source in sources:
            w = words(source)
            grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
        return cls(frozenset(grams), n)

    def __call__(self, text: str) -> str:
        found = list(WORD.finditer(text))
        norms = [_norm(m.group()) for m in found]
        copied = [False] * len(found)
        for i in range(len(found) - self.n + 1):
            if tuple(norms[i : i + self.n]) in self.grams:
                copied[i : i + self.n] = [True] * self.n
        out, last, i = [], 0, 0
        while i < len(found):
            if not copied[i]:
                i += 1
                continue
            j = i
            while j + 1 < len(found) and copied[j + 1]:
                j += 1
            out += [text[last : found[i].start()], MARK]
            last, i = found[j].end(), j + 1
        return "".join(out) + text[last:]
