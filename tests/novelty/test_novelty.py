"""Novelty threshold behaviour, the skill library, and add_new_skill on a tiny model."""

from __future__ import annotations

import pytest
import torch

from dylora_moe.events import EXPERT_CREATED, SKILL_RECOGNISED
from dylora_moe.novelty import NoveltyDetector, SkillLibrary
from tests.conftest import build


def unit(*xs):
    return torch.nn.functional.normalize(torch.tensor(xs, dtype=torch.float), dim=0)


def test_threshold_decides_novelty():
    lib = SkillLibrary()
    det = NoveltyDetector(lib, similarity_threshold=0.8)
    assert det.is_novel(unit(1, 0, 0))  # empty library: everything is new
    lib.add_skill(unit(1, 0, 0), expert_id=0)
    assert not det.is_novel(unit(1, 0, 0))
    assert not det.is_novel(unit(1, 0.5, 0))  # cos = 0.894 >= 0.8
    assert det.is_novel(unit(1, 1, 0))  # cos = 0.707 < 0.8
    assert det.is_novel(unit(0, 0, 1))
    skill, sim = det.nearest(unit(1, 1, 0))
    assert skill == 0 and sim == pytest.approx(2 ** -0.5)


def test_nearest_picks_the_most_similar_skill():
    lib = SkillLibrary()
    lib.add_skill(unit(1, 0, 0), expert_id=5, name="a")
    lib.add_skill(unit(0, 1, 0), expert_id=7, name="b")
    skill, _ = NoveltyDetector(lib).nearest(unit(0.1, 1, 0))
    assert lib.skills[skill].expert_id == 7


def test_update_skill_keeps_a_running_mean():
    lib = SkillLibrary()
    s = lib.add_skill(unit(1, 0), expert_id=0, examples=1)
    lib.update_skill(s.skill_id, unit(0, 1), examples=1)
    torch.testing.assert_close(lib.skills[s.skill_id].embedding, unit(1, 1))
    assert lib.skills[s.skill_id].examples == 2


PYTHON = ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)", "import os\nos.getcwd()"]
NUMBERS = ["0123456789 0123 4567 89", "31415926535 8979 3238", "2718281828 4590 4523 5360"]


def test_add_new_skill_creates_then_recognises():
    model = build()
    first = model.add_new_skill(PYTHON, name="python")
    assert first.is_novel and first.nearest_skill is None and model.num_experts == 1
    again = model.add_new_skill(PYTHON, name="python again")
    assert not again.is_novel and again.expert_id == first.expert_id and model.num_experts == 1
    assert again.similarity == pytest.approx(1.0, abs=1e-5)
    assert [e["event"] for e in model.events.records if e["event"] in (EXPERT_CREATED, SKILL_RECOGNISED)] == [
        EXPERT_CREATED, SKILL_RECOGNISED]


def test_threshold_above_similarity_makes_a_new_expert_and_matures_the_previous():
    model = build()
    model.novelty.similarity_threshold = 1.0
    a = model.add_new_skill(PYTHON)
    b = model.add_new_skill(NUMBERS)
    assert a.expert_id != b.expert_id and b.is_novel
    assert b.nearest_skill == a.skill_id and b.similarity < 1.0
    assert model.router.expert_maturity.tolist() == [1, 0]
    model.novelty.similarity_threshold = -1.0
    c = model.add_new_skill(NUMBERS)
    assert not c.is_novel and model.num_experts == 2


def test_empty_skill_data_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        build().add_new_skill(["", "   "])


def test_novelty_rank_rule_gives_more_rank_to_farther_skills():
    from dylora_moe.experts import expert_rank

    assert expert_rank("fixed", 8, 64, 0.1, 0.9) == 8
    assert expert_rank("novelty", 8, 64, None, 0.9) == 8  # the first skill
    assert expert_rank("novelty", 8, 64, 0.89, 0.9) == 8  # just past the threshold
    assert expert_rank("novelty", 8, 64, 0.8, 0.9) == 16  # one threshold margin further
    assert expert_rank("novelty", 8, 64, 0.6, 0.9) == 32
    assert expert_rank("novelty", 8, 16, -1.0, 0.9) == 16  # capped
