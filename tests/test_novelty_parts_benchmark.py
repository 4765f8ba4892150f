"""``benchmarks/novelty_parts.py``: parts of responses, and the explained share on separable synthetic parts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import novelty_parts


def test_parts_are_windows_of_tokens_with_a_short_tail_dropped():
    states = [torch.arange(10.0)[:, None].repeat(1, 2)]  # 10 tokens [T, H=2]
    rows = novelty_parts.parts(states, 4)  # 0-3, 4-7; the tail 8-9 is half a window: kept
    assert rows[:, 0].tolist() == [1.5, 5.5, 8.5]
    assert novelty_parts.parts([torch.ones(3, 2)], 8).shape == (1, 2)  # a response shorter than a window: one part
    assert novelty_parts.parts(states, 8)[:, 0].tolist() == [3.5]  # the 2-token tail of 8 is dropped


def test_parts_of_two_known_skills_are_explained_and_a_new_skill_is_not():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6, dtype=torch.float64) * 4

    def cluster(i: int, n: int = 60) -> torch.Tensor:
        return centres[i] + 0.3 * torch.randn(n, 6, generator=g, dtype=torch.float64)

    known = {"a": (cluster(0), cluster(0)), "b": (cluster(1), cluster(1))}
    mixed = torch.cat([cluster(0, 30), cluster(1, 30)])
    unexplained, assigned = novelty_parts.explained(known, mixed)
    assert unexplained <= 0.15 and abs(assigned["a"] - 0.5) < 0.1 and abs(assigned["b"] - 0.5) < 0.1
    unexplained, _ = novelty_parts.explained(known, cluster(2))
    assert unexplained >= 0.9
