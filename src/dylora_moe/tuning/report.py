"""What ``dylora tune`` leaves in its folder: ``tune-report.md``, ``tune.json``, plots and ``best.yaml``.

The plots are Optuna's own (``optuna.visualization.matplotlib``): optimisation history, parameter
importances (``optuna.importance``, default evaluator) and, for a Pareto study, the front.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from ..checkpoint import write_text_atomic
from ..data.stream import StreamSpec, with_params
from .space import TuneConfig
from .study import baseline_trial, best_trial

logger = logging.getLogger(__name__)


# below this many complete trials importances are an artefact of the evaluator (one trial: all equal)
MIN_TRIALS_FOR_IMPORTANCES = 3


def complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def importances(study: optuna.Study, config: TuneConfig) -> dict[str, float]:
    """Parameter importances on the (weighted) objective; empty when the study is too small to tell."""
    if complete(study) < MIN_TRIALS_FOR_IMPORTANCES:
        return {}
    target = None if not config.multi else (lambda t: t.values[0] + config.forgetting_weight * t.values[1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, target=target))
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        logger.warning("no parameter importances: %s", err)
        return {}


def write_plots(study: optuna.Study, config: TuneConfig, out: Path) -> list[str]:
    """PNG plots; each is skipped (with a log line) when the study cannot draw it yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    target = None if not config.multi else (lambda t: t.values[0] + config.forgetting_weight * t.values[1])
    name = "objective" if not config.multi else f"loss + {config.forgetting_weight} x forgetting"
    plots = {"history.png": lambda: oplt.plot_optimization_history(study, target=target, target_name=name),
             "importances.png": lambda: oplt.plot_param_importances(study, target=target, target_name=name)}
    if complete(study) < MIN_TRIALS_FOR_IMPORTANCES:
        del plots["importances.png"]
    if config.multi:
        plots["pareto.png"] = lambda: oplt.plot_pareto_front(study, target_names=["loss", "forgetting", "params"])
    written = []
    for file, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            tmp = out / f".{file}.tmp-{os.getpid()}.png"  # several workers may write one report
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, out / file)
            plt.close(fig)
            written.append(file)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as err:
            logger.warning("%s not drawn: %s", file, err)
    return written


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    return {"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
            "baseline": bool(t.user_attrs.get("baseline")), "retry_of": t.system_attrs.get("failed_trial"),
            **{k: t.user_attrs.get(k) for k in ("loss", "forgetting", "trainable_params", "experts", "matrix")},
            "seconds": t.duration.total_seconds() if t.duration is not None else None,
            "pruned_at_step": max(t.intermediate_values) if t.state == TrialState.PRUNED and t.intermediate_values
            else None}


def summary(study: optuna.Study, config: TuneConfig, *, stream: str, storage: str, command: str) -> dict:
    """``tune.json``: the study's settings, every trial, the best and the baseline trial, importances."""
    best, base = best_trial(study, config.forgetting_weight), baseline_trial(study)
    states = [t.state.name for t in study.trials]
    return {
        "study": study.study_name, "stream": stream, "storage": storage, "command": command,
        "objective": config.objective, "forgetting_weight": config.forgetting_weight,
        "directions": [d.name.lower() for d in study.directions], "sampler": config.sampler, "pruner": config.pruner,
        "space": {s.name: {"choices": s.choices} if s.choices is not None else
                  {"low": s.low, "high": s.high, "log": s.log, "step": s.step} for s in config.params},
        "states": {s: states.count(s) for s in sorted(set(states))},
        "best": trial_row(best) if best else None,
        "baseline": trial_row(base) if base else None,
        "pareto_front": [trial_row(t) for t in study.best_trials] if config.multi else None,
        "importances": importances(study, config),
        "trials": [trial_row(t) for t in study.trials],
        "seconds": sum(t.duration.total_seconds() for t in study.trials if t.duration is not None),
    }


