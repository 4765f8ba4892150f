"""Sorting unlabelled, mixed data into skills (streams without skill boundaries).

A chunk of a mixed stream holds examples of several skills, some perhaps never seen. Every example is scored
against the skills the library knows, with a statistic calibrated on the library's own stored examples:

1. **Per-example novelty** (a nearest-neighbour two-sample score): among the library's stored rows and the
   pool of unlabelled rows (the chunk and the novelty buffer), a row's score is the share of its
   ``neighbours`` nearest rows (cosine, after centring) that are pool rows. A row of a known skill sits among
   that skill's library rows as a library row does, so its score is distributed like theirs; rows of a new
   skill sit among each other. The conformal p-value of a row is the share of library rows that score at
   least as high (``conformal_pvalues``): under "this row is of a known skill" it is (nearly) uniform, so
   ``example_significance`` is about the share of known-skill rows sent to the buffer.
2. **Assignment**: a row that is not novel at ``example_significance`` goes to the known skill most common
   among its nearest library rows; a novel row waits in the novelty buffer.
3. **Growing**: the buffer founds a new skill when (a) the pool holds more novel rows than chance allows (a
   binomial tail at the detector's ``significance`` over the rows screened while they waited:
   ``binomial_tail``); (b) after refining the group (a regularised (K+1)-class softmax classifier, cross-fitted
   over the pool, with the candidates as the new class, so that known-skill rows that strayed into the
   buffer return to their skills and the new skill's rows missed at step 1 join it) at least ``min_group``
   rows remain; and (c) the group is a different skill from every known one by the detector's own two-sample
   decision (``NoveltyDetector.decide``; a group that turns out to be a known skill joins it). The rest of the
   pool is then re-sorted with the new skill among the known ones.

The library's stored rows change only when a skill is founded or joined by a group: rows sorted one by one
do not update them, so a new skill's examples that slipped into an old skill cannot widen it until the new
skill can no longer be told apart. At most one group is founded per chunk, and two new skills waiting in the
buffer at once found one expert together (a limitation: later chunks cannot split it). Everything runs in
float64 on the CPU, like the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import NoveltyConfig
from .detector import NoveltyResult
from .library import SkillLibrary, SkillSample


def fit_softmax(x: Tensor, y: Tensor, classes: int, *, weight_decay: float, steps: int = 100) -> tuple[Tensor, Tensor]:
    """A multinomial logistic regression on rows ``x`` [N, H] with labels ``y`` [N], L2-regularised by
    ``weight_decay``; returns (weight [H, C], bias [C]). Deterministic (L-BFGS from zeros)."""
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def fit_classifier(x: Tensor, y: Tensor, classes: int, *, weight_decay: float) -> Callable[[Tensor], Tensor]:
    """``fit_softmax`` on standardised rows (one scale for all features, so the penalty means the same on any
    backbone); returns a function of new rows [n, H] -> class probabilities [n, C]."""
    mean = x.mean(0)
    scale = (x - mean).pow(2).mean().sqrt().clamp(min=1e-12)
    weight, bias = fit_softmax((x - mean) / scale, y, classes, weight_decay=weight_decay)
    return lambda rows: torch.softmax((rows.to(x.dtype) - mean) / scale @ weight + bias, -1)


def conformal_pvalues(scores: Tensor, reference: Tensor) -> Tensor:
    """p-value of each of ``scores`` [n] against ``reference`` [m] (higher = more unusual):
    (1 + #{reference >= score}) / (m + 1)."""
    at_least = (reference[None, :] >= scores[:, None]).sum(1)
    return (at_least + 1).double() / (reference.numel() + 1)


def binomial_tail(count: int, trials: int, rate: float) -> float:
    """P(X >= count) for X ~ Binomial(trials, rate), summed in log space (the binomial coefficients of a few
    thousand trials overflow a float)."""
    if count <= 0:
        return 1.0
    if count > trials or rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return 1.0
    log_rate, log_rest, log_all = math.log(rate), math.log1p(-rate), math.lgamma(trials + 1)
    terms = torch.tensor([log_all - math.lgamma(i + 1) - math.lgamma(trials - i + 1) + i * log_rate
                          + (trials - i) * log_rest for i in range(count, trials + 1)], dtype=torch.float64)
    return min(1.0, float(torch.logsumexp(terms, 0).exp()))


def smallest_library(example_significance: float) -> int:
    """The fewest stored rows with which a conformal p-value, at least 1 / (rows + 1), can reach
    ``example_significance``: a library with fewer can never flag a row as novel."""
    return math.ceil(1.0 / example_significance - 1.0 - 1e-9)


def score_parts(counts: list[int], stored: list[int], k: int, significance: float) -> int:
    """The fewest parts to split a pool into (each skill's ``counts`` pool rows spread evenly; ``stored`` rows of
    it in the library) so that the expected share of library rows whose ``k`` nearest neighbours are all pool
    rows stays below ``significance - 1 / (m + 1)``: the room a pool row with a full share (a new skill's) needs
    to reach ``significance``. A stored row of skill j has each neighbour in the pool with probability about
    n_j / (n_j + s_j) (its skill's rows are exchangeable), so all k with about that to the power k. At most as many
    parts as leave every skill no more pool rows than stored ones."""
    m = sum(stored)
    room = significance - 1.0 / (m + 1)
    most = max(1, *(math.ceil(c / s) for c, s in zip(counts, stored, strict=True)))
    for parts in range(1, most):
        full = sum(s / m * (c / parts / (c / parts + s)) ** k for c, s in zip(counts, stored, strict=True) if c)
        if full < room:
            return parts
    return most


@dataclass
class Scores:
    """Per-row verdicts on a pool of unlabelled rows against the known skills.

    p_values: [n] conformal p-value of "this row belongs to a known skill".
    nearest: [n] index (into the known skills' order) of the most likely known skill.
    """

    p_values: Tensor
    nearest: Tensor


def centred_cosine(x: Tensor) -> Tensor:
    """Cosine similarities [N, N] of the rows of ``x`` [N, H] after removing their mean (the common direction of
    mean-pooled hidden states), with -inf on the diagonal so that no row is its own neighbour."""
    z = torch.nn.functional.normalize(x.double() - x.double().mean(0), dim=1)
    sims = z @ z.T
    sims.fill_diagonal_(-float("inf"))
    return sims


def knn_scores(known: list[Tensor], pool: Tensor, *, k: int = 5) -> Scores:
    """Score ``pool`` rows by their neighbourhoods: the share of a row's ``k`` nearest neighbours (cosine,
    after centring) that are pool rows, among the library's rows and the pool's. A row of a known skill has
    about the same share as a library row of that skill; the conformal p-value compares it with the library
    rows' shares. ``nearest``: the known skill most common among a row's neighbours in the library alone."""
    library = torch.cat(known).double()
    labels = torch.cat([torch.full((r.shape[0],), i) for i, r in enumerate(known)])
    sims = centred_cosine(torch.cat([library, pool.double()]))  # [N, N]
    m = library.shape[0]
    neighbours = sims.topk(min(k, sims.shape[0] - 1), dim=1).indices  # [N, k] (fewer rows than k: all others)
    share = (neighbours >= m).double().mean(1)  # [N]
    in_library = sims[m:, :m].topk(min(k, m), dim=1).indices  # [n, k]
    votes = torch.nn.functional.one_hot(labels[in_library], len(known)).sum(1)  # [n, K]
    return Scores(conformal_pvalues(share[m:], share[:m]), votes.argmax(-1))


def components(x: Tensor, *, k: int) -> list[Tensor]:
    """Groups of rows of ``x`` [n, H] linked by mutual nearest neighbours (each among the other's ``k`` nearest,
    cosine after centring), largest first: rows of one skill link up, two skills rarely do."""
    n = x.shape[0]
    if n < 2:
        return [torch.arange(n)]
    sims = centred_cosine(x)
    near = torch.zeros(n, n, dtype=torch.bool)
    near.scatter_(1, sims.topk(min(k, n - 1), dim=1).indices, True)
    mutual = near & near.T
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in mutual.nonzero().tolist():
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted((torch.tensor(g) for g in groups.values()), key=lambda g: (-g.numel(), int(g[0])))


def refine_group(known: list[Tensor], pool: Tensor, members: Tensor, *, weight_decay: float,
                 rounds: int = 2) -> Tensor:
    """Refine a candidate new group ``members`` [n] (bool) of ``pool`` [n, H]: a (K+1)-class classifier with
    the known skills' rows and the group as the new class, cross-fitted over the pool, re-assigns every pool
    row; repeated ``rounds`` times. Returns the refined membership [n] (bool)."""
    k, n = len(known), pool.shape[0]
    pool = pool.double()
    x = torch.cat([*(r.double() for r in known), pool])  # [M + n, H]
    y = torch.cat([torch.full((r.shape[0],), i) for i, r in enumerate(known)] + [torch.full((n,), k)])
    in_library = torch.ones(x.shape[0] - n, dtype=torch.bool)
    fold = torch.arange(n) % 2
    for _ in range(rounds):
        if not members.any():
            break
        # the pool's rows are scored by classifiers fitted on the library and the other fold of the group
        probs = torch.zeros(n, k + 1, dtype=torch.float64)  # a fold whose other half has no member stays known
        for f in (0, 1):
            train = torch.cat([in_library, members & (fold != f)])
            if train[-n:].any():
                fitted = fit_classifier(x[train], y[train], k + 1, weight_decay=weight_decay)
                probs[fold == f] = fitted(pool[fold == f])
        members = probs.argmax(-1) == k
    return members


@dataclass
class Waiting:
    """One row of the novelty buffer: its embedding row, its payload (the example) and when it arrived."""

    features: Tensor  # [H]
    gate: Tensor | None  # [H]
    key: int
    item: object
    chunk: int


@dataclass
class ChunkSort:
    """How one chunk was sorted.

    assigned: skill id -> the items assigned to it in this chunk (known skills and a skill founded now).
    founded: the skills founded by this chunk.
    waiting: items in the novelty buffer after the chunk; ``dropped``: items the full buffer let go.
    candidates: rows of the pool (buffer + chunk) novel at ``example_significance``; ``screened``: rows
    screened since the oldest waiting row arrived; ``tail``: the binomial tail of the candidates' count.
    """

    assigned: dict[int, list]
    founded: list[int]
    waiting: int
    dropped: int
    candidates: int
    screened: int
    tail: float


class SkillSorter:
    """Sorts chunks of unlabelled examples into the library's skills and founds new skills from the buffer.

    Args:
        library: the known skills (their stored per-example rows are the classifier's labelled data).
        config: ``NoveltyConfig`` (``example_significance``, ``min_group``, ``buffer_capacity``,
            ``sort_weight_decay``, and the detector's ``significance``).
        found: ``found(sample, name) -> NoveltyResult``: the detector's decision on a candidate group, which
            creates the skill (and its expert) when the group is novel, or folds it into the known skill it is
            (``DyLoRAMoE.add_skill_sample``).
    """

    def __init__(self, library: SkillLibrary, config: NoveltyConfig,
                 found: Callable[[SkillSample, str], NoveltyResult]) -> None:
        self.library = library
        self.config = config
        self.found = found
        self.buffer: list[Waiting] = []
        self.sizes: dict[int, int] = {}  # chunk index -> rows screened in it (for the count test)

    def sort(self, chunk: int, items: list, sample: SkillSample, keys: list[int], name: str | None = None) -> ChunkSort:
        """Sort one chunk: ``items`` (any payload, e.g. examples), their embedded ``sample`` (rows by content
        key, as ``embed_sample`` returns them) and each item's content key."""
        cfg = self.config
        row_of = {int(k): i for i, k in enumerate(sample.keys.tolist())}
        missing = [i for i, k in enumerate(keys) if k not in row_of]
        if missing:
            raise ValueError(f"{len(missing)} item(s) of chunk {chunk} have no embedded row: embed every item "
                             "(NoveltyConfig.max_examples >= the chunk size) with its full text")
        fresh = [Waiting(sample.features[row_of[k]], None if sample.gate is None else sample.gate[row_of[k]], k, item,
                         chunk) for item, k in zip(items, keys, strict=True)]
        self.sizes[chunk] = len(fresh)
        pool = sorted(self.buffer + fresh, key=lambda w: w.key)  # folds and decisions do not depend on order
        grouped: dict[int, list[Waiting]] = {}  # rows the detector placed as a group (library already updated)
        candidates, nearest = self._score(pool)
        screened = sum(n for c, n in self.sizes.items() if c >= min(w.chunk for w in pool))
        count = int(candidates.sum())
        tail = binomial_tail(count, screened, cfg.example_significance) if self.library.skills else 0.0
        founded: list[int] = []
        # The first skill is founded only from enough rows for the library to flag later rows at all (rows sorted
        # into a skill do not enter the library, so a smaller first skill would leave the sorter blind for good).
        first = max(cfg.min_group, smallest_library(cfg.example_significance))
        if count > 1 and tail <= cfg.significance and (self.library.skills or count >= first):
            pool_rows = self._rows(pool)
            group = candidates
            if self.library.skills:
                group = refine_group(self._known()[1], pool_rows, candidates, weight_decay=cfg.sort_weight_decay)
            index = group.nonzero().flatten()
            parts = components(pool_rows[index], k=cfg.neighbours) if index.numel() else []
            taken = torch.zeros(len(pool), dtype=torch.bool)
            for part in parts:  # largest first; a part that is a skill known by now joins it
                if part.numel() < (cfg.min_group if self.library.skills else first):
                    break
                rows = index[part]
                members = [pool[r] for r in rows.tolist()]
                result = self.found(self._sample(members), name or f"chunk{chunk}")
                grouped.setdefault(result.skill_id, []).extend(members)
                taken[rows] = True
                if result.is_novel:
                    founded.append(result.skill_id)
            if taken.any():
                pool = [w for w, t in zip(pool, taken.tolist(), strict=True) if not t]
                candidates, nearest = self._score(pool)
        sorted_rows: dict[int, list[Waiting]] = {}
        waiting = pool if not self.library.skills else []
        if self.library.skills:
            for w, novel, skill_id in zip(pool, candidates.tolist(), nearest, strict=True):
                if novel:
                    waiting.append(w)
                else:
                    sorted_rows.setdefault(skill_id, []).append(w)
        assigned: dict[int, list] = {}
        for source in (grouped, sorted_rows):
            for skill_id, rows in source.items():
                assigned.setdefault(skill_id, []).extend(w.item for w in rows)
        waiting.sort(key=lambda w: (w.chunk, w.key))
        dropped = max(0, len(waiting) - cfg.buffer_capacity)
        self.buffer = waiting[dropped:]  # the oldest rows go first
        live = {w.chunk for w in self.buffer}
        self.sizes = {c: n for c, n in self.sizes.items() if live and c >= min(live)}
        return ChunkSort(assigned, founded, len(self.buffer), dropped, count, screened, tail)

    # ------------------------------------------------------------------ helpers
    def _known(self) -> tuple[list[int], list[Tensor]]:
        """Known skill ids and their stored rows, in one order."""
        ids = list(self.library.skills)
        return ids, [self.library.skills[i].sample.features.double() for i in ids]

    @staticmethod
    def _rows(pool: list[Waiting]) -> Tensor:
        return torch.stack([w.features for w in pool]).double()  # [n, H]

    def _score(self, pool: list[Waiting]) -> tuple[Tensor, list[int | None]]:
        """Novel rows of ``pool`` [n] (bool) and the nearest known skill id of every row (``None`` while the
        library is empty, when every row is novel).

        The library rows' neighbour shares calibrate the pool's, but when a known skill has many more pool rows
        than stored rows, its stored rows' neighbours are mostly pool rows too: many of their shares reach 1,
        and a new skill's rows, at 1 as well, can no longer be told from them. So the pool is scored in the
        fewest interleaved parts (``score_parts``) for which a row whose neighbours are all pool rows can still
        reach ``example_significance``: one part, the whole pool, unless a skill's pool rows outnumber its
        stored rows by far (a chunk several times the library's sample)."""
        if not self.library.skills:
            return torch.ones(len(pool), dtype=torch.bool), [None] * len(pool)
        if not pool:
            return torch.zeros(0, dtype=torch.bool), []
        ids, known = self._known()
        rows, k = self._rows(pool), self.config.neighbours
        scores = knn_scores(known, rows, k=k)
        nearest = scores.nearest
        counts = torch.bincount(nearest, minlength=len(known)).tolist()
        parts = score_parts(counts, [r.shape[0] for r in known], k, self.config.example_significance)
        if parts > 1:  # row i of skill j (in pool order) goes to part (its rank among skill j's rows) mod parts
            rank = torch.zeros(len(pool), dtype=torch.long)
            for j in range(len(known)):
                members = (nearest == j).nonzero().flatten()
                rank[members] = torch.arange(members.numel())
            part = rank % parts
            p_values = torch.empty(len(pool), dtype=torch.float64)
            for b in range(parts):
                chosen = (part == b).nonzero().flatten()
                p_values[chosen] = knn_scores(known, rows[chosen], k=k).p_values
            scores = Scores(p_values, nearest)
        return scores.p_values <= self.config.example_significance, [ids[i] for i in nearest.tolist()]

    @staticmethod
    def _sample(rows: list[Waiting]) -> SkillSample:
        gate = None if any(w.gate is None for w in rows) else torch.stack([w.gate for w in rows])
        return SkillSample(torch.stack([w.features for w in rows]), gate,
                           torch.tensor([w.key for w in rows], dtype=torch.long))
