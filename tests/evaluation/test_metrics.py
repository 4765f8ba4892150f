"""Metric functions on hand-built matrices with hand-computed answers."""

from __future__ import annotations

import math

import pytest

from dylora_moe.evaluation.metrics import bwt_loss, routing_accuracy, routing_entropy


def test_bwt_loss():
    matrix = [[1.0, None, None], [1.2, 2.0, None], [1.5, 1.9, 0.5]]
    # skill 0: 1.5 - 1.0 = 0.5; skill 1: 1.9 - 2.0 = -0.1 -> mean 0.2
    assert bwt_loss(matrix) == pytest.approx(0.2)
    assert bwt_loss([[3.0]]) == 0.0


def test_routing_entropy():
    assert routing_entropy([10, 0, 0]) == 0.0
    assert routing_entropy([1, 1]) == pytest.approx(math.log(2))
    assert routing_entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert routing_entropy([]) == 0.0


def test_routing_accuracy_pools_examples():
    assert routing_accuracy([9, 1], [10, 10]) == pytest.approx(0.5)
    assert routing_accuracy([], []) == 0.0