def best_stream(stream: StreamSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The tuned stream with the best values written into its sections and listed under ``params``."""
    tuned = with_params(StreamSpec(**{**stream.to_dict(), "params": {}}), params).to_dict()
    tuned.pop("tune")
    return {k: tuned[k] for k in ("name", "params", "system", "training", "skills")}


def write(out: Path, study: optuna.Study, config: TuneConfig, stream: StreamSpec, *, storage: str,
          command: str) -> dict:
    """Write the report, JSON, plots and ``best.yaml`` (when a trial completed); returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    data = summary(study, config, stream=stream.name, storage=storage, command=command)
    # workers of one study may share --out: each file is replaced whole, never torn
    write_text_atomic(out / "tune.json", json.dumps(data, indent=2, default=str) + "\n")
    plots = write_plots(study, config, out) if data["best"] else []
    if data["best"]:
        header = (f"# Best configuration of study {study.study_name!r} (trial {data['best']['number']}), "
                  f"written by `dylora tune`.\n# Run it: dylora train --stream {out / 'best.yaml'} --out runs/best\n"
                  f"# Or apply only the tuned values to another stream: dylora train --stream S.yaml "
                  f"--params {out / 'best.yaml'} --out runs/x\n")
        body = yaml.safe_dump(best_stream(stream, data["best"]["params"]), sort_keys=False)
        write_text_atomic(out / "best.yaml", header + body)
    write_text_atomic(out / "tune-report.md", markdown(data, plots))
    return data


# ---------------------------------------------------------------- markdown
def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(data: dict, plots: list[str]) -> str:
    weight = data["forgetting_weight"]
    objective = (f"mean final held-out loss + {weight} x forgetting (nats), minimised"
                 if data["objective"] == "weighted"
                 else "(mean final held-out loss, forgetting, trainable parameters), minimised together")
    lines = [f"# Tuning: study `{data['study']}` on stream `{data['stream']}`", "",
             f"Command: `{data['command']}`", "",
             f"- objective: {objective}",
             "- data: every loss is measured on each skill's held-out examples (the stream's `eval_share`, split by "
             "content hash), which no trial trains on; the selection is made on them, so the best value is an "
             "optimistic estimate of that configuration: confirm it on other skills or slices before quoting it.",
             f"- sampler {data['sampler']}, pruner {data['pruner']}; trials: "
             + ", ".join(f"{n} {s.lower()}" for s, n in data["states"].items())
             + f"; {data['seconds'] / 60:.1f} min of trial time",
             f"- storage: `{data['storage']}` (study `{data['study']}`: rerun the command to resume or add trials)", ""]
    lines += best_section(data)
    if data["pareto_front"]:
        lines += ["## Pareto front", "", "| trial | loss | forgetting | trainable params | params |",
                  "|---|---|---|---|---|"]
        lines += [f"| {t['number']} | {fmt(t['values'][0])} | {fmt(t['values'][1])} | {int(t['values'][2]):,} | "
                  f"{short(t['params'])} |" for t in data["pareto_front"]]
        lines += [""]
    lines += ["## Parameter importances", ""]
    if data["importances"]:
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in data["importances"].items()]
        lines += ["", "Optuna's default evaluator on the complete trials. Few trials make these rough: read them as "
                  "where to look next, not as a ranking.", ""]
    else:
        lines += [f"Not computed: they need at least {MIN_TRIALS_FOR_IMPORTANCES} complete trials.", ""]
    lines += ["## Trials", "",
              "| trial | state | objective | loss | forgetting | trainable params | seconds | params |",
              "|---|---|---|---|---|---|---|---|"]
    for t in data["trials"]:
        value = fmt(t["values"][0]) if t["values"] and len(t["values"]) == 1 else fmt(t["values"])
        state = t["state"].lower() + (f" after step {t['pruned_at_step'] + 1}" if t["pruned_at_step"] is not None
                                      else "") + (" (baseline)" if t["baseline"] else "") \
            + (f" (retry of {t['retry_of']})" if t["retry_of"] is not None else "")
        lines.append(f"| {t['number']} | {state} | {value} | {fmt(t['loss'])} | {fmt(t['forgetting'])} | "
                     f"{count(t['trainable_params'])} | {count(t['seconds'])} | "
                     f"{short(t['params'])} |")
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def best_section(data: dict) -> list[str]:
    best, base = data["best"], data["baseline"]
    if not best:
        return ["No trial has completed yet.", ""]
    lines = ["## Best configuration", "",
             f"Trial {best['number']}: loss {fmt(best['loss'])}, forgetting {fmt(best['forgetting'])}, "
             f"{int(best['trainable_params'] or 0):,} trainable parameters"
             + (f"; objective {fmt(best['values'][0])}" if len(best["values"]) == 1 else "") + ".", ""]
    if base:
        weight = data["forgetting_weight"]
        b, o = (base["loss"] + weight * base["forgetting"], best["loss"] + weight * best["forgetting"])
        lines += [f"Baseline (the stream's own configuration, trial {base['number']}, same held-out data): loss "
                  f"{fmt(base['loss'])}, forgetting {fmt(base['forgetting'])}, objective {fmt(b)}; best minus "
                  f"baseline: {o - b:+.4f}.", ""]
    lines += ["| parameter | best | baseline |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v)} | {fmt(base['params'].get(k)) if base else ''} |" for k, v in best["params"].items()]
    return [*lines, "", "`best.yaml` holds these values (its `params:` section and the sections they belong to).", ""]


def count(value: float | None) -> str:
    """Whole numbers with thousands separators (parameters, seconds); blank when not measured."""
    return "" if value is None else f"{round(value):,}"


def short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in params.items())
