"""``benchmarks/novelty_losses.py``: the relative losses of one example, and the conformal explained share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import novelty_losses


def test_a_composed_example_is_explained_by_the_pair_whose_experts_each_win_their_half():
    frozen = torch.full((4,), 2.0)
    experts = {0: torch.tensor([0.5, 0.5, 2.0, 2.0]),  # knows the first half
               1: torch.tensor([2.0, 2.0, 1.0, 1.0]),  # knows the second half
               2: torch.tensor([1.2, 1.2, 1.2, 1.2])}  # a bit of everything: the best single expert
    stat = novelty_losses.relative(frozen, experts)
    assert stat["expert"] == 2 and stat["single"] == pytest.approx(0.6)
    assert stat["pair_experts"] == [0, 1] and stat["pair"] == pytest.approx(0.375)  # mean(0.5, 0.5, 1, 1) / 2
    assert stat["share"] == pytest.approx(0.5)


def test_one_expert_that_wins_every_token_is_its_own_pair():
    stat = novelty_losses.relative(torch.full((3,), 1.0), {0: torch.full((3,), 0.5), 1: torch.full((3,), 0.9)})
    assert stat["pair_experts"] == [0] and stat["pair"] == stat["single"] == pytest.approx(0.5)
    stat = novelty_losses.relative(torch.full((3,), 1.0), {4: torch.full((3,), 0.5)})  # one known expert
    assert stat["expert"] == 4 and stat["pair_experts"] == [4]


def test_explained_share_is_a_conformal_test_against_the_reference():
    reference = [0.1 * k for k in range(1, 20)]  # 0.1 .. 1.9: own-expert relative losses
    assert novelty_losses.explained_share(reference, [0.5, 1.0]) == 1.0
    # above every reference value: p = 1/20 = 0.05, not above the level; 1.85 is above one only: p = 2/20
    assert novelty_losses.explained_share(reference, [5.0, 1.85]) == 0.5
