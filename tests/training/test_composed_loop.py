"""A stream step of composed data (two known skills at once) in the continual loop: no expert, multi-label rows."""

from __future__ import annotations

import random

import torch

from dylora_moe.data.stream import StreamSpec
from dylora_moe.training import ContinualLearner
from dylora_moe.training.rehearsal import mixture_key
from tests.conftest import build
from tests.training.test_loop import skill_file, small_config


def words(rng: random.Random, chars: str, n: int) -> str:
    return " ".join("".join(rng.choice(chars) for _ in range(rng.randint(3, 6))) for _ in range(n))


def test_a_composed_step_trains_the_gate_on_multi_label_rows_and_no_expert(tmp_path):
    rng = random.Random(0)

    def row(chars_a, chars_b=None):
        def make(i):
            text = words(rng, chars_a, 6) if chars_b is None else words(rng, chars_a, 3) + " " + words(rng, chars_b, 3)
            return {"prompt": text[:8], "response": text[8:]}
        return make

    stream = StreamSpec("s", [skill_file(tmp_path, "letters", row("abcdefgh")),
                              skill_file(tmp_path, "digits", row("0123456789+=")),
                              skill_file(tmp_path, "both", row("abcdefgh", "0123456789+="))])
    model = build(top_k=2, cumulative_weight=0.8)
    model.config.novelty.layer = 0  # token embeddings: a half-and-half example is the mixture of the two skills
    model.config.novelty.mixtures = True
    learner = ContinualLearner(model, stream, small_config(), tmp_path / "out")
    learner.run()
    first, second, composed = (r.novelty for r in learner.records)
    assert first.is_novel and second.is_novel and not composed.is_novel
    assert model.num_experts == 2 and learner.records[2].train_log == []
    label, features = learner.memory.skills[mixture_key(composed.components)]
    assert label == (first.expert_id, second.expert_id) and features.shape[0] > 0
    _, targets = learner.memory.batch(model.experts.expert_ids)
    assert targets.dtype == torch.float32 and (targets == 0.5).any()
