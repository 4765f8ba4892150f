"""Novelty detection (spec 3.4 and 3.3.1): is this data a skill the library already knows?

Methods (``NoveltyConfig.method``):

- ``cosine``: the spec's rule, kept as the reference: cosine similarity of the mean embedding with every
  skill's, novel below ``similarity_threshold``. The threshold is a per-backbone constant.
- ``separation`` (the default): a calibrated two-sample decision on per-example embeddings. For each known
  skill, ``statistics.separation`` estimates how far apart the two means are in units of the within-skill
  variance (0 for two samples of one skill, whatever the sizes) and a permutation test gives its
  significance. The data belongs to a skill when the separation is at most ``granularity`` or is not
  significant at level ``significance``; it is novel when it belongs to none.
- ``mahalanobis``: the same decision in the gate's input space (the router's features), whitened by a
  shrunk within-sample covariance, recomputed for every relabelling the permutation test scores (spec 3.3.1's
  Mahalanobis trigger, on features instead of gradients).
- ``entropy``: spec 3.3.1's router-confidence trigger: novel when the gate's normalised entropy on the new
  data is significantly higher than on the known skills' stored data (a permutation test at
  ``significance``) and exceeds it by more than ``entropy_margin``; the nearest skill is the one the gate
  picks most. With one expert the gate has no entropy, so this method cannot see a second skill.
- ``combined``: novel only when ``separation`` and ``mahalanobis`` both say so.

Mixtures of known skills (``NoveltyConfig.mixtures``): data that needs two known skills at once (a Python
function that runs a SQL query) lies between them and is far from each, so the single-skill decision calls it
novel. With ``mixtures`` on, data the single-skill tests call novel is compared, for every pair of known skills
(a, b), with a reference sample of their mixture: alpha is fitted by least squares so that the mixture of the
two means is closest to the new mean (``statistics.mixture_weight``), and the reference rows are
``alpha * a_i + (1 - alpha) * b_i`` over the skills' stored rows (``statistics.mixture_rows``). The same
``separation`` and permutation test at the same ``granularity`` and ``significance`` decide: the data is a
mixture of (a, b) when it is not separated from that reference; it is novel only when no single skill and no
pair explains it. A mixture creates no expert and is not folded into either skill's sample; the result names
both skills (``NoveltyResult.components``), and the continual loop stores its routing features as multi-label
rows for the gate.

What the test can see: data whose examples are mixtures of known skills' examples in the embedding (on the token
embeddings, ``layer=0``, an example made of one skill's text and another's is embedded exactly as such a
mixture). What it cannot: the composed tasks of ``data/composed.py`` on SmolLM2-135M's final hidden states
are as far from the best pair's mixture as from the nearest single skill (separation about 3 to 4, boundary
0.25), because the wrapper code every composed example shares (``import sqlite3 ... fetchall()``) is a
consistent shift that no known skill has; such data is still novel and gets an expert.

``granularity`` is the knob that decides how different two datasets must be to be separate skills; it is
in the data's own units, so the same value holds across backbones and layers (``benchmarks/novelty.py``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import NoveltyConfig
from . import statistics as st
from .library import SkillLibrary, SkillSample

Router = tuple[torch.nn.Module, list[int]]  # (DynamicHybridRouter, expert id of each gate column)


@dataclass
class NoveltyResult:
    """Outcome of ``DyLoRAMoE.add_new_skill``.

    is_novel: a new skill (and so a new expert) was created.
    skill_id: the new skill, or the known skill the data was recognised as.
    expert_id: the expert that serves ``skill_id``.
    nearest_skill: the closest known skill before this call (``None`` for an empty library).
    similarity: cosine similarity of the mean embeddings to ``nearest_skill`` (``None`` for an empty library).
    rank: LoRA rank of the expert.
    method: the decision rule that decided.
    statistic: the method's statistic against ``nearest_skill`` (cosine similarity, separation, or entropy).
    boundary: where the decision flips on ``statistic`` (threshold, granularity, or entropy margin).
    p_value: significance of the difference from ``nearest_skill`` (calibrated methods; ``None`` otherwise).
    scores: the statistic and p-value against every known skill, by skill id.
    components: the two known skills a mixture was recognised as (``NoveltyConfig.mixtures``), else ``None``;
        ``skill_id`` is then the one with the larger share.
    mixture_weight: the share of ``components[0]`` in the mixture.
    """

    is_novel: bool
    skill_id: int
    expert_id: int
    nearest_skill: int | None
    similarity: float | None
    rank: int
    method: str = "cosine"
    statistic: float | None = None
    boundary: float | None = None
    p_value: float | None = None
    scores: dict[int, dict[str, float]] = field(default_factory=dict)
    components: list[int] | None = None
    mixture_weight: float | None = None

    def __post_init__(self) -> None:
        self.scores = {int(k): v for k, v in self.scores.items()}  # JSON round trips turn keys into strings

    def evidence(self) -> str:
        """The decision's evidence in a few words, e.g. ``separation 0.0120 <= 0.25``."""
        if self.statistic is None:
            return "first skill" if self.nearest_skill is None else f"similarity {self.similarity:.4f}"
        above = self.statistic > self.boundary
        text = f"{self.method} {self.statistic:.4f} {'>' if above else '<='} {self.boundary:g}"
        if self.p_value is not None and above:
            text += f", p={self.p_value:.3f}"
        if self.components:
            a, b = self.components
            text += f", mixture of skills {a} ({self.mixture_weight:.2f}) and {b}"
        return text


