"""Crash-safe progress of a continual run: the system and the loop's state change together, atomically.

After every completed step the learner writes one checkpoint folder: the saved system (experts, router,
library, config) plus ``progress.json`` (the stream's identity and the step records) and
``routing_memory.safetensors``. The folder is swapped in by renames, so after a crash the checkpoint is the
state right after the last completed step, and ``resume`` continues with the next step; every step seeds
its own randomness, so a resumed run computes what an uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from ..checkpoint import load_tensors, read_json, read_manifest, recover
from ..novelty import NoveltyResult
from .loop import ContinualLearner, StepRecord

PROGRESS = "progress.json"
MEMORY = "routing_memory.safetensors"


def save_progress(learner: ContinualLearner, path: str | Path) -> Path:
    """Checkpoint the learner's model and state after its last completed step."""

    def extra(folder: Path) -> None:
        state = {"stream": learner.stream.name, "skills": [s.name for s in learner.skills],
                 "completed": len(learner.records), "records": [asdict(r) for r in learner.records],
                 "merges": {str(k): v for k, v in learner.merges.items()},
                 "examples_evaluated": learner.examples_evaluated}
        save_file(learner.memory.tensors() or {}, str(folder / MEMORY))
        (folder / PROGRESS).write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")

    return learner.model.save_pretrained(path, extra=extra)


def has_progress(path: str | Path) -> bool:
    recover(path)
    return (Path(path) / PROGRESS).is_file()


def restore_progress(learner: ContinualLearner, path: str | Path) -> int:
    """Load records and routing memory into ``learner`` (whose model was loaded from ``path``) and re-read the
    data of the completed steps; returns the number of completed steps."""
    path = Path(path)
    read_manifest(path)
    state = read_json(path / PROGRESS)
    names = [s.name for s in learner.skills]
    if state["stream"] != learner.stream.name or state["skills"][: len(names)] != names[: len(state["skills"])]:
        raise ValueError(f"{path} holds progress of stream {state['stream']!r} with skills {state['skills']}, "
                         f"not of {learner.stream.name!r} with {names}: resume with the same stream file")
    if state["completed"] > len(names):  # the stream may grow after a checkpoint, never lose a completed step
        raise ValueError(f"{path} holds {state['completed']} completed steps but the stream has {len(names)} "
                         f"skill(s) ({names}): resume with the stream file the run was started with")
    learner.records = [record_from_dict(r) for r in state["records"]]
    learner.merges = {int(k): v for k, v in state.get("merges", {}).items()}
    # The cost counter goes on from the checkpoint. The scores evaluation may reuse are not kept: the experts of
    # a paused run's folder may be trained meanwhile under the same ids (a recognised upload to a server), so
    # every example is scored again at the first evaluation after a resume.
    learner.examples_evaluated = state.get("examples_evaluated", 0)
    learner.memory.load_tensors(load_tensors(path / MEMORY))
    learner.steps = [learner.prepare(skill) for skill in learner.skills[: state["completed"]]]
    return state["completed"]


def record_from_dict(data: dict) -> StepRecord:
    data = dict(data)
    data["novelty"] = NoveltyResult(**data["novelty"])
    data["routing"] = [{int(k): v for k, v in shares.items()} for shares in data["routing"]]
    return StepRecord(**data)
