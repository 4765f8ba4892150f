"""The continual-learning benchmark: every method of ``baselines.py`` on one stream, scored the same way.

``run_method`` trains one method through the stream and returns its raw measurements (the full loss matrix,
routing, novelty decisions, sizes, times, and greedy-decoding scores of the final system);
``results_from`` turns the raw measurements of all methods into the metrics of ``results.json``. The matrix
is the eval loss (nats) on every step's held-out examples after every step, the cells above the diagonal
included, so forward transfer is measured against the untrained model (``base``). With ``step_limit`` a second
matrix holds greedy-decoding scores after every step (``step_scores.py``; ROUGE-L for SuperNI), with the
papers' AP, forgetting, BWT and FWT computed on it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..backbone import cache_dir
from ..config import DyLoRAConfig
from ..data.sources import humaneval
from ..data.stream import StreamSpec
from ..model import DyLoRAMoE
from ..training.config import TrainingConfig
from ..training.loop import ContinualLearner, StepRecord
from ..training.measure import eval_loss, routing_entropy
from .baselines import LEARNERS, spec_reference
from .freeform import FrozenAnswers, evaluate_stream, trained_examples
from .generation import Checker, check_python_example, checker_for, score_examples
from .metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    max_transient_forgetting,
    novelty_scores,
)
from .step_scores import StepScorer, chain


@dataclass
class BenchmarkConfig:
    """Sizes of the benchmark beyond the stream's own.

    Args:
        pass_limit: held-out problems per step scored by greedy decoding on the final system (0: none).
        humaneval_limit: HumanEval problems for the retention score of the final system (0: none).
        freeform_limit: free-form requests per skill (``freeform.py``) asked the final system, with the
            frozen model's answers beside them (0: none).
        freeform_tokens: generation length of the free-form answers (default: each set's own, 96 tokens, 64
            for shell commands).
        step_limit: held-out examples per skill scored by greedy decoding after every step, filling the score
            matrix (0: no score matrix; the final scores then come from ``pass_limit``). With it, ``pass_limit``
            is the number scored after the last step.
        max_new_tokens: generation length of those scores (default: each skill's checker's, 50 for SuperNI).
        generation_batch: prompts per generation batch.
        spider_cache: where the Spider dev databases are converted to SQLite (default: under the package cache,
            ``$DYLORA_CACHE``; never inside a results folder, since they hold the dataset).
    """

    pass_limit: int = 16
    humaneval_limit: int = 40
    freeform_limit: int = 8
    freeform_tokens: int | None = None
    step_limit: int = 0
    max_new_tokens: int | None = None
    generation_batch: int = 16
    spider_cache: str = field(default_factory=lambda: str(cache_dir() / "spider-sqlite"))

    def __post_init__(self) -> None:
        if self.freeform_tokens is not None and self.freeform_tokens < 1:  # refused before any training
            raise ValueError(f"freeform_tokens must be >= 1 (or None for each set's own), got {self.freeform_tokens}")


def method_configs(name: str, system: DyLoRAConfig, training: TrainingConfig) -> tuple[DyLoRAConfig, TrainingConfig]:
    if name == "spec_reference":
        return spec_reference(system, training)
    return system, training


def run_method(name: str, stream: StreamSpec, system: DyLoRAConfig, training: TrainingConfig, out: Path, *,
               data_dir: str | Path | None = None, bench: BenchmarkConfig | None = None,
               progress: Callable[[str], None] | None = None, model: DyLoRAMoE | None = None,
               after_skill: Callable | None = None, evaluate_ahead: bool = True,
               partial: Callable[[dict], None] | None = None) -> dict:
    """Run one method and return its raw measurements (JSON-ready).

    ``after_skill(step, record)`` is the learner's hook (``dylora tune`` reports to its pruner there);
    ``evaluate_ahead=False`` skips the cells above the diagonal (forward transfer is then not measured);
    ``partial(raw)`` receives after every step what has been measured so far (the matrices' rows, the novelty
    decisions), so that a run stopped midway still leaves its measurements."""
    bench = bench or BenchmarkConfig()
    say = progress or (lambda msg: None)
    system, training = method_configs(name, system, training)
    model = model or DyLoRAMoE.from_config(system)
    model.eval()
    start = time.perf_counter()
    scorer = None
    if name == "base":
        learner = ContinualLearner(model, stream, training, out / "logs" / name, data_dir=data_dir)
        steps = [learner.prepare(skill) for skill in learner.skills]
        row = [eval_loss(model, s.eval_set, training.eval_batch_size) for s in steps]
        matrix = [list(row) for _ in steps]
        records: list[StepRecord] = []
        learner.steps = steps
        if bench.step_limit > 0:  # nothing changes between steps: one row of scores, after the "last" step
            say(f"{name}: scoring by greedy decoding")
            scorer = step_scorer(model, learner, data_dir, bench)
            scorer(len(steps) - 1)
            scorer.rows = [scorer.rows[-1]] * len(steps)
    else:
        learner = LEARNERS[name](model, stream, training, out / "logs" / name, data_dir=data_dir,
                                 evaluate_ahead=evaluate_ahead, after_skill=after_skill)
        if bench.step_limit > 0:
            scorer = step_scorer(model, learner, data_dir, bench)
        learner.after_skill = chain(scorer, after_skill, partial and (lambda i, rec: partial(
            partial_raw(name, learner, scorer, time.perf_counter() - start))))
        records = learner.run(lambda msg: say(f"{name}: {msg}"))
        matrix = [list(r.losses) for r in records]
    stream_seconds = time.perf_counter() - start
    if bench.pass_limit > 0 and scorer is None:
        say(f"{name}: scoring the final system by greedy decoding")
    skills = learner.skills
    raw = {
        "method": name,
        "skills": [s.name for s in skills],
        "labels": [s.label for s in skills],
        "matrix": matrix,
        "experts": model.num_experts,
        "trainable_params": trainable_params(model, learner),
        # training alone (gate fits and the expert's optimizer steps), and the whole pass with every evaluation
        "train_seconds": sum(r.train_seconds for r in records),
        "step_train_seconds": [r.train_seconds for r in records],
        "stream_seconds": stream_seconds if records else 0.0,
        "examples_evaluated": learner.examples_evaluated,  # loss-matrix examples run (the others reused)
        "novel": [r.novelty.is_novel for r in records],
        "expert_of_step": [r.novelty.expert_id for r in records],
        "final_routing": [{str(k): v for k, v in shares.items()} for shares in records[-1].routing] if records else [],
        "uses_router": bool(records) and learner.trains_router,
        "generation": scorer.final if scorer else final_generation(model, learner, data_dir, bench),
    }
    if scorer:
        raw["score_matrix"], raw["score_metric"] = scorer.rows, scorer.metric
    if bench.humaneval_limit > 0:
        raw["humaneval"] = humaneval_retention(model, bench)
    if bench.freeform_limit > 0:
        say(f"{name}: free-form requests")
        raw["freeform"] = freeform_scores(model, learner, data_dir, bench,
                                          FrozenAnswers(out / "frozen-answers", f"{system.model}:{system.dtype}"))
    raw["seconds"] = time.perf_counter() - start
    return raw


def partial_raw(name: str, learner: ContinualLearner, scorer: StepScorer | None, seconds: float) -> dict:
    """What a method has measured so far, after its latest step."""
    records = learner.records
    return {"method": name, "skills": [s.name for s in learner.skills], "steps_done": len(records),
            "seconds": seconds, "matrix": [list(r.losses) for r in records],
            "step_seconds": [r.train_seconds for r in records], "experts": learner.model.num_experts,
            "novel": [r.novelty.is_novel for r in records], "expert_of_step": [r.novelty.expert_id for r in records],
            "score_matrix": [list(row) for row in scorer.rows] if scorer else None}


def step_scorer(model: DyLoRAMoE, learner: ContinualLearner, data_dir, bench: BenchmarkConfig) -> StepScorer:
    return StepScorer(model, learner, limit=bench.step_limit, final_limit=max(bench.pass_limit, bench.step_limit),
                      max_new_tokens=bench.max_new_tokens, data_dir=data_dir, batch_size=bench.generation_batch,
                      cache=bench.spider_cache)


def trainable_params(model: DyLoRAMoE, learner: ContinualLearner) -> int:
    experts = sum(model.experts.num_parameters(e) for e in model.experts.expert_ids)
    router = sum(p.numel() for p in model.router.parameters()) if learner.trains_router and experts else 0
    return experts + router


def final_generation(model: DyLoRAMoE, learner: ContinualLearner, data_dir, bench: BenchmarkConfig) -> list[dict]:
    """Greedy-decoding score of the final system on the first ``pass_limit`` held-out examples of each step."""
    if bench.pass_limit <= 0:
        return []
    scores, checkers = [], {}
    for j, step in enumerate(learner.steps):
        source = step.skill.source
        key = (source.type, source.name, source.language)
        if key not in checkers:
            checkers[key] = checker_for(step.skill, data_dir=data_dir, cache=bench.spider_cache)
        checker: Checker = checkers[key]
        with learner.eval_routing(j):
            result = score_examples(model, step.held_out[: bench.pass_limit], checker,
                                    chat=step.skill.format.chat, batch_size=bench.generation_batch)
        scores.append({"skill": step.skill.name, "metric": result.metric, "checker": checker.name,
                       "score": result.score, "n": len(result.values)})
    return scores


def freeform_scores(model: DyLoRAMoE, learner: ContinualLearner, data_dir, bench: BenchmarkConfig,
                    frozen_answers: FrozenAnswers | None = None) -> list[dict]:
    """Free-form requests of every skill's domain, chat and raw, final system vs frozen model (the frozen
    model's answers shared by the methods of one benchmark through ``frozen_answers``)."""
    seen = trained_examples(learner.skills, data_dir)
    results = evaluate_stream(model, learner.skills, seen, data_dir=data_dir, limit=bench.freeform_limit,
                              batch_size=bench.generation_batch, spider_cache=bench.spider_cache,
                              max_new_tokens=bench.freeform_tokens, frozen_answers=frozen_answers)
    return [dataclasses.asdict(r) for r in results]


