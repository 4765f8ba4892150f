"""The methods a continual-learning benchmark compares, all run through the same ``ContinualLearner``.

Every method sees the same data, the same optimizer steps per stream step and LoRA experts of the same rank;
only what is trained and how evaluation is routed differ:

- ``dylora``: the system as configured (novelty detection, router, rehearsal).
- ``spec_reference``: the design document's own choices: output-level mixing (one pass per expert), the gate
  and the novelty embedding on the frozen model's final hidden states of the whole text, no router rehearsal.
- ``sequential_lora``: one LoRA trained through the stream in order (the forgetting baseline).
- ``joint_lora``: one LoRA trained at every step on all the training data seen so far, mixed (multi-task
  training, the upper bound that needs every old example).
- ``oracle_experts``: one LoRA per true skill label, evaluated with the label's expert (the routing upper
  bound); skills whose label has no expert yet are evaluated on the frozen model.
- ``base``: the frozen model, untrained.

The label baselines are told each step's true skill (``SkillSpec.label``) instead of detecting it, and take
the seeding phase exactly when a label is new, as a perfect novelty detector would.
"""

from __future__ import annotations

import contextlib
import dataclasses

import datasets

from ..config import DyLoRAConfig
from ..novelty import NoveltyResult
from ..training.config import TrainingConfig
from ..training.loop import ContinualLearner, StepData

METHODS = ("dylora", "spec_reference", "sequential_lora", "joint_lora", "oracle_experts", "base")


class LabelledLearner(ContinualLearner):
    """A learner told the true skill of each step; the gate is not used (one expert, or pinned routing).

    ``shared``: one expert for every skill (sequential and joint training); otherwise one per label.
    """

    trains_router = False
    shared = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.expert_of_label: dict[str, int] = {}

    def assign(self, i: int, data: StepData) -> NoveltyResult:
        label = data.skill.label
        novel = label not in self.expert_of_label
        if novel:
            reuse = self.shared and self.expert_of_label
            self.expert_of_label[label] = (next(iter(self.expert_of_label.values())) if reuse
                                           else self.model.create_expert())
        expert = self.expert_of_label[label]
        labels = list(self.expert_of_label)
        return NoveltyResult(novel, labels.index(label), expert, None, None, self.model.experts.ranks[expert])

    def retained(self, i: int, expert_id: int) -> None:
        """No KL to the expert before the step: the label baselines train as their recipes do (a shared LoRA
        distilled to its past self would be another method, not ``sequential_lora``, the forgetting baseline)."""
        return None

    def replayed(self, i: int, expert_id: int) -> list[datasets.Dataset]:
        """No replay: with it ``sequential_lora``'s one LoRA would train on everything seen, i.e. become
        ``joint_lora``; the label baselines train as their recipes do."""
        return []

    def train_expert(self, i: int, data: StepData, result: NoveltyResult) -> list[dict]:
        with self.model.force_expert(result.expert_id):  # the expert trains alone, whatever the gate says
            return super().train_expert(i, data, result)


class SequentialLoRA(LabelledLearner):
    shared = True


class JointLoRA(LabelledLearner):
    shared = True

    def training_set(self, i: int, data: StepData, expert_id: int | None = None) -> datasets.Dataset:
        return datasets.concatenate_datasets([step.train_set for step in self.steps])  # the Trainer shuffles


class OracleExperts(LabelledLearner):
    def eval_routing(self, j: int) -> contextlib.AbstractContextManager:
        return self.model.force_expert(self.expert_of_label.get(self.skills[j].label))

    def eval_experts(self, j: int, step: StepData) -> list[int | None]:
        return [self.expert_of_label.get(self.skills[j].label)] * len(step.eval_set)


def spec_reference(system: DyLoRAConfig, training: TrainingConfig) -> tuple[DyLoRAConfig, TrainingConfig]:
    """The design document's choices on top of a configuration (same experts, steps and rates): no gate
    rehearsal or fit, no KL to the frozen model (the spec's output-level mixing has no expert-free pass) and none
    to an expert's past self."""
    router = dataclasses.replace(system.router, route_layer=None)
    novelty = dataclasses.replace(system.novelty, embed_on="text")
    return (dataclasses.replace(system, mixing="reference", router=router, novelty=novelty),
            dataclasses.replace(training, rehearsal_weight=0.0, router_fit_steps=0, kl_weight=0.0,
                                retain_kl_weight=0.0))


LEARNERS: dict[str, type[ContinualLearner]] = {
    "dylora": ContinualLearner,
    "spec_reference": ContinualLearner,
    "sequential_lora": SequentialLoRA,
    "joint_lora": JointLoRA,
    "oracle_experts": OracleExperts,
}
