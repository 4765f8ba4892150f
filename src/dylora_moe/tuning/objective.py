"""One trial: the stream run once with the trial's parameters, scored on held-out data.

A trial is the benchmark's ``dylora`` method (``evaluation/benchmark.run_method``) without its decoding
scores: after every stream step the learner evaluates every skill seen so far on that skill's held-out
examples (``SkillSpec.eval_share``, split by content hash, never trained on), filling the loss matrix. The
objective is computed from that matrix only:

- ``weighted``: mean final held-out loss + ``forgetting_weight`` * average forgetting (nats; positive when a
  skill's loss rose after it was learned; over the skills not trained again later, as in the benchmark);
- ``pareto``: (mean final loss, forgetting, trainable parameters), minimised together.

After every step the same quantity on the skills seen so far goes to the trial's pruner.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna

from ..data.stream import StreamSpec
from ..evaluation.benchmark import BenchmarkConfig, results_from, run_method
from ..evaluation.metrics import average_accuracy, forgetting
from .params import apply_params, build_configs
from .space import TuneConfig
from .study import claim

logger = logging.getLogger(__name__)

NO_DECODING = BenchmarkConfig(pass_limit=0, humaneval_limit=0, freeform_limit=0)


def metrics_of(matrix: Sequence[Sequence[float | None]], trainable_params: int = 0,
               labels: Sequence[str] | None = None) -> dict[str, float]:
    """Loss (mean final held-out loss over the skills seen), forgetting (nats) and size of a run's loss matrix
    after ``len(matrix)`` steps (row i: losses after step i; cells of skills not yet seen are ignored). With the
    steps' ``labels``, forgetting reads the skills not trained again later, as the benchmark's does (a returning
    skill's relearning is not a lack of forgetting)."""
    square = [list(row[: len(matrix)]) for row in matrix]  # T x T: skills seen so far
    seen = None if labels is None else list(labels[: len(square)])
    return {"loss": average_accuracy(square), "forgetting": forgetting(square, higher_is_better=False, labels=seen),
            "trainable_params": float(trainable_params)}


def objective_values(metrics: dict[str, float], config: TuneConfig) -> float | tuple[float, ...]:
    """What Optuna minimises: the weighted sum, or the Pareto metrics."""
    if config.multi:
        return tuple(metrics[k] for k in ("loss", "forgetting", "trainable_params"))
    return weighted(metrics, config.forgetting_weight)


def weighted(metrics: dict[str, float], forgetting_weight: float) -> float:
    return metrics["loss"] + forgetting_weight * metrics["forgetting"]


def run_configuration(stream: StreamSpec, params: dict[str, Any], out: Path, *, data_dir: str | Path | None,
                      after_skill: Callable | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run ``stream`` with ``params`` (dotted names) over its own sections; the metrics, the loss matrix and
    the time. Shared by the trials and by confirmation runs on other streams."""
    system, training = build_configs(*apply_params(stream.system, stream.training, params))
    training.report_to = ["none"]
    start = time.perf_counter()
    raw = run_method("dylora", stream, system, training, out, data_dir=data_dir, bench=NO_DECODING,
                     progress=progress, after_skill=after_skill, evaluate_ahead=False)
    result = results_from({"dylora": raw}, stream=stream.name, model=system.model)["methods"]["dylora"]
    metrics = metrics_of(raw["matrix"], raw["trainable_params"], raw["labels"])
    return {**metrics, "matrix": raw["matrix"], "experts": raw["experts"], "novel": raw["novel"],
            "bwt": result["bwt"], "routing_accuracy": result["routing_accuracy"],
            "seconds": time.perf_counter() - start}


class Objective:
    """``study.optimize``'s callable: suggests the trial's parameters, runs the stream, reports after each step.

    Args:
        stream: the stream tuned on (its ``system``/``training`` sections are the base the parameters overlay).
        config: search space and objective.
        out: per-trial Trainer logs go to ``out/trials/N``.
        data_dir: datasets folder of builtin sources.
        progress: receives one line per stream step of a trial.
    """

    def __init__(self, stream: StreamSpec, config: TuneConfig, out: Path, *, data_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.stream, self.config, self.out, self.data_dir = stream, config, Path(out), data_dir
        self.progress = progress or (lambda msg: logger.info(msg))

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        gc.collect()  # the previous trial's model (a pruned one is still referenced by its traceback) goes first
        claim(trial)
        params = {spec.name: spec.suggest(trial) for spec in self.config.params}
        steps = len(self.stream.active(self.data_dir))
        result = run_configuration(self.stream, params, self.out / "trials" / str(trial.number),
                                   data_dir=self.data_dir, after_skill=self.pruning_hook(trial, steps),
                                   progress=lambda msg: self.progress(f"trial {trial.number}: {msg}"))
        for key in ("loss", "forgetting", "trainable_params", "bwt", "routing_accuracy", "experts", "matrix",
                    "seconds"):
            trial.set_user_attr(key, result[key])
        values = objective_values(result, self.config)
        if not all(math.isfinite(v) for v in (values if isinstance(values, tuple) else (values,))):
            raise optuna.TrialPruned("the held-out loss is not finite")
        return values

    def pruning_hook(self, trial: optuna.Trial, steps: int) -> Callable:
        """After each stream step: report the objective on the skills seen so far; stop a trial the pruner
        judges bad (never after the last step: the trial is complete then). Multi-objective studies cannot
        prune in Optuna, so nothing is reported there."""

        rows: list[list[float | None]] = []
        labels = [skill.label for skill in self.stream.active(self.data_dir)]

        def after_skill(i: int, record) -> None:
            rows.append(record.losses)
            if self.config.multi:
                return
            value = weighted(metrics_of(rows, labels=labels), self.config.forgetting_weight)
            trial.report(value, step=i)
            if i < steps - 1 and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after step {i + 1} of {steps} at {value:.4f}")

        return after_skill
