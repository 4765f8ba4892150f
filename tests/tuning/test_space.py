"""The `tune:` section: search-space parsing with defaults, clear errors, dotted parameters, the pure objective."""

from __future__ import annotations

import math

import optuna
import pytest

from dylora_moe.data.stream import load_stream
from dylora_moe.tuning.objective import metrics_of, objective_values
from dylora_moe.tuning.params import apply_params, defaults, load_params
from dylora_moe.tuning.space import DEFAULT_SPACE, TuneConfig, baseline_params, parse_tune


def test_defaults_when_absent():
    config = parse_tune(None)
    assert config.objective == "weighted" and config.forgetting_weight == 1.0 and config.pruner == "median"
    assert [p.name for p in config.params] == list(DEFAULT_SPACE)
    assert config.directions == ["minimize"]


def test_ranges_choices_and_yaml_number_strings():
    config = parse_tune({"objective": "pareto", "params": {
        "training.seed_lr": {"low": "1e-4", "high": "1e-2", "log": True},  # YAML reads 1e-4 as a string
        "training.seed_steps": {"low": 2, "high": 8, "step": 2},
        "system.expert.rank": [4, 8],
        "system.expert.target_modules": {"choices": ["attention", "mlp"]},
    }})
    lr, steps, rank, targets = (p.distribution() for p in config.params)
    assert lr == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert steps == optuna.distributions.IntDistribution(2, 8, step=2)  # an int field gets integers
    assert rank == optuna.distributions.CategoricalDistribution([4, 8])
    assert targets.choices == ("attention", "mlp")
    assert config.directions == ["minimize"] * 3



def test_an_integer_field_whose_default_is_none_gets_whole_numbers():
    config = parse_tune({"sampler": "random", "params": {"system.max_experts": {"low": 2, "high": 8}}})
    assert config.params[0].distribution() == optuna.distributions.IntDistribution(2, 8)  # `int | None`, not a float
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    assert type(config.params[0].suggest(trial)) is int
    with pytest.raises(ValueError, match="offload_device: is not numeric"):  # `str | None`: no range
        parse_tune({"params": {"system.expert.offload_device": {"low": 0, "high": 1}}})


@pytest.mark.parametrize("section, match", [
    ({"params": {"training.seed_rate": {"low": 1, "high": 2}}}, "unknown parameter 'training.seed_rate'.*seed_lr"),
    ({"params": {"seed_lr": {"low": 1e-4, "high": 1e-2}}}, "did you mean training.seed_lr"),
    ({"params": {"training.seed_lr": {"low": 1e-2, "high": 1e-4}}}, r"low \(0.01\) must be below high"),
    ({"params": {"training.kl_weight": {"low": 0.0, "high": 1.0, "log": True}}}, "log scale needs low > 0"),
    ({"params": {"training.seed_steps": {"low": 1.5, "high": 4}}}, "integer parameter"),
    ({"params": {"training.seed_lr": {"low": 1e-4}}}, "needs both low and high"),
    ({"params": {"training.seed_lr": {"low": "small", "high": 1}}}, "low must be a number"),
    ({"params": {"training.seed_lr": {"low": 1e-4, "high": 1e-2, "scale": "log"}}}, "unknown key.*scale"),
    ({"params": {"system.expert.rank": []}}, "non-empty list"),
    ({"params": {"system.expert.rank": {"choices": [4], "low": 1}}}, "either choices or low/high"),
    ({"params": {"system.expert.target_modules": {"low": 1, "high": 2}}}, "not numeric.*list of choices"),
    ({"params": {"system.expert.rank": {"low": 0, "high": 8}}}, "system.expert.rank: 0 is not a valid value"),
    ({"params": {"system.expert.dropout": [0.1, 1.5]}}, "dropout.*1.5 is not a valid value"),
    ({"params": {"system.model": ["a", "b"]}}, "unknown parameter 'system.model'"),
    ({"params": ["training.seed_lr"]}, "must be a mapping"),
    ({"objective": "accuracy"}, "objective='accuracy' is not supported; choose one of weighted, pareto"),
    ({"pruner": "asha"}, "choose one of median, percentile, hyperband, none"),
    ({"forgetting_weight": -1}, "forgetting_weight must be >= 0"),
    ({"forgetting_weight": "much"}, "forgetting_weight must be a number"),
    ({"startup_trials": 2.5}, "startup_trials must be a whole number"),
    ({"baseline": "yes"}, "baseline must be true or false"),
    ({"params": {"training.seed_lr": {"low": 1e-4, "high": 1e-2, "log": "false"}}}, "log must be true or false"),
    ({"trials": 8}, "unknown tune key.*trials; allowed"),
    ({"params": {"training.seed": [0, 1, 2]}}, "training.seed: a seed is not searched"),
])
def test_bad_sections_are_named(section, match):
    with pytest.raises(ValueError, match=match):
        parse_tune(section)


def test_a_bad_value_of_the_stream_itself_is_blamed_on_the_stream_not_on_the_tuned_range():
    section = {"params": {"training.seed_lr": {"low": 1e-4, "high": 1e-2}}}
    with pytest.raises(ValueError, match=r"stream's own system/training sections.*dropout") as err:
        parse_tune(section, {"expert": {"dropout": 1.5}}, {})
    assert "tune.params" not in str(err.value)
    with pytest.raises(ValueError, match=r"stream's own system/training sections.*batch_size"):
        parse_tune(section, {}, {"batch_size": 0})
    # a stream that only the tuned values make valid is still accepted (each end of the range is valid)
    wide = {"params": {"system.expert.max_rank": {"low": 48, "high": 64}}, "baseline": False}
    assert parse_tune(wide, {"expert": {"rank": 48}}, {}).params[0].name == "system.expert.max_rank"