@dataclass
class Decision:
    """The detector's verdict before any expert exists for it."""

    is_novel: bool
    nearest_skill: int | None
    statistic: float | None
    boundary: float
    p_value: float | None
    scores: dict[int, dict[str, float]]

    lower_is_novel: bool = False  # cosine: similarity below the threshold is novel
    components: tuple[int, int] | None = None  # a mixture of two known skills (NoveltyConfig.mixtures)
    mixture_weight: float | None = None  # share of components[0]

    @property
    def excess(self) -> float | None:
        """How far beyond the boundary the nearest skill lies, in units of the boundary's own scale (rank
        rule): for cosine, (threshold - similarity) / (1 - threshold); otherwise statistic / boundary - 1."""
        if self.statistic is None or self.nearest_skill is None:
            return None
        if self.lower_is_novel:
            return max(0.0, self.boundary - self.statistic) / max(1e-6, 1.0 - self.boundary)
        return max(0.0, self.statistic - self.boundary) / max(abs(self.boundary), 1e-6)


class NoveltyDetector:
    def __init__(self, library: SkillLibrary, config: NoveltyConfig | None = None) -> None:
        self.library = library
        self.config = config or NoveltyConfig()

    def nearest(self, embedding: Tensor) -> tuple[int | None, float | None]:
        """The skill with the most similar mean embedding and its cosine similarity to ``embedding`` [H]."""
        ids, bank = self.library.get_all_skills()
        if bank is None:
            return None, None
        emb = embedding.float().flatten().to(bank.device)
        sims = torch.nn.functional.cosine_similarity(bank, emb[None], dim=-1)  # [S]
        best = int(sims.argmax())
        return ids[best], float(sims[best])

    def decide(self, sample: SkillSample, embedding: Tensor, router: Router | None = None) -> Decision:
        """Decide on new data given its per-example ``sample`` and its mean unit ``embedding`` [H]; ``router``
        (gate, expert id of each gate column) is needed by ``entropy``. Non-finite embeddings are refused: a NaN
        statistic would read as "not separated" and the rows would poison the skill they joined; so is a sample of no
        example (its statistics are NaN, and it would found a skill of nothing)."""
        if len(sample) == 0:
            raise ValueError("the new data's sample holds no example: embed at least one example (embed_sample) "
                             "before deciding on it (nothing was stored)")
        check_finite(sample, embedding)
        method = self.config.method
        if not self.library.skills:
            boundary = self.config.similarity_threshold if method == "cosine" else self.config.granularity
            return Decision(True, None, None, boundary, None, {})
        if method == "cosine":
            return self._cosine(embedding)
        missing = self.library.missing_samples()
        if missing:
            raise ValueError(
                f"novelty method {method!r} needs per-example embeddings, which the library of this system does not "
                f"hold for skill(s) {', '.join(missing)} (saved by an older dylora-moe): load it with "
                "novelty={'method': 'cosine'} to keep the old decision, or re-add those skills' data")
        if method != "separation":
            self._check_gate_rows()
        if method == "separation":
            return self._two_sample(sample.features, "features", whiten=False)
        if method == "mahalanobis":
            return self._two_sample(self._gate_rows(sample), "gate", whiten=True)
        if method == "entropy":
            return self._entropy(self._gate_rows(sample), router)
        if method == "combined":
            a = self._two_sample(sample.features, "features", whiten=False)
            b = self._two_sample(self._gate_rows(sample), "gate", whiten=True)
            return a if not a.is_novel or b.is_novel else b
        raise ValueError(f"unknown novelty method {method!r}")

    def _check_gate_rows(self) -> None:
        """Refuse a method that reads the router's features when a known skill stores none (its data, or part of
        it, was embedded with ``gate=False``)."""
        lacking = [s.name for s in self.library.skills.values() if s.sample.gate is None]
        if lacking:
            raise ValueError(
                f"novelty method {self.config.method!r} reads the router's features, which the library does not hold "
                f"for skill(s) {', '.join(lacking)} (data embedded with embed_sample(..., gate=False)): use novelty "
                "method 'separation', or embed skill data with its router features (the default)")

    @staticmethod
    def _gate_rows(sample: SkillSample) -> Tensor:
        if sample.gate is None:
            raise ValueError("this novelty method reads the router's features; embed the data with the model")
        return sample.gate

    def _cosine(self, embedding: Tensor) -> Decision:
        ids, bank = self.library.get_all_skills()
        sims = torch.nn.functional.cosine_similarity(bank, embedding.float().flatten().to(bank.device)[None], dim=-1)
        scores = {i: {"statistic": float(s)} for i, s in zip(ids, sims.tolist(), strict=True)}
        best = int(sims.argmax())
        similarity = float(sims[best])
        return Decision(similarity < self.config.similarity_threshold, ids[best], similarity,
                        self.config.similarity_threshold, None, scores, lower_is_novel=True)

    def _two_sample(self, new: Tensor, space: str, *, whiten: bool) -> Decision:
        """Separation and its significance against every known skill (exact when the samples allow few
        relabellings: ``statistics.permutation_pvalue``). New data too small to reach ``significance`` (e.g. one
        example against three) is never called novel; a known skill whose stored sample is the smaller one and too
        small for the test (a skill founded from one example, against 16 new ones) is compared on the separation
        alone, or it would take in any data at all; two single examples are compared on the library's mean
        within-skill spread."""
        cfg = self.config
        new = new.detach().double().cpu()
        new = new[st.canonical_order(new)]
        samples = {i: getattr(s.sample, space).detach().double().cpu() for i, s in self.library.skills.items()}
        single = new.shape[0] == 1 and any(known.shape[0] == 1 for known in samples.values())
        spread = _mean_spread(samples.values()) if single and not whiten else None
        statistic = _statistic(new.shape[1], whiten, spread)
        scores: dict[int, dict[str, float]] = {}
        for skill_id, known in samples.items():
            if new.shape[0] + known.shape[0] < 3 and spread is None:
                raise ValueError(
                    f"the new data and skill {skill_id} hold one example each: there is no spread to compare them "
                    f"by ({cfg.method!r} novelty); give at least 2 examples, or use novelty method 'cosine'")
            value, p_value = self._compare(new, known, statistic)
            scores[skill_id] = {"statistic": value, "p_value": p_value}
        nearest = min(scores, key=lambda i: scores[i]["statistic"])
        same = [i for i, s in scores.items() if self._same(s["statistic"], s["p_value"])]
        if same:
            nearest = min(same, key=lambda i: scores[i]["statistic"])
        best = scores[nearest]
        if not same and cfg.mixtures and len(scores) >= 2:
            mixture = self._mixture(new, space, scores, whiten=whiten)
            if mixture is not None:
                return mixture
        return Decision(not same, nearest, best["statistic"], cfg.granularity, best["p_value"], scores)

    def _compare(self, new: Tensor, known: Tensor, statistic: st.Statistic) -> tuple[float, float]:
        """(separation, p-value) of ``new`` against ``known``; the p-value is 1.0 when the separation is within
        the granularity (only a larger one needs its significance) and 0.0 when ``known`` is the smaller sample
        and too small for the permutation test to reach ``significance`` (the separation alone decides)."""
        cfg = self.config
        gram, ia, ib = st.gram(new, known)
        value = statistic(gram, ia, ib)
        if value <= cfg.granularity:
            return value, 1.0
        if (known.shape[0] < new.shape[0]
                and st.smallest_pvalue(new.shape[0], known.shape[0], cfg.permutations) > cfg.significance):
            return value, 0.0
        return st.permutation_pvalue(gram, ia, ib, statistic, permutations=cfg.permutations)

    def _same(self, value: float, p_value: float) -> bool:
        """Not separated: within the granularity, or beyond it without significance."""
        return value <= self.config.granularity or p_value > self.config.significance

    def _mixture(self, new: Tensor, space: str, scores: dict[int, dict[str, float]], *,
                 whiten: bool) -> Decision | None:
        """The pair of known skills whose mixture explains ``new`` [n, H] (module docstring), or ``None``. Pairs
        are tested in order of their separation; the first one not separated from ``new`` decides. ``scores``
        (the single-skill ones) are kept as the decision's evidence; statistic and p-value are the mixture's."""
        cfg = self.config
        rows = {i: getattr(s.sample, space).detach().double().cpu() for i, s in self.library.skills.items()}
        target = new.mean(0)
        statistic = _statistic(new.shape[1], whiten, None)
        candidates = []
        for a, b in itertools.combinations(sorted(rows), 2):
            alpha = st.mixture_weight(target, rows[a].mean(0), rows[b].mean(0))
            if alpha in (0.0, 1.0):  # the nearest point of the segment is one skill: already compared, and apart
                continue
            reference = st.mixture_rows(rows[a], rows[b], alpha)
            candidates.append((statistic(*st.gram(new, reference)), a, b, alpha, reference))
        for _, a, b, alpha, reference in sorted(candidates, key=lambda c: c[:3]):
            value, p_value = self._compare(new, reference, statistic)
            if self._same(value, p_value):
                main, other, share = (a, b, alpha) if alpha >= 0.5 else (b, a, 1 - alpha)
                return Decision(False, main, value, cfg.granularity, p_value, scores, components=(main, other),
                                mixture_weight=share)
        return None

    def _entropy(self, new: Tensor, router: Router | None) -> Decision:
        if router is None:
            raise ValueError("the entropy method needs the router: call it through DyLoRAMoE.add_new_skill")
        cfg = self.config
        gate, experts = router
        ids = list(self.library.skills)
        known = torch.cat([self.library.skills[i].sample.gate for i in ids])
        device = gate.gate.weight.device
        def probs(rows: Tensor) -> Tensor:  # the gate's full distribution: a sparse router's weights are top-k
            logits = gate(rows.to(device, gate.gate.weight.dtype)).logits
            return torch.softmax(logits.double() / gate.temperature, dim=-1).cpu()  # [n, E]

        with torch.no_grad():
            probs_new, probs_known = probs(new), probs(known)  # [n, E], [M, E]
        h = torch.cat([st.entropy(probs_new), st.entropy(probs_known)])[:, None]  # [n + M, 1]
        n = probs_new.shape[0]
        ia, ib = torch.arange(n), torch.arange(n, h.shape[0])

        def mean_gap(_: Tensor, a: Tensor, b: Tensor) -> float:
            return float(h[a].mean() - h[b].mean())

        excess, p_value = st.permutation_pvalue(h, ia, ib, mean_gap, permutations=cfg.permutations)
        column = int(probs_new.argmax(-1).bincount(minlength=probs_new.shape[-1]).argmax())
        by_expert = {s.expert_id: i for i, s in self.library.skills.items()}
        nearest = by_expert.get(experts[column], ids[0]) if column < len(experts) else ids[0]
        novel = excess > cfg.entropy_margin and p_value <= cfg.significance
        scores = {i: {"statistic": excess, "p_value": p_value} for i in ids}
        return Decision(novel, nearest, excess, cfg.entropy_margin, p_value, scores)


