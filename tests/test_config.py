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


def test_config_values_are_type_checked_and_numbers_written_as_text_convert():
    from dylora_moe.training.config import TrainingConfig

    assert TrainingConfig(seed_lr="2e-3").seed_lr == 0.002  # PyYAML's reading of 2e-3
    assert DyLoRAConfig.from_dict({"expert": {"rank": "8"}}).expert.rank == 8
    assert DyLoRAConfig.from_dict({"router": {"route_layer": None}}).router.route_layer is None  # optional
    for bad, message in ((dict(seed_lr="fast"), "seed_lr must be a number"),
                         (dict(batch_size=2.5), "batch_size must be a whole number"),
                         (dict(packing="yes"), "packing must be true or false"),
                         (dict(batch_size=True), "batch_size must be a number")):
        with pytest.raises(ValueError, match=message):
            TrainingConfig(**bad)
    with pytest.raises(ValueError, match="unknown TrainingConfig field"):
        TrainingConfig.from_dict({"seed_lrr": 0.1})
    with pytest.raises(ValueError, match="model must be text"):
        DyLoRAConfig.from_dict({"model": 5})
    with pytest.raises(ValueError, match="not a device"):
        DyLoRAConfig(device="gpu")


@pytest.mark.parametrize("value", [None, 8, "cosine", ["rank"]])
def test_a_section_that_is_not_a_mapping_is_refused_with_its_name(value):
    """YAML reads an emptied ``router:`` as None: refused at once with the section named, not accepted and
    failing later as an AttributeError deep inside the model."""
    for section in ("expert", "router", "novelty"):
        with pytest.raises(ValueError, match=rf"DyLoRAConfig.{section} must be a mapping of \w+Config fields"):
            DyLoRAConfig.from_dict({section: value})


@pytest.mark.parametrize("make", [lambda: RouterConfig(temperature=float("nan")),
                                  lambda: DyLoRAConfig.from_dict({"router": {"temperature": "nan"}}),
                                  lambda: ExpertConfig(alpha="nan")])
def test_nan_is_refused_with_the_field_named(make):
    """NaN passes every range check (each comparison is false): refused where the type is checked."""
    with pytest.raises(ValueError, match=r"(RouterConfig.temperature|ExpertConfig.alpha) must be a number, got NaN"):
        make()


@pytest.mark.parametrize("bad, match", [
    (dict(rehearsal_per_skill=0), "rehearsal_per_skill must be >= 1"),
    (dict(rehearsal_per_skill=-4), "rehearsal_per_skill must be >= 1"),
    (dict(anchors_per_skill=-1), "anchors_per_skill must be >= 0"),
    (dict(router_fit_steps=-1), "router_fit_steps must be >= 0"),
    (dict(rehearsal_weight=-1.0), "rehearsal_weight must be >= 0"),
    (dict(balance_weight=-0.5), "balance_weight must be >= 0"),
    (dict(seed_lr=float("inf")), "seed_lr must be > 0 and finite"),
])
def test_training_counts_and_weights_out_of_range_are_refused(bad, match):
    """Values accepted before and failing later: no stored routing example crashed the first step on an empty
    feature batch, a slice by a negative count dropped examples from the end, a negative weight trained the gate
    away from the stored rows or towards collapse, an infinite rate made the weights NaN."""
    from dylora_moe.training.config import TrainingConfig

    with pytest.raises(ValueError, match=match):
        TrainingConfig(**bad)
    TrainingConfig(anchors_per_skill=0, router_fit_steps=0, rehearsal_weight=0.0, balance_weight=0.0)  # off
