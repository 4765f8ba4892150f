"""Pure parts of sorting mixed data: conformal p-values, the count test, neighbour scores and group refinement
on synthetic features."""

from __future__ import annotations

import math

import pytest
import torch

from dylora_moe.novelty.sorting import binomial_tail, conformal_pvalues, knn_scores, refine_group


def blob(n: int, centre: float, seed: int, dim: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x[:, 0] += centre
    return x + 3.0  # a common offset, as in mean-pooled hidden states


def test_conformal_pvalues_count_the_reference_at_least_as_extreme():
    p = conformal_pvalues(torch.tensor([0.0, 0.5, 2.0]), torch.tensor([0.1, 0.5, 1.0]))
    assert p.tolist() == pytest.approx([1.0, 3 / 4, 1 / 4])


def test_binomial_tail_matches_the_formula():
    assert binomial_tail(0, 10, 0.05) == 1.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)
    assert binomial_tail(1, 20, 0.05) == pytest.approx(1 - 0.95**20)


def test_knn_scores_are_calibrated_on_known_data_and_flag_a_new_cluster():
    known = [blob(120, 0.0, 0)]
    null = knn_scores(known, blob(120, 0.0, 1), k=10)
    assert (null.p_values <= 0.05).double().mean() <= 0.12  # about the nominal 5% under "all known"
    pool = torch.cat([blob(90, 0.0, 2), blob(30, 8.0, 3)])
    scores = knn_scores(known, pool, k=10)
    flagged = scores.p_values <= 0.05
    assert flagged[90:].double().mean() >= 0.9 and flagged[:90].double().mean() <= 0.12


def test_knn_scores_assign_rows_to_the_nearest_known_skill():
    known = [blob(60, 0.0, 0), blob(60, 10.0, 1)]
    pool = torch.cat([blob(20, 0.0, 2), blob(20, 10.0, 3)])
    assert knn_scores(known, pool, k=10).nearest.tolist() == [0] * 20 + [1] * 20


def test_refine_group_returns_strays_and_collects_missed_rows():
    known = [blob(80, 0.0, 0)]
    pool = torch.cat([blob(40, 0.0, 1), blob(30, 8.0, 2)])
    members = torch.zeros(70, dtype=torch.bool)
    members[45:60] = True  # half of the new cluster ...
    members[:5] = True  # ... and a few stray known rows
    refined = refine_group(known, pool, members, weight_decay=1e-2)
    assert refined[40:].all() and not refined[:40].any()


def test_binomial_tail_is_a_valid_count_test_under_the_null():
    # P(tail <= 0.01) under Binomial(n, 0.05) stays below 0.01 (a conservative discrete test)
    n, rate = 128, 0.05
    level = sum(math.comb(n, c) * rate**c * (1 - rate) ** (n - c) for c in range(n + 1)
                if binomial_tail(c, n, rate) <= 0.01)
    assert level <= 0.01


def test_knn_scores_with_fewer_rows_than_neighbours_use_every_other_row():
    scores = knn_scores([blob(2, 0.0, 1)], blob(3, 5.0, 2), k=10)  # 5 rows in all, 10 neighbours asked
    assert scores.p_values.shape == (3,) and scores.nearest.tolist() == [0, 0, 0]


def test_binomial_tail_of_thousands_of_trials_does_not_overflow():
    """Chunks of a thousand examples and more: math.comb(1030, i) * rate**i overflowed a float."""
    tail = binomial_tail(60, 1030, 0.05)
    assert 0.12 < tail < 0.13
    assert binomial_tail(1, 5000, 0.05) == pytest.approx(1 - 0.95**5000)
    assert binomial_tail(300, 5000, 0.05) == pytest.approx(
        1 - sum(math.exp(math.lgamma(5001) - math.lgamma(i + 1) - math.lgamma(5001 - i) + i * math.log(0.05)
                         + (5000 - i) * math.log(0.95)) for i in range(300)), abs=1e-9)
    assert binomial_tail(6, 5, 0.5) == 0.0


