"""In-loop measurement: routing entropy, and eval loss measured under the routing generation uses."""

from __future__ import annotations

import math

import pytest

from dylora_moe.training.measure import routing_entropy


def test_routing_entropy():
    assert routing_entropy([10, 0, 0]) == 0.0
    assert routing_entropy([1, 1]) == pytest.approx(math.log(2))
    assert routing_entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert routing_entropy([]) == 0.0