def humaneval_retention(model: DyLoRAMoE, bench: BenchmarkConfig) -> dict:
    """pass@1 (greedy) on the first ``humaneval_limit`` HumanEval problems: a pretrained ability no method
    trains on in a stream without HumanEval."""
    problems = humaneval()[: bench.humaneval_limit]
    result = score_examples(model, problems, Checker("python", check_python_example, max_new_tokens=256),
                            batch_size=bench.generation_batch)
    return {"metric": "pass@1", "score": result.score, "n": len(problems)}


# ---------------------------------------------------------------- metrics of all methods
def results_from(raw: dict[str, dict], *, stream: str, model: str) -> dict:
    """``results.json``: per method the matrix and ACC/BWT/FWT/forgetting in loss units (lower loss is better:
    ``acc`` is the mean final loss, negative ``bwt`` and positive ``forgetting`` mean forgetting; a skill that
    returns counts in BWT and forgetting at its last step and in FWT at its first, ``metrics.settled_steps``
    and ``first_steps``), routing
    accuracy, entropy and final routing shares where a gate routes, novelty precision/recall/F1 where a
    detector decides, and the generation scores. ``train_seconds`` is the time spent training (the expert's
    optimizer steps and the gate's fits, summed over steps), ``stream_seconds`` the wall time of the method's
    pass through the stream, the evaluation of every skill after every step included. Raw measurements from
    before the two were told apart carry only the latter, as ``train_seconds``: it becomes ``stream_seconds``
    and ``train_seconds`` is then unknown (``None``)."""
    base = raw.get("base")
    base_row = base["matrix"][0] if base else None
    methods = {}
    for name, r in raw.items():
        matrix, labels = r["matrix"], r.get("labels")
        entry = {
            "matrix": matrix,
            "metric": "loss",
            "acc": average_accuracy(matrix),
            "bwt": backward_transfer(matrix, higher_is_better=False, labels=labels),
            "max_transient_forgetting": max_transient_forgetting(matrix),
            "fwt": forward_transfer(matrix, base_row, higher_is_better=False, labels=labels) if base_row else None,
            "forgetting": forgetting(matrix, higher_is_better=False, labels=labels),
            "routing_accuracy": gate_routing_accuracy(r) if r.get("uses_router") else None,
            "routing_entropy": ([routing_entropy(list(shares.values())) for shares in r["final_routing"]]
                                if r.get("uses_router") else None),
            "experts": r["experts"],
            "trainable_params": r["trainable_params"],
            "train_seconds": r["train_seconds"] if "stream_seconds" in r else None,
            "stream_seconds": r.get("stream_seconds", r["train_seconds"]),
            "generation": r.get("generation", []),
            "generation_mean": mean_score(r.get("generation", [])),
            "humaneval": r.get("humaneval"),
            "freeform": r.get("freeform", []),
        }
        if r.get("novel") and r.get("uses_router"):  # the label baselines are told the truth: nothing to score
            entry["novelty"] = novelty_scores(r["novel"], r["labels"])
        if r.get("uses_router"):
            entry["final_routing"] = r["final_routing"]
            entry["novel"], entry["expert_of_step"] = r.get("novel", []), r.get("expert_of_step", [])
        if r.get("score_matrix"):
            entry["scores"] = score_metrics(r, base)
        methods[name] = entry
    skills = next(iter(raw.values()))["skills"] if raw else []
    labels = next(iter(raw.values()))["labels"] if raw else []
    return {"stream": stream, "model": model, "skills": skills, "labels": labels, "methods": methods}


