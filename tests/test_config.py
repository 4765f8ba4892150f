"""Config dataclasses reject bad values with messages that name the fix."""

from __future__ import annotations

import pytest

from dylora_moe import DyLoRAConfig, ExpertConfig, RouterConfig


@pytest.mark.parametrize("make, match", [
    (lambda: ExpertConfig(rank=0), "rank"),
    (lambda: ExpertConfig(target_modules="everything"), "attention, mlp, all-linear"),
    (lambda: ExpertConfig(rank_rule="magic"), "fixed, novelty"),
    (lambda: RouterConfig(top_k=0), "top_k"),
    (lambda: RouterConfig(granularity="token", route_layer=None), "route_layer"),
    (lambda: RouterConfig(route_pass="twice"), "inline, separate"),
    (lambda: RouterConfig(granularity="token", route_pass="separate"), "route_pass='inline'"),
    (lambda: DyLoRAConfig(mixing="loop"), "fused, reference"),
    (lambda: DyLoRAConfig.from_dict({"modle": "x"}), "modle"),
])
def test_bad_values_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_round_trip_through_dict():
    config = DyLoRAConfig(expert=ExpertConfig(rank=4), router=RouterConfig(top_k=2, route_layer=3))
    again = DyLoRAConfig.from_dict(config.to_dict())
    assert again == config