def check_finite(sample: SkillSample, embedding: Tensor) -> None:
    """Raise when the new data's embeddings hold NaN or infinite values (before any skill is founded or joined
    with them)."""
    parts = {"per-example embeddings": sample.features, "router features": sample.gate, "mean embedding": embedding}
    bad = [name for name, t in parts.items() if t is not None and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"the new data's {' and '.join(bad)} hold NaN or infinite values: the backbone's hidden "
                         "states overflowed or the inputs are broken; load the backbone in float32 or bfloat16 (not "
                         "float16) and check the examples, then add the data again (nothing was stored)")


def _statistic(dim: int, whiten: bool, spread: float | None) -> st.Statistic:
    """The separation of a split of the pooled Gram matrix: whitened by the split's own covariance (``mahalanobis``),
    or plain with ``spread`` standing in for two single examples' (``separation``)."""
    if whiten:
        return lambda g, a, b: st.whitened_separation_from_gram(g, a, b, dim)
    return lambda g, a, b: st.separation_from_gram(g, a, b, spread)


def _mean_spread(samples) -> float | None:
    """The mean within-sample spread (mean squared distance from the mean) of the samples with 2+ rows, or
    ``None`` when none has: the scale two single examples are compared on."""
    spreads = [float(((x - x.mean(0)) ** 2).sum(1).sum() / (x.shape[0] - 1)) for x in samples if x.shape[0] > 1]
    return sum(spreads) / len(spreads) if spreads else None