def score_metrics(r: dict, base: dict | None) -> dict:
    """The papers' metrics on the greedy-decoding score matrix (higher is better): ``ap`` is the mean final
    score on the final examples (``pass_limit`` per skill, e.g. SuperNI's whole test split), ``acc`` the mean of
    the matrix's last row (``step_limit`` per skill); BWT, forgetting (drop from each skill's best earlier score)
    and FWT (against ``base``) come from the matrix."""
    matrix, labels = r["score_matrix"], r.get("labels")
    base_row = base["score_matrix"][0] if base and base.get("score_matrix") else None
    return {
        "metric": r["score_metric"],
        "matrix": matrix,
        "ap": mean_score(r["generation"]),
        "acc": average_accuracy(matrix),
        "bwt": backward_transfer(matrix, labels=labels),
        "forgetting": forgetting(matrix, labels=labels),
        "fwt": forward_transfer(matrix, base_row, labels=labels) if base_row else None,
        "final": r["generation"],
    }


def gate_routing_accuracy(r: dict) -> float:
    """Mean over steps of the share of the step's held-out prompts the final gate routes (top-1) to the expert
    its true label was first given."""
    first_expert: dict[str, int] = {}
    for label, expert in zip(r["labels"], r["expert_of_step"], strict=True):
        first_expert.setdefault(label, expert)
    shares = [routed.get(str(first_expert[label]), 0.0)
              for label, routed in zip(r["labels"], r["final_routing"], strict=True)]
    return sum(shares) / len(shares)


def mean_score(generation: Sequence[dict]) -> float | None:
    return sum(g["score"] for g in generation) / len(generation) if generation else None
