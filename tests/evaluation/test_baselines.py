"""The benchmark's methods on a tiny model: what each trains, how each is routed at evaluation, the full matrix."""

from __future__ import annotations

import pytest
import torch

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.stream import StreamSpec
from dylora_moe.evaluation.baselines import JointLoRA, OracleExperts, SequentialLoRA, spec_reference
from dylora_moe.training import ContinualLearner
from dylora_moe.training.measure import eval_loss
from tests.conftest import build
from tests.training.test_loop import digits, letters, skill_file
from tests.training.test_loop import small_config as loop_config


def small_config(**kw):
    return loop_config(**{"seed_steps": 1, "consolidation_steps": 2, **kw})


def stream(tmp_path) -> StreamSpec:
    again = skill_file(tmp_path, "digits-again", lambda i: {"prompt": f"{i} + {i} =", "response": f"{2 * i}"})
    again["label"] = "digits"
    return StreamSpec("s", [skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "letters", letters), again])


def test_evaluate_ahead_fills_the_whole_matrix(tmp_path):
    records = ContinualLearner(build(), stream(tmp_path), small_config(), tmp_path / "a", evaluate_ahead=True).run()
    assert all(v is not None for r in records for v in r.losses)
    lower = ContinualLearner(build(), stream(tmp_path), small_config(), tmp_path / "b").run()
    assert [[v is None for v in r.losses] for r in lower] == [[False, True, True], [False, False, True],
                                                              [False, False, False]]


def test_sequential_lora_trains_one_expert_through_the_stream(tmp_path):
    model = build()
    learner = SequentialLoRA(model, stream(tmp_path), small_config(), tmp_path / "o")
    records = learner.run()
    assert model.num_experts == 1
    assert [r.novelty.expert_id for r in records] == [0, 0, 0]
    assert [r.novelty.is_novel for r in records] == [True, True, False]  # seeding exactly when a label is new
    assert learner.retained(2, 0) is None  # plain sequential fine-tuning: no KL to the expert's past self
    assert ContinualLearner(build(), stream(tmp_path), small_config(), tmp_path / "d").retained(0, 0) is None


def test_label_baselines_never_replay(tmp_path):
    """With replay, sequential_lora's one LoRA would train on everything seen (joint_lora) at every step."""
    learner = SequentialLoRA(build(), stream(tmp_path), small_config(expert_replay=True), tmp_path / "s")
    learner.run()
    assert learner.replayed(2, 0) == []
    assert len(learner.training_set(2, learner.steps[2], 0)) == len(learner.steps[2].train_set)


def test_joint_lora_trains_on_everything_seen_so_far(tmp_path):
    learner = JointLoRA(build(), stream(tmp_path), small_config(), tmp_path / "o")
    learner.run()
    sizes = [len(s.train_set) for s in learner.steps]
    assert len(learner.training_set(2, learner.steps[2])) == sum(sizes)
    assert learner.model.num_experts == 1


def test_oracle_experts_pin_the_label_expert_and_use_the_frozen_model_for_unseen_labels(tmp_path):
    model = build()
    learner = OracleExperts(model, stream(tmp_path), small_config(), tmp_path / "o", evaluate_ahead=True)
    records = learner.run()
    assert model.num_experts == 2 and learner.expert_of_label == {"digits": 0, "letters": 1}
    assert [r.novelty.expert_id for r in records] == [0, 1, 0]
    base = build()
    letters_set = learner.steps[1].eval_set
    # after step 0 the letters label has no expert yet: the oracle answers with the frozen model
    assert records[0].losses[1] == pytest.approx(eval_loss(base, letters_set, 16), rel=1e-5)
    # after the stream, digits-again is evaluated on the digits expert, whatever the gate would say
    with model.force_expert(0):
        pinned = eval_loss(model, learner.steps[2].eval_set, 16)
    assert records[-1].losses[2] == pytest.approx(pinned, rel=1e-6)


def test_spec_reference_is_the_design_document_configuration():
    system, training = spec_reference(DyLoRAConfig(), small_config())
    assert system.mixing == "reference" and system.router.route_layer is None
    assert system.novelty.embed_on == "text"
    assert training.rehearsal_weight == 0 and training.router_fit_steps == 0
    assert training.kl_weight == 0 and training.retain_kl_weight == 0
    assert system.expert == DyLoRAConfig().expert and training.seed_steps == small_config().seed_steps


def test_oracle_trains_the_label_expert_alone_whatever_the_gate_prefers(tmp_path):
    model = build()
    learner = OracleExperts(model, stream(tmp_path), small_config(), tmp_path / "o")
    learner.run_step(0)
    learner.run_step(1)
    with torch.no_grad():
        model.router.gate.bias.copy_(torch.tensor([-50.0, 50.0]))  # the gate sends everything to expert 1
    before = {e: [p.detach().clone() for p in model.experts.parameters(e)] for e in (0, 1)}
    learner.run_step(2)  # digits again: trains expert 0
    changed = {e: any(not torch.equal(a, b) for a, b in zip(before[e], model.experts.parameters(e), strict=True))
               for e in (0, 1)}
    assert changed == {0: True, 1: False}
