"""Novelty decisions (cosine reference and the calibrated methods), the skill library, and add_new_skill on a
tiny model."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dylora_moe.config import NoveltyConfig
from dylora_moe.events import EXPERT_CREATED, SKILL_RECOGNISED
from dylora_moe.experts import expert_rank
from dylora_moe.novelty import NoveltyDetector, SkillLibrary, SkillSample, content_key
from tests.conftest import build, decide_by_cosine


def unit(*xs):
    return torch.nn.functional.normalize(torch.tensor(xs, dtype=torch.float), dim=0)


def sample(x: torch.Tensor, start: int = 0) -> SkillSample:
    return SkillSample(x, None, torch.arange(start, start + x.shape[0]))


def gaussian(n: int, shift: float = 0.0, seed: int = 0, dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x[:, 0] += shift
    return x + 5.0  # a large common offset, as in mean-pooled hidden states


def test_cosine_threshold_decides_novelty():
    lib = SkillLibrary()
    det = NoveltyDetector(lib, NoveltyConfig(method="cosine", similarity_threshold=0.8))
    empty = det.decide(sample(unit(1, 0, 0)[None].repeat(2, 1)), unit(1, 0, 0))
    assert empty.is_novel and empty.nearest_skill is None  # empty library: everything is new
    lib.add_skill(unit(1, 0, 0), expert_id=0)
    for vec, novel in ((unit(1, 0, 0), False), (unit(1, 0.5, 0), False), (unit(1, 1, 0), True), (unit(0, 0, 1), True)):
        d = det.decide(sample(vec[None].repeat(2, 1)), vec)
        assert d.is_novel == novel  # cos(1,0.5,0) = 0.894 >= 0.8; cos(1,1,0) = 0.707 < 0.8
    skill, sim = det.nearest(unit(1, 1, 0))
    assert skill == 0 and sim == pytest.approx(2**-0.5)


def test_nearest_picks_the_most_similar_skill():
    lib = SkillLibrary()
    lib.add_skill(unit(1, 0, 0), expert_id=5, name="a")
    lib.add_skill(unit(0, 1, 0), expert_id=7, name="b")
    skill, _ = NoveltyDetector(lib).nearest(unit(0.1, 1, 0))
    assert lib.skills[skill].expert_id == 7


def test_update_skill_keeps_a_running_mean_and_a_bounded_order_free_sample():
    lib = SkillLibrary(capacity=5)
    x = torch.randn(8, 3)
    s = lib.add_skill(unit(1, 0), expert_id=0, examples=1, sample=sample(x[:4]))
    lib.update_skill(s.skill_id, unit(0, 1), examples=1, sample=sample(x[2:], start=2))  # rows 2, 3 again
    torch.testing.assert_close(lib.skills[s.skill_id].embedding, unit(1, 1))
    assert lib.skills[s.skill_id].examples == 2
    kept = lib.skills[s.skill_id].sample
    assert kept.keys.tolist() == [0, 1, 2, 3, 4]  # deduplicated, smallest keys kept
    torch.testing.assert_close(kept.features, x[:5])
    other = SkillLibrary(capacity=5)
    t = other.add_skill(unit(1, 0), expert_id=0, sample=sample(x[2:], start=2))
    other.update_skill(t.skill_id, unit(0, 1), examples=1, sample=sample(x[:4]))
    torch.testing.assert_close(other.skills[t.skill_id].sample.features, kept.features)  # arrival order is irrelevant


# ---------------------------------------------------------------- the statistics
def test_separation_is_zero_on_average_for_one_distribution_at_any_sample_size():
    from dylora_moe.novelty.statistics import separation

    for n in (4, 16, 96):
        values = [separation(gaussian(n, seed=2 * r), gaussian(64, seed=2 * r + 1)) for r in range(40)]
        assert abs(sum(values) / len(values)) < 0.02, n


def test_separation_scale_does_not_depend_on_batch_size_units_or_offset():
    from dylora_moe.novelty.statistics import separation

    # true value: mean shift 1.0 in one of 16 unit-variance dims -> 1 / 16
    for n in (8, 32, 128):
        mean = sum(separation(gaussian(n, 1.0, seed=r), gaussian(128, seed=100 + r)) for r in range(30)) / 30
        assert mean == pytest.approx(1 / 16, abs=0.02), n
    a, b = gaussian(32, 1.0, seed=1), gaussian(32, seed=2)
    assert separation(a * 7 - 3, b * 7 - 3) == pytest.approx(separation(a, b), rel=1e-5)  # the data's own units


def test_permutation_pvalue_is_small_only_for_different_distributions():
    from dylora_moe.novelty.statistics import gram, permutation_pvalue

    _, p_diff = permutation_pvalue(*gram(gaussian(24, 3.0, seed=1), gaussian(24, seed=2)), permutations=99)
    assert p_diff == pytest.approx(0.01)  # no relabelling beats the real split
    p_same = [permutation_pvalue(*gram(gaussian(24, seed=r), gaussian(24, seed=50 + r)), permutations=99)[1]
              for r in range(30)]
    assert sum(p < 0.05 for p in p_same) <= 5  # ~5% expected under the null


def test_calibrated_decision_needs_both_effect_and_significance():
    lib = SkillLibrary()
    lib.add_skill(unit(1, 0), expert_id=0, sample=sample(gaussian(48, seed=0)))
    det = NoveltyDetector(lib, NoveltyConfig(granularity=0.25, permutations=99))
    far = det.decide(sample(gaussian(24, 4.0, seed=1), 100), unit(1, 0))
    assert far.is_novel and far.statistic > 0.25 and far.p_value <= 0.01 and far.boundary == 0.25
    near = det.decide(sample(gaussian(24, 1.0, seed=1), 100), unit(1, 0))  # real but small shift (1/16)
    assert not near.is_novel and near.nearest_skill == 0 and near.statistic < 0.25
    tiny = SkillLibrary()
    tiny.add_skill(unit(1, 0), expert_id=0, sample=sample(gaussian(3, seed=0)))
    few = NoveltyDetector(tiny, NoveltyConfig(permutations=99)).decide(sample(gaussian(1, 8.0, seed=1), 100),
                                                                       unit(1, 0))
    assert few.statistic > 0.25 and few.p_value > 0.2 and not few.is_novel  # 4 relabellings cannot reach 1%


@pytest.mark.parametrize("n", [16, 98])
def test_a_skill_founded_from_one_example_does_not_take_in_everything(n):
    """The exact test of n new examples against one stored example has n + 1 splits, so it cannot reach 1% below
    n = 99: against a known sample that small the separation alone decides. One new example against a larger
    known sample stays undecided (not novel), as above."""
    lib = SkillLibrary()
    lib.add_skill(unit(1, 0), expert_id=0, sample=sample(gaussian(1, seed=0)))
    det = NoveltyDetector(lib, NoveltyConfig(permutations=99))
    far = det.decide(sample(gaussian(n, 30.0, seed=1), 100), unit(1, 0))
    assert far.is_novel and far.statistic > 0.25
    same = det.decide(sample(gaussian(n, 0.0, seed=2), 100), unit(1, 0))
    assert not same.is_novel and same.statistic <= 0.25


def test_non_finite_embeddings_are_refused_before_anything_is_stored():
    lib = SkillLibrary()
    det = NoveltyDetector(lib, NoveltyConfig())
    bad = gaussian(8)
    bad[0, 0] = float("nan")
    for _ in range(2):  # the first skill (empty library) and a later one
        with pytest.raises(ValueError, match="NaN or infinite"):
            det.decide(sample(bad), unit(1, 0))
        lib.add_skill(unit(1, 0), expert_id=len(lib), sample=sample(gaussian(8)))


def test_decision_does_not_depend_on_example_order():
    lib = SkillLibrary()
    lib.add_skill(unit(1, 0), expert_id=0, sample=sample(gaussian(40, seed=0)))
    det = NoveltyDetector(lib, NoveltyConfig(permutations=99))
    x = gaussian(20, 1.6, seed=3)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(9))
    a, b = det.decide(sample(x), unit(1, 0)), det.decide(sample(x[perm]), unit(1, 0))
    assert (a.is_novel, a.statistic, a.p_value) == pytest.approx((b.is_novel, b.statistic, b.p_value))


def test_rank_rule_gives_more_rank_to_data_further_beyond_the_boundary():
    assert expert_rank("fixed", 8, 64, 3.0) == 8
    assert expert_rank("novelty", 8, 64, None) == 8  # the first skill
    assert expert_rank("novelty", 8, 64, 0.1) == 8  # just past the boundary
    assert expert_rank("novelty", 8, 64, 1.0) == 16  # as far beyond it again as the boundary itself
    assert expert_rank("novelty", 8, 64, 3.0) == 32
    assert expert_rank("novelty", 8, 16, 100.0) == 16  # capped


# ---------------------------------------------------------------- add_new_skill on a tiny model
def texts(alphabet: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(6))
            for _ in range(n)]


LETTERS, DIGITS = "abcdefghijklmnopqrstuvwxyz", "0123456789+-*/="


def test_add_new_skill_tells_two_token_distributions_apart_and_keeps_halves_together():
    model = build()
    first = model.add_new_skill(texts(LETTERS, 24, 0), name="letters")
    assert first.is_novel and first.nearest_skill is None and first.method == "separation"
    other = model.add_new_skill(texts(DIGITS, 24, 1), name="digits")
    assert other.is_novel and other.nearest_skill == first.skill_id
    assert other.statistic > other.boundary and other.p_value <= model.config.novelty.significance
    assert model.router.expert_maturity.tolist() == [1, 0]
    half = model.add_new_skill(texts(LETTERS, 24, 2), name="letters, other half")
    assert not half.is_novel and half.skill_id == first.skill_id and model.num_experts == 2
    assert set(half.scores) == {first.skill_id, other.skill_id}
    assert half.scores[first.skill_id]["statistic"] < half.boundary < half.scores[other.skill_id]["statistic"]
    events = [e for e in model.events.records if e["event"] in (EXPERT_CREATED, SKILL_RECOGNISED)]
    assert [e["event"] for e in events] == [EXPERT_CREATED, EXPERT_CREATED, SKILL_RECOGNISED]
    assert events[-1]["statistic"] == half.statistic and events[-1]["boundary"] == half.boundary


def test_add_new_skill_ignores_example_order():
    data = texts(DIGITS, 24, 1)
    results = []
    for order in (data, data[::-1]):
        model = build()
        model.add_new_skill(texts(LETTERS, 24, 0))
        results.append(model.add_new_skill(order))
    assert results[0].is_novel == results[1].is_novel
    assert results[0].statistic == pytest.approx(results[1].statistic, abs=1e-6)


@pytest.mark.parametrize("method", ["mahalanobis", "combined", "entropy"])
def test_other_methods_run_through_add_new_skill(method):
    model = build()
    model.config.novelty.method = method
    model.config.novelty.permutations = 99
    first = model.add_new_skill(texts(LETTERS, 16, 0))
    second = model.add_new_skill(texts(DIGITS, 16, 1))
    assert first.is_novel and second.method == method and second.p_value is not None
    if method != "entropy":  # one expert: the gate has no entropy to rise, the documented limit of that trigger
        assert second.is_novel


def test_cosine_reference_still_available():
    model = build()
    decide_by_cosine(model, 1.0)
    a = model.add_new_skill(texts(LETTERS, 4, 0))
    b = model.add_new_skill(texts(DIGITS, 4, 1))
    assert b.is_novel and b.method == "cosine" and b.similarity < 1.0 and a.expert_id != b.expert_id
    decide_by_cosine(model, -1.0)
    assert not model.add_new_skill(texts(DIGITS, 4, 2)).is_novel and model.num_experts == 2


def test_empty_skill_data_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        build().add_new_skill(["", "   "])


def test_embedding_layer_is_selectable_and_checked():
    model = build()
    enc = model.tokenizer(["abc de", "fgh"], return_tensors="pt", padding=True)
    with torch.no_grad():
        states = model.backbone.base_model(**enc, output_hidden_states=True).hidden_states  # 2 layers: 3 states
    mask = enc["attention_mask"][..., None].float()

    def pooled(h):
        return (torch.nn.functional.normalize(h, dim=-1) * mask).sum(1) / mask.sum(1)

    for layer, expected in ((0, pooled(states[0])), (1, pooled(states[1])), (-1, pooled(states[2]))):
        model.config.novelty.layer = layer
        got = model.embed_sample(["abc de", "fgh"], gate=False)  # rows come in content-key order
        rows = dict(zip(got.keys.tolist(), got.features, strict=True))
        for text, row in zip(["abc de", "fgh"], expected, strict=True):
            torch.testing.assert_close(rows[content_key(text)], row, atol=1e-5, rtol=1e-5)
    model.config.novelty.layer = 7
    with pytest.raises(ValueError, match=r"novelty\.layer=7"):
        model.embed_sample(["abc"])


def test_permutation_pvalue_is_exact_when_the_splits_are_few_and_counts_every_draw_of_a_split():
    from dylora_moe.novelty.statistics import gram, permutation_pvalue

    far, near = gaussian(2, 1000.0, seed=1), gaussian(8, seed=2)  # 45 splits: the observed one is the extreme
    _, p = permutation_pvalue(*gram(far, near), permutations=200)
    assert p == pytest.approx(1 / 45)  # exact: one split of C(10, 2) scores as high, however it is indexed
    _, p = permutation_pvalue(*gram(gaussian(2, 1000.0, seed=1), gaussian(2, seed=2)), permutations=200)
    assert p == pytest.approx(2 / 6)  # 2 against 2: the split and its mirror, of 6
    # Monte Carlo beyond the splits: a split drawn in another row order ties with the observed one exactly
    x, y = gaussian(3, 1000.0, seed=3), gaussian(7, seed=4)  # C(10, 3) = 120 splits, 400 draws
    _, p = permutation_pvalue(*gram(x, y), permutations=400, seed=0)
    assert p >= 1 / 120 - 0.01


def test_one_example_against_a_one_example_skill_is_compared_on_the_librarys_spread():
    lib = SkillLibrary()
    lib.add_skill(unit(1, 0), expert_id=0, sample=sample(gaussian(1, seed=0)))
    det = NoveltyDetector(lib, NoveltyConfig(permutations=99))
    with pytest.raises(ValueError, match="one example each"):
        det.decide(sample(gaussian(1, 8.0, seed=1), 100), unit(1, 0))
    lib.add_skill(unit(0, 1), expert_id=1, sample=sample(gaussian(16, 30.0, seed=2), 50))
    d = det.decide(sample(gaussian(1, 8.0, seed=1), 100), unit(1, 0))
    assert not d.is_novel and d.scores[0]["p_value"] == 1.0  # one split of two each way: nothing is significant


def test_entropy_reads_the_gates_whole_distribution_once_routing_is_sparse():
    """A mature top-1 router's weights are one-hot whatever the gate thinks: the entropy trigger reads the
    softmax of the logits, so data the gate splits between two experts is still seen as new."""
    from dylora_moe.routing import DynamicHybridRouter

    router = DynamicHybridRouter(2, top_k=1)
    for column in (router.add_expert(), router.add_expert()):
        router.set_maturity(column, True)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[4.0, 0.0], [-4.0, 0.0]]))
        router.gate.bias.zero_()
    g = torch.Generator().manual_seed(0)
    known = torch.cat([torch.tensor([[2.0, 0.0]]), torch.tensor([[-2.0, 0.0]])]).repeat(16, 1)
    known = known + 0.1 * torch.randn(known.shape, generator=g)  # confident rows of both experts
    new = torch.tensor([[0.0, 1.0]]) + 0.1 * torch.randn(16, 2, generator=g)  # the gate splits them 50/50
    lib = SkillLibrary()
    for i in (0, 1):
        rows = known[i::2]
        lib.add_skill(unit(1, 0), expert_id=i, sample=SkillSample(rows, rows, torch.arange(16 * i, 16 * i + 16)))
    d = NoveltyDetector(lib, NoveltyConfig(method="entropy", permutations=99)).decide(
        SkillSample(new, new, torch.arange(100, 116)), unit(1, 0), (router, [0, 1]))
    assert router.strategy == "sparse" and d.is_novel and d.statistic > 0.5


def test_whitened_permutation_test_keeps_its_level_when_the_dimension_is_near_the_sample_size():
    """Each relabelling is scored with its own whitening: a covariance taken around the observed split's means
    and reused for the relabellings leaves out the direction between the observed means only, so the observed
    split gains from it and two samples of one distribution came out "different" far more often than the level."""
    from functools import partial

    from dylora_moe.novelty.statistics import gram, permutation_pvalue, whitened_separation_from_gram

    statistic = partial(whitened_separation_from_gram, dim=24)
    scale = torch.linspace(0.2, 3.0, 24)  # anisotropic, as a gate's input features are
    p_values = []
    for r in range(60):
        a = gaussian(16, seed=2 * r, dim=24) * scale
        b = gaussian(16, seed=2 * r + 1, dim=24) * scale
        p_values.append(permutation_pvalue(*gram(a, b), statistic, permutations=99)[1])
    assert sum(p <= 0.05 for p in p_values) <= 8  # 3 expected at a 5% level; 8 is p < 0.01 under Binomial(60, .05)
    a, b = gaussian(16, seed=1, dim=24) * scale, gaussian(16, seed=2, dim=24) * scale
    a[:, -1] += 3 * scale[-1]  # a shift of 3 standard deviations along the widest direction
    assert permutation_pvalue(*gram(a, b), statistic, permutations=99)[1] <= 0.02  # is still seen


@pytest.mark.parametrize(("n", "dim"), [(12, 40), (40, 6)])
def test_whitened_gram_is_the_gram_of_rows_whitened_by_the_shrunk_within_sample_covariance(n, dim):
    from dylora_moe.novelty.statistics import gram, shrunk_covariance, whitened_gram

    a, b = gaussian(n, 2.0, seed=3, dim=dim) * torch.linspace(0.5, 2.0, dim), gaussian(n + 3, seed=4, dim=dim)
    g, ia, ib = gram(a, b)
    x = torch.cat([a, b]).double()
    x = x - x.mean(0)
    within = torch.cat([x[ia] - x[ia].mean(0), x[ib] - x[ib].mean(0)])
    expected = x @ torch.linalg.solve(shrunk_covariance(within), x.T)
    assert torch.allclose(whitened_gram(g, ia, ib, dim), expected, rtol=1e-6, atol=1e-6 * expected.abs().max())


def test_whitening_of_constant_features_is_finite_and_finds_nothing():
    from dylora_moe.novelty.statistics import gram, whitened_separation_from_gram

    a = torch.full((6, 4), 2.5)
    assert whitened_separation_from_gram(*gram(a, a), dim=4) == 0.0
    lib = SkillLibrary()
    lib.add_skill(unit(1, 0), expert_id=0, sample=SkillSample(a, a, torch.arange(6)))
    decision = NoveltyDetector(lib, NoveltyConfig(method="mahalanobis", permutations=99)).decide(
        SkillSample(a, a, torch.arange(6, 12)), unit(1, 0))
    assert not decision.is_novel and decision.statistic == 0.0


def test_two_constant_samples_at_different_points_are_told_apart_after_whitening():
    from dylora_moe.novelty.statistics import gram, permutation_pvalue, whitened_separation_from_gram

    a, b = torch.zeros(6, 4), torch.zeros(6, 4)
    b[:, 1] = 1.0
    value, p_value = permutation_pvalue(*gram(a, b), lambda g, x, y: whitened_separation_from_gram(g, x, y, 4),
                                        permutations=99)
    assert math.isfinite(value) and value > 1.0 and p_value <= 0.01


def test_embeddings_do_not_depend_on_the_tokenizers_padding_side():
    """GPT-2's positions are absolute: a text embedded in a batch is embedded as alone, even when the tokenizer is
    set to pad on the left (shared state another caller may have set)."""
    from dylora_moe.novelty.embedding import embed_sample
    from tests.conftest import tiny_gpt2

    model = build(tiny_gpt2())
    model.tokenizer.padding_side = "left"
    texts = ["1+1=2", "a much longer text than the first one", "up ab: AB!"]
    together = embed_sample(model, texts)
    for text in texts:
        alone = embed_sample(model, [text])
        row = (together.keys == alone.keys[0]).nonzero().item()
        torch.testing.assert_close(together.features[row], alone.features[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.gate[row], alone.gate[0], rtol=1e-5, atol=1e-5)


def test_token_id_batches_padded_on_the_left_are_embedded_as_padded_on_the_right():
    """GPT-2's positions are absolute: rows of a token-id batch padded on the left are embedded (and give the gate
    the features) they give padded on the right or alone, so the decision does not depend on the padding side."""
    from tests.conftest import tiny_gpt2

    model = build(tiny_gpt2())
    lengths = torch.tensor([[6], [3], [4]])
    tokens = torch.arange(5, 23).reshape(3, 6)
    right_mask = (torch.arange(6) < lengths).long()
    left_mask = right_mask.flip(1)
    right_ids = tokens * right_mask
    left_ids = torch.stack([row.roll(6 - int(n)) for row, n in zip(right_ids, lengths, strict=True)])
    right = model.embed_sample({"input_ids": right_ids, "attention_mask": right_mask})
    left = model.embed_sample({"input_ids": left_ids, "attention_mask": left_mask})
    assert torch.equal(right.keys, left.keys)
    torch.testing.assert_close(left.features, right.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left.gate, right.gate, rtol=1e-5, atol=1e-5)
    alone = model.embed_sample({"input_ids": tokens[1:2, :3]})
    row = (left.keys == alone.keys[0]).nonzero().item()
    torch.testing.assert_close(left.features[row], alone.features[0], rtol=1e-5, atol=1e-5)


def test_a_sample_of_no_example_is_refused_by_name():
    """An empty sample's separation is NaN, which the detector read as novel; through add_skill_sample it was refused
    as a backbone overflow (its mean embedding is NaN)."""
    model = build()
    model.add_new_skill(["1+1=2", "2+2=4", "3+3=6", "4+4=8"])
    empty = SkillSample(torch.zeros(0, 32), torch.zeros(0, 32), torch.zeros(0, dtype=torch.long))
    for method in ("separation", "mahalanobis"):
        model.config.novelty.method = method
        with pytest.raises(ValueError, match="holds no example"):
            model.add_skill_sample(empty)
        with pytest.raises(ValueError, match="holds no example"):  # was novel, on a NaN separation
            NoveltyDetector(model.library, model.config.novelty).decide(empty, unit(*[1.0] * 32))
    assert model.num_experts == 1 and len(model.library) == 1


@pytest.mark.parametrize("method", ["mahalanobis", "entropy", "combined"])
def test_methods_reading_router_features_name_the_skills_stored_without_them(method):
    """A skill founded from data embedded with gate=False stores no router features: the methods that read them say
    so by skill, instead of failing on None inside the statistics."""
    model = build()
    model.add_skill_sample(model.embed_sample(["1+1=2", "2+2=4", "3+3=6", "4+4=8"], gate=False), "sums")
    model.config.novelty.method = method
    with pytest.raises(ValueError, match=r"does not hold for skill\(s\) sums .*'separation'"):
        model.add_new_skill(["UP ab: AB!", "UP cd: CD!", "UP ef: EF!"])
    assert model.num_experts == 1


def test_repeated_token_id_rows_are_one_example_as_repeated_texts_are():
    """Text data is deduplicated by content; token-id data was not, so a repeated row weighed several times in the
    decision (and shrank the sample's spread) and took several of the max_examples places."""
    model = build()
    ids = model.tokenizer(["12+3=15"] * 3 + ["4+4=8"], return_tensors="pt", padding=True)
    got = model.embed_sample(dict(ids))
    assert len(got) == 2 and got.keys.unique().numel() == 2
    assert len(model.embed_sample(["12+3=15"] * 3 + ["4+4=8"])) == 2
