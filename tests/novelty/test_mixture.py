"""Mixtures of known skills: the reference sample, the detector's decision, and no new expert on a tiny model."""

from __future__ import annotations

import random

import torch

from dylora_moe.config import NoveltyConfig
from dylora_moe.novelty import statistics as st
from dylora_moe.novelty.detector import NoveltyDetector
from dylora_moe.novelty.library import SkillLibrary, SkillSample
from tests.conftest import build


def sample(x: torch.Tensor, offset: int = 0) -> SkillSample:
    return SkillSample(x, None, torch.arange(offset, offset + x.shape[0]))


def clusters(seed: int = 0, n: int = 64, h: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centre = {k: torch.randn(h, generator=g) * 3 for k in "abc"}
    rows = {k: c + torch.randn(n, h, generator=g) for k, c in centre.items()}
    share = torch.rand(n, 1, generator=g) * 0.4 + 0.3  # each composed example mixes a and b in its own share
    rows["ab"] = share * (centre["a"] + torch.randn(n, h, generator=g)) + (1 - share) * (
        centre["b"] + torch.randn(n, h, generator=g))
    return rows


def test_mixture_weight_and_rows():
    a, b = torch.zeros(5, 3), torch.ones(8, 3)
    assert st.mixture_weight(torch.full((3,), 0.25), a.mean(0), b.mean(0)) == 0.75
    assert st.mixture_weight(torch.full((3,), 2.0), a.mean(0), b.mean(0)) == 0.0  # clipped to the segment
    rows = st.mixture_rows(a, b, 0.75)
    assert rows.shape == (8, 3) and torch.allclose(rows, torch.full((8, 3), 0.25, dtype=torch.float64))
    a, b = torch.arange(2.0)[:, None], 10 * torch.arange(1.0, 6.0)[:, None]  # the smaller sample is cycled
    assert st.mixture_rows(a, b, 0.5).flatten().tolist() == [5.0, 10.5, 15.0, 20.5, 25.0]


def test_new_data_near_one_skill_is_no_mixture_with_a_tiny_far_skill():
    """A new skill a little apart from a well-sampled skill 0, and a 3-example skill 1 far away: the nearest
    point of the segment is (nearly) skill 0 alone, which already separated from the data; the mixture's
    reference cycles skill 1's rows to skill 0's size, so its test has skill 0's power and the data is novel."""
    g = torch.Generator().manual_seed(0)
    e = torch.eye(16)
    rows = {"a": torch.randn(128, 16, generator=g), "b": torch.randn(3, 16, generator=g) + 20 * e[0]}
    new = torch.randn(40, 16, generator=g) - 2.5 * e[1]
    plain, mixing = detector(rows, "ab", mixtures=False), detector(rows, "ab", mixtures=True)
    assert plain.decide(sample(new, 5000), new.mean(0)).is_novel
    decision = mixing.decide(sample(new, 5000), new.mean(0))
    assert decision.is_novel and decision.components is None


def detector(rows: dict[str, torch.Tensor], known: str, mixtures: bool) -> NoveltyDetector:
    library = SkillLibrary()
    for i, k in enumerate(known):
        library.add_skill(rows[k].mean(0), expert_id=i, name=k, sample=sample(rows[k], 1000 * i))
    return NoveltyDetector(library, NoveltyConfig(mixtures=mixtures))


def test_a_mixture_of_two_known_skills_is_recognised_and_a_new_skill_is_not():
    rows = clusters()
    off, on = detector(rows, "ab", mixtures=False), detector(rows, "ab", mixtures=True)
    composed = sample(rows["ab"], 5000)
    assert off.decide(composed, composed.mean).is_novel  # no single skill explains it
    decision = on.decide(composed, composed.mean)
    assert not decision.is_novel and sorted(decision.components) == [0, 1]
    assert 0.5 <= decision.mixture_weight <= 0.6  # the shares average 0.5
    assert decision.statistic <= 0.25 or decision.p_value > 0.01
    new = sample(rows["c"], 5000)
    assert on.decide(new, new.mean).is_novel and on.decide(new, new.mean).components is None
    # a mixture needs two known skills: with one known, the composed data is novel
    assert detector(rows, "a", mixtures=True).decide(composed, composed.mean).is_novel


def test_a_mixture_of_a_known_and_an_unknown_skill_is_novel():
    rows = clusters(seed=1)
    g = torch.Generator().manual_seed(2)
    rows["ac"] = 0.5 * (rows["a"] + rows["c"]) + 0.1 * torch.randn(rows["a"].shape, generator=g)
    decision = detector(rows, "ab", mixtures=True).decide(sample(rows["ac"], 5000), rows["ac"].mean(0))
    assert decision.is_novel


def words(rng: random.Random, chars: str, n: int) -> str:
    return " ".join("".join(rng.choice(chars) for _ in range(rng.randint(3, 6))) for _ in range(n))


def test_composed_data_of_two_known_skills_creates_no_expert():
    """On the token embeddings (``novelty.layer=0``) an example that is half one skill's text and half the
    other's is embedded as the mixture of the two, which is what the decision tests."""
    rng = random.Random(0)
    letters = [words(rng, "abcdefgh", 6) for _ in range(40)]
    digits = [words(rng, "0123456789+=", 6) for _ in range(40)]
    both = [words(rng, "abcdefgh", 3) + " " + words(rng, "0123456789+=", 3) for _ in range(40)]
    capitals = [words(rng, "QRSTUVWXYZ", 6) for _ in range(40)]
    model = build()
    model.config.novelty.layer = 0
    model.config.novelty.mixtures = True
    first, second = model.add_new_skill(letters, "letters"), model.add_new_skill(digits, "digits")
    assert first.is_novel and second.is_novel
    library_rows = {i: s.sample.features.clone() for i, s in model.library.skills.items()}
    result = model.add_new_skill(both, "letters+digits")
    assert not result.is_novel and model.num_experts == 2
    assert sorted(result.components) == [first.skill_id, second.skill_id]
    assert sorted(model.component_experts(result)) == [first.expert_id, second.expert_id]
    assert "mixture of skills" in result.evidence()
    # neither skill's stored sample took the composed rows
    assert all(torch.equal(library_rows[i], s.sample.features) for i, s in model.library.skills.items())
    assert model.add_new_skill(capitals, "capitals").is_novel and model.num_experts == 3

    control = build()  # the same data without the mixture test: an expert of its own
    control.config.novelty.layer = 0
    for data in (letters, digits):
        control.add_new_skill(data)
    assert control.add_new_skill(both).is_novel and control.num_experts == 3