def add_like_the_model(library, detector):
    """What ``DyLoRAMoE.add_skill_sample`` does with the library (no experts): decide, then found or join."""
    from dylora_moe.novelty.detector import NoveltyResult

    def found(sample, name):
        embedding = torch.nn.functional.normalize(sample.features.mean(0), dim=0)
        decision = detector.decide(sample, embedding)
        if decision.is_novel:
            skill = library.add_skill(embedding, expert_id=len(library), name=name, examples=len(sample),
                                      sample=sample)
        else:
            skill = library.update_skill(decision.nearest_skill, embedding, len(sample), sample)
        return NoveltyResult(decision.is_novel, skill.skill_id, skill.expert_id, decision.nearest_skill, None, 0)

    return found


@pytest.mark.parametrize("first", [10, 18])
def test_a_first_chunk_too_small_to_calibrate_waits_instead_of_blinding_the_sorter(first):
    """A conformal p-value against m stored rows is at least 1 / (m + 1): a first skill of fewer than 19 rows
    (at example_significance 0.05) could never flag a later row, and rows sorted into it do not enter the
    library. So the first skill waits for 19 rows; a new skill arriving later is then found."""
    from dylora_moe.config import NoveltyConfig
    from dylora_moe.novelty.detector import NoveltyDetector
    from dylora_moe.novelty.library import SkillLibrary, SkillSample
    from dylora_moe.novelty.sorting import SkillSorter, smallest_library

    assert smallest_library(0.05) == 19
    g = torch.Generator().manual_seed(0)
    config = NoveltyConfig()
    library = SkillLibrary(config.capacity)
    sorter = SkillSorter(library, config, add_like_the_model(library, NoveltyDetector(library, config)))
    shift = 30 * torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    key, sorted_b = 0, 0
    for chunk in range(7):
        n = first if chunk == 0 else 48
        x, b = torch.randn(n, 16, generator=g), 0 if chunk == 0 else int(0.4 * n)
        x[:b] += shift  # the first b rows of later chunks are a second, far skill
        keys = list(range(key, key + n))
        key += n
        result = sorter.sort(chunk, keys, SkillSample(x, None, torch.tensor(keys)), keys)
        if chunk == 0:
            assert result.founded == [] and result.waiting == first
        sorted_b += sum(1 for k in result.assigned.get(0, []) if 0 <= k - keys[0] < b)
    assert len(library) == 2 and len(library.skills[0].sample) >= 19 and sorted_b == 0


@pytest.mark.parametrize("size", [96, 512])
def test_a_chunk_larger_than_the_library_sample_still_shows_a_new_skill(size):
    """A known skill of 128 stored rows; one chunk, 60% more of it and 40% of a far new skill. At 512 rows the
    stored rows' neighbours were mostly chunk rows and every new row was sorted into the known skill; scored in
    parts (``score_parts``), the new skill is founded with none of its rows lost to the old one."""
    from dylora_moe.novelty.sorting import score_parts

    assert score_parts([29, 19], [48, 19], 10, 0.05) == 1  # chunks of the library's size: the whole pool at once
    assert score_parts([512], [128], 10, 0.05) > 1
    from dylora_moe.config import NoveltyConfig
    from dylora_moe.novelty.detector import NoveltyDetector
    from dylora_moe.novelty.library import SkillLibrary, SkillSample
    from dylora_moe.novelty.sorting import SkillSorter

    g = torch.Generator().manual_seed(0)
    config = NoveltyConfig()
    library = SkillLibrary(config.capacity)
    found = add_like_the_model(library, NoveltyDetector(library, config))
    known = torch.randn(200, 16, generator=g)
    found(SkillSample(known, None, torch.arange(10**6, 10**6 + 200)), "a")  # stores 128 rows (the capacity)
    sorter = SkillSorter(library, config, found)
    x, new = torch.randn(size, 16, generator=g), int(0.4 * size)
    x[:new] += 16 * torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    keys = list(range(size))
    result = sorter.sort(0, keys, SkillSample(x, None, torch.tensor(keys)), keys)
    assert result.founded == [1] and not [k for k in result.assigned.get(0, []) if k < new]
    null = SkillSorter(library, config, found)  # the known skill alone: about 5% flagged at most, nothing founded
    y = torch.randn(size, 16, generator=g)
    result = null.sort(0, keys, SkillSample(y, None, torch.tensor(keys)), keys)
    assert result.founded == [] and result.candidates <= 0.08 * size
