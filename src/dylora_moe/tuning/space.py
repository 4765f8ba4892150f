"""The ``tune:`` section of a stream file: search space, objective, sampler and pruner, with defaults.

    tune:
      objective: weighted            # mean final held-out loss + forgetting_weight * forgetting
      forgetting_weight: 1.0
      pruner: median                 # median | percentile | hyperband | none
      params:                        # absent: DEFAULT_SPACE
        training.seed_lr: {low: 3.0e-4, high: 1.0e-2, log: true}
        training.seed_steps: {low: 2, high: 8, step: 2}
        system.expert.rank: [4, 8, 16]          # a list is a categorical choice
        system.expert.target_modules: {choices: [attention, mlp]}

Ranges are Optuna's distributions: ``low``/``high`` (both included), ``log`` for a log scale, ``step`` for a
grid; ``choices`` (or a bare list) for a categorical. Integer parameters (a field declared ``int``, or
``int | None``) get an integer distribution. Every problem is reported with the parameter's name and how to fix it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import optuna

from .params import apply_params, build_configs, check_name, defaults, get_value, number_kind

OBJECTIVES = ("weighted", "pareto")
# Names a params file may set but a search may not draw: searching them selects a lucky draw, not a configuration.
NOT_SEARCHED = {"training.seed": "a seed is not searched (the best of several seeds is luck, not a better "
                                 "configuration); set it in the stream, and confirm tuned values under another seed "
                                 "with benchmarks/tune_confirm.py --seed"}
PARETO_METRICS = ("loss", "forgetting", "trainable_params")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "hyperband", "none")

# Knobs whose best value depends on the backbone and the data, at the same compute per trial (step counts and
# sequence lengths are left out: more of them lowers the loss at a higher cost, which a loss objective cannot
# weigh; add them to `params` to tune them).
DEFAULT_SPACE: dict[str, Any] = {
    "training.seed_lr": {"low": 3e-4, "high": 1e-2, "log": True},
    "training.consolidation_lr": {"low": 5e-5, "high": 2e-3, "log": True},
    "training.kl_weight": {"low": 0.0, "high": 2.0},
    "training.rehearsal_weight": {"low": 0.0, "high": 2.0},
    "system.expert.rank": [4, 8, 16],
    "system.expert.alpha": [8.0, 16.0, 32.0],
    "system.expert.target_modules": ["attention", "mlp", "all-linear"],
    "system.router.temperature": {"low": 0.5, "high": 2.0, "log": True},
    "system.novelty.granularity": {"low": 0.05, "high": 1.0, "log": True},
}


@dataclass
class ParamSpec:
    """One dimension of the search space.

    Args:
        name: dotted parameter name (``training.seed_lr``, ``system.expert.rank``).
        low, high: range of a numeric parameter, both ends included.
        log: sample on a log scale (``low`` must be > 0).
        step: grid step of a numeric parameter (not with ``log``).
        choices: values of a categorical parameter (instead of ``low``/``high``).
        integer: draw integers (set from the field's declared type).
    """

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    integer: bool = False

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter through the trial's own ``suggest_*`` (the sampler sees the distribution)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)


@dataclass
class TuneConfig:
    """How ``dylora tune`` searches.

    Args:
        objective: ``weighted`` minimises mean final held-out loss + ``forgetting_weight`` * forgetting;
            ``pareto`` minimises (loss, forgetting, trainable_params) together and reports the Pareto front.
        forgetting_weight: weight of average forgetting (nats, ``evaluation/metrics.forgetting``) in ``weighted``;
            also ranks the Pareto front when one trial must be written to ``best.yaml``.
        sampler: ``tpe`` (Optuna's default, multi-objective too) or ``random``.
        pruner: ``median``, ``percentile`` (the 25th), ``hyperband`` or ``none``. Pruners read the objective on
            the skills seen so far after every stream step; Optuna prunes single-objective studies only.
        startup_trials: trials drawn at random before the sampler models the results, and finished before
            the pruner compares against them.
        seed: sampler seed.
        baseline: run the stream's own configuration as a trial first (the comparison the report makes).
        heartbeat_seconds: a running trial writes a heartbeat this often; one silent for twice as long (its
            process was killed) is marked failed and run again with the same parameters by the next process.
        params: the search space (``DEFAULT_SPACE`` when empty).
    """

    objective: str = field(default="weighted", metadata={"help": "weighted | pareto"})
    forgetting_weight: float = field(default=1.0, metadata={"help": "weight of forgetting in the weighted objective"})
    sampler: str = field(default="tpe", metadata={"help": "tpe | random"})
    pruner: str = field(default="median", metadata={"help": "median | percentile | hyperband | none"})
    startup_trials: int = field(default=3, metadata={"help": "random trials before sampler and pruner act"})
    seed: int = field(default=0, metadata={"help": "sampler seed"})
    baseline: bool = field(default=True, metadata={"help": "run the stream's own configuration first"})
    heartbeat_seconds: int = field(default=60, metadata={"help": "heartbeat interval of running trials"})
    params: list[ParamSpec] = field(default_factory=list, metadata={"help": "search space"})

    def __post_init__(self) -> None:
        for name, value, allowed in (("objective", self.objective, OBJECTIVES), ("sampler", self.sampler, SAMPLERS),
                                     ("pruner", self.pruner, PRUNERS)):
            if value not in allowed:
                raise ValueError(f"tune.{name}={value!r} is not supported; choose one of {', '.join(allowed)}")
        self.forgetting_weight = number(self.forgetting_weight, "tune.forgetting_weight")
        if self.forgetting_weight is None:
            raise ValueError("tune.forgetting_weight must be a number (0 leaves forgetting out)")
        for name in ("startup_trials", "seed", "heartbeat_seconds"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"tune.{name} must be a whole number, got {getattr(self, name)!r}")
        if not isinstance(self.baseline, bool):
            raise ValueError(f"tune.baseline must be true or false, got {self.baseline!r}")
        if self.forgetting_weight < 0:
            raise ValueError(f"tune.forgetting_weight must be >= 0, got {self.forgetting_weight}")
        if self.startup_trials < 0 or self.heartbeat_seconds < 1:
            raise ValueError("tune.startup_trials must be >= 0 and tune.heartbeat_seconds >= 1")
        if not self.params:
            self.params = parse_space(DEFAULT_SPACE)

    @property
    def multi(self) -> bool:
        return self.objective == "pareto"

    @property
    def directions(self) -> list[str]:
        return ["minimize"] * (len(PARETO_METRICS) if self.multi else 1)


def parse_tune(section: dict[str, Any] | None, system: dict[str, Any] | None = None,
               training: dict[str, Any] | None = None) -> TuneConfig:
    """A ``TuneConfig`` from a stream's ``tune:`` section; with the stream's ``system``/``training`` sections
    every range end is also checked against the config's own validation."""
    section = dict(section or {})
    known = {f.name for f in fields(TuneConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown tune key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    if "params" in section and not isinstance(section["params"], dict):
        raise ValueError("tune.params must be a mapping of parameter name -> range or list of choices")
    section["params"] = parse_space(section.get("params") or {})
    config = TuneConfig(**section)
    for spec in config.params:
        check_values(spec, system or {}, training or {})
    return config


def parse_space(space: dict[str, Any]) -> list[ParamSpec]:
    return [parse_param(name, raw) for name, raw in space.items()]


def parse_param(name: str, raw: Any) -> ParamSpec:
    where = f"tune.params.{name}: "
    check_name(name)
    if name in NOT_SEARCHED:
        raise ValueError(f"{where}{NOT_SEARCHED[name]}")
    default = defaults()[name]
    if isinstance(raw, list):
        raw = {"choices": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}give a range {{low: .., high: ..}} or a list of choices, not {raw!r}")
    unknown = sorted(set(raw) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise ValueError(f"{where}unknown key(s) {', '.join(unknown)}; use low, high, log, step or choices")
    if "choices" in raw:
        if set(raw) != {"choices"}:
            raise ValueError(f"{where}give either choices or low/high, not both")
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}choices must be a non-empty list")
        if not all(c is None or isinstance(c, str | int | float | bool) for c in choices):
            raise ValueError(f"{where}choices must be strings, numbers, booleans or null (Optuna stores them as such)")
        return ParamSpec(name, choices=choices)
    if "low" not in raw or "high" not in raw:
        raise ValueError(f"{where}a range needs both low and high (or give a list of choices)")
    kind = number_kind(name)
    if kind is None:
        raise ValueError(f"{where}is not numeric (default {default!r}): give a list of choices")
    integer = kind is int
    low, high, step = (number(raw.get(k), where + k) for k in ("low", "high", "step"))
    if integer and any(v is not None and v != int(v) for v in (low, high, step)):
        raise ValueError(f"{where}is an integer parameter: low, high and step must be whole numbers")
    log = raw.get("log", False)
    if not isinstance(log, bool):  # a quoted "false" is a non-empty string: bool() would turn the log scale on
        raise ValueError(f"{where}log must be true or false (unquoted), got {log!r}")
    if not low < high:
        raise ValueError(f"{where}low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"{where}a log scale needs low > 0 (got {low}); drop log or raise low")
    if step is not None and (step <= 0 or log):
        raise ValueError(f"{where}step must be > 0 and cannot be combined with log")
    return ParamSpec(name, low, high, log, step, integer=integer)


def number(value: Any, where: str) -> float | None:
    """YAML reads ``1e-4`` (no dot) as a string: accept it, reject what is not a number."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return out


def check_values(spec: ParamSpec, system: dict[str, Any], training: dict[str, Any]) -> None:
    """Each end of a range (each choice) must give a valid configuration on its own: rank 0 or a negative
    dropout fails here, naming the parameter, not in the middle of a study."""
    ends = spec.choices if spec.choices is not None else [spec.low, spec.high]
    for value in ends:
        value = int(value) if spec.integer else value
        try:
            build_configs(*apply_params(system, training, {spec.name: value}))
        except (TypeError, ValueError) as err:
            try:  # a bad value of the stream itself is the stream's, not every tuned range's
                build_configs(system, training)
            except (TypeError, ValueError) as own:
                raise ValueError(f"the stream's own system/training sections are not valid ({own}); fix the "
                                 "stream file before tuning") from own
            raise ValueError(f"tune.params.{spec.name}: {value!r} is not a valid value ({err}); "
                             "narrow the range or change the choices") from err


def baseline_params(config: TuneConfig, system: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The stream's own value of every tuned parameter (its section's, else the library default): the baseline
    trial. A value outside a categorical's choices, or that is not a number for a range (``None``, the default
    of ``system.max_experts``), cannot be a trial and is reported."""
    values = {spec.name: get_value(system, training, spec.name) for spec in config.params}
    for spec in config.params:
        value = values[spec.name]
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"tune.params.{spec.name}: the stream's own value {value!r} is not among the choices "
                             f"{spec.choices}; add it, or set tune.baseline: false")
        if spec.choices is None and (isinstance(value, bool) or number(value, spec.name) is None):
            raise ValueError(f"tune.params.{spec.name}: the stream's own value {value!r} is not a number of the "
                             f"range {spec.low}..{spec.high}; set {spec.name} in the stream, give the parameter a "
                             "list of choices that includes it, or set tune.baseline: false")
    return values