def test_baseline_takes_the_streams_own_values_then_the_defaults():
    config = parse_tune({"params": {"training.seed_lr": {"low": 1e-4, "high": 1e-2}, "system.expert.rank": [4, 8],
                                    "system.router.temperature": {"low": 0.5, "high": 2.0}}})
    values = baseline_params(config, {"expert": {"rank": 4}}, {"seed_lr": 5e-3})
    assert values == {"training.seed_lr": 5e-3, "system.expert.rank": 4, "system.router.temperature": 1.0}
    with pytest.raises(ValueError, match=r"own value 16 is not among the choices.*tune.baseline: false"):
        baseline_params(config, {"expert": {"rank": 16}}, {})


def test_a_baseline_without_a_number_for_a_range_is_refused_with_the_fix():
    config = parse_tune({"params": {"system.router.cumulative_weight": {"low": 0.5, "high": 1.0}}})
    with pytest.raises(ValueError, match=r"cumulative_weight: the stream's own value None is not a number of the "
                                         r"range 0.5..1.0; set system.router.cumulative_weight.*tune.baseline: false"):
        baseline_params(config, {}, {})  # the library default is None: not a trial Optuna can run
    assert baseline_params(config, {"router": {"cumulative_weight": 0.9}}, {}) == {
        "system.router.cumulative_weight": 0.9}

def test_apply_params_sets_nested_values_without_touching_the_input():
    system, training = {"expert": {"dropout": 0.0}}, {"seed_steps": 2}
    new_system, new_training = apply_params(system, training, {"system.expert.rank": 16, "training.seed_lr": 0.01,
                                                                "system.router.top_k": 2})
    assert new_system == {"expert": {"dropout": 0.0, "rank": 16}, "router": {"top_k": 2}}
    assert new_training == {"seed_steps": 2, "seed_lr": 0.01}
    assert system == {"expert": {"dropout": 0.0}} and training == {"seed_steps": 2}
    assert "training.report_to" not in defaults() and defaults()["system.novelty.granularity"] == 0.25


def test_params_files_and_streams_carrying_params(tmp_path):
    (tmp_path / "best.yaml").write_text("params:\n  training.seed_lr: 0.004\n  system.expert.rank: 16\n")
    assert load_params(tmp_path / "best.yaml") == {"training.seed_lr": 0.004, "system.expert.rank": 16}
    (tmp_path / "plain.yaml").write_text("training: {seed_lr: 0.004}\n")
    with pytest.raises(ValueError, match=r"no `params:` mapping.*best.yaml"):
        load_params(tmp_path / "plain.yaml")
    (tmp_path / "broken.yaml").write_text("params:\n  training.seed_lr: [0.004\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML"):
        load_params(tmp_path / "broken.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00params")
    with pytest.raises(ValueError, match=r"binary.yaml is not a UTF-8 text file"):
        load_params(tmp_path / "binary.yaml")
    (tmp_path / "typo.yaml").write_text("params: {training.seed_lrr: 0.004}\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown parameter 'training.seed_lrr'"):
        load_params(tmp_path / "typo.yaml")
    (tmp_path / "s.yaml").write_text("""
training: {seed_lr: 0.001, seed_steps: 2}
params: {training.seed_lr: 0.004, system.expert.rank: 16}
tune: {params: {training.seed_lr: [0.001, 0.004]}}
skills:
  - {name: a, source: {type: builtin, name: humaneval}}
""")
    stream = load_stream(tmp_path / "s.yaml")  # params win over the sections they belong to
    assert stream.training == {"seed_lr": 0.004, "seed_steps": 2} and stream.system == {"expert": {"rank": 16}}
    assert stream.tune == {"params": {"training.seed_lr": [0.001, 0.004]}}


def test_objective_from_a_hand_built_loss_matrix():
    # after step 0: skill 0 at 1.0; after step 1: skill 0 rose to 1.5 (forgot 0.5), skill 1 at 2.0
    matrix = [[1.0, None], [1.5, 2.0]]
    m = metrics_of(matrix, trainable_params=1000)
    assert m == {"loss": 1.75, "forgetting": 0.5, "trainable_params": 1000.0}
    assert objective_values(m, TuneConfig(forgetting_weight=2.0)) == pytest.approx(2.75)
    assert objective_values(m, TuneConfig(objective="pareto")) == (1.75, 0.5, 1000.0)
    assert metrics_of([[1.2, None]])["loss"] == 1.2 and metrics_of([[1.2, None]])["forgetting"] == 0.0
    improved = metrics_of([[1.0, None], [0.8, 2.0]])  # a later step helped skill 0: negative forgetting
    assert math.isclose(improved["forgetting"], -0.2)


def test_the_objective_does_not_count_a_returning_skills_relearning_as_retention():
    """Stream a, b, a: a's first column rose when b trained and fell when a came back; that fall is relearning.
    With the labels (as the benchmark reads them) forgetting is b's rise alone; the pruner's partial matrices
    read the labels of the steps seen so far."""
    matrix = [[1.0, None, None], [1.5, 2.0, None], [0.9, 2.3, 0.9]]
    assert math.isclose(metrics_of(matrix)["forgetting"], (-0.1 + 0.3) / 2)
    assert math.isclose(metrics_of(matrix, labels=["a", "b", "a"])["forgetting"], 0.3)
    assert math.isclose(metrics_of(matrix[:2], labels=["a", "b", "a"])["forgetting"], 0.5)
