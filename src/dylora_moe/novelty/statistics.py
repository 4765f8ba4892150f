"""Two-sample statistics for the novelty decision: pure functions of per-example embeddings.

Every statistic compares a new sample ``a`` [n, H] with a known skill's stored sample ``b`` [m, H] and is
built so that its meaning does not depend on the backbone, the layer or the sample sizes:

- ``separation``: the squared distance between the two population means in units of the within-skill
  variance. The numerator is the unbiased (linear-kernel) MMD², so two samples of one distribution score 0
  on average whatever ``n`` and ``m`` are; the denominator is the mean squared distance of an example from
  its own skill's mean. Translation-invariant, so the common direction that dominates mean-pooled hidden
  states (anisotropy) cancels out, and scale-invariant, so the units are the data's own.
- the same ratio after whitening by a shrunk within-sample covariance (Ledoit-Wolf): a squared Mahalanobis
  distance between the means (the ``mahalanobis`` method), recomputed for every split a permutation test
  scores so that the test stays exact (``whitened_separation_from_gram``).
- ``permutation_pvalue``: how often a random relabelling of the pooled rows scores at least as high as the
  observed split: the significance of any of the statistics above, exact under exchangeability.
- ``mean_entropy`` / ``entropy_pvalue``: the router-confidence trigger.
- ``mixture_weight`` / ``mixture_rows``: the reference sample of a mixture of two known skills, against which
  data that needs both skills at once (a composed task) is compared with the same ``separation``.

Statistics are computed in float64 from a Gram matrix, so a permutation costs O((n + m)²), not O((n + m) H);
the whitened one solves an (n + m) x (n + m) system per permutation, O((n + m)³) (about 1.6 s for 200
permutations of 256 rows on one CPU thread).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

Statistic = Callable[[Tensor, Tensor, Tensor], float]  # (gram [N, N], rows of a, rows of b) -> value


def _blocks(gram: Tensor, ia: Tensor, ib: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return gram[ia][:, ia], gram[ib][:, ib], gram[ia][:, ib]


def _spread(g: Tensor) -> Tensor:
    """Unbiased mean squared distance of a sample's rows from their mean, from its Gram block [k, k] (k >= 2)."""
    k = g.shape[0]
    return (g.diagonal().mean() - g.mean()) * k / (k - 1)


def separation_from_gram(gram: Tensor, ia: Tensor, ib: Tensor, spread: float | None = None) -> float:
    """``separation`` of rows ``ia`` against rows ``ib`` of the pooled Gram matrix. A sample of one example
    has no spread of its own; the other sample's stands in for it, and when both hold one example ``spread``
    does (e.g. the library's typical within-skill spread; without it two single examples cannot be compared)."""
    gaa, gbb, gab = _blocks(gram, ia, ib)
    n, m = gaa.shape[0], gbb.shape[0]
    va = _spread(gaa) if n > 1 else None
    vb = _spread(gbb) if m > 1 else None
    if va is None and vb is None:
        if spread is None:
            raise ValueError("two single examples have no spread to compare them by: give a within-skill spread")
        va = vb = torch.as_tensor(spread, dtype=gram.dtype)
    va = vb if va is None else va
    vb = va if vb is None else vb
    mean_a, mean_b, cross = gaa.mean(), gbb.mean(), gab.mean()  # ||mean_a||², ||mean_b||², <mean_a, mean_b>
    # E||mean_a - mean_b||² = ||mu_a - mu_b||² + va / n + vb / m
    between = mean_a + mean_b - 2 * cross - va / n - vb / m
    return float(between / ((va + vb) / 2).clamp(min=1e-12))


def _check(a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two samples [n, H] and [m, H] of one width, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] + b.shape[0] < 3:
        raise ValueError(f"two samples need at least 3 examples between them, got {a.shape[0]} and {b.shape[0]}")


def gram(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.cat([a, b]).double()  # [N, H]
    x = x - x.mean(0)  # translation changes nothing but keeps the Gram well-conditioned
    n = a.shape[0]
    return x @ x.T, torch.arange(n), torch.arange(n, x.shape[0])


def separation(a: Tensor, b: Tensor) -> float:
    """Squared distance between the means of ``a`` [n, H] and ``b`` [m, H] over the mean within-sample
    variance; 0 in expectation for two samples of one distribution, whatever n and m are."""
    _check(a, b)
    return separation_from_gram(*gram(a, b))


def shrunk_covariance(x: Tensor) -> Tensor:
    """Ledoit-Wolf shrinkage of the covariance of ``x`` [N, H] towards a scaled identity: [H, H]."""
    x = x.double() - x.double().mean(0)
    n, h = x.shape
    sample = x.T @ x / n
    mu = sample.diagonal().mean()
    target = mu * torch.eye(h, dtype=x.dtype, device=x.device)
    delta = ((sample - target) ** 2).sum()
    # beta: how noisy the sample covariance is, (1/n²) Σ_i ||x_i x_iᵀ - S||², expanded to avoid [n, H, H]
    beta = ((x * x).sum(1).pow(2).mean() - (sample**2).sum()) / n
    shrink = float((torch.minimum(beta, delta) / delta.clamp(min=1e-30)).clamp(0, 1))
    return shrink * target + (1 - shrink) * sample


def within_centering(ia: Tensor, ib: Tensor, total: int, device: torch.device | str = "cpu") -> Tensor:
    """C [N, N] with C X = the rows of X [N, H] each less its own sample's mean (samples ``ia`` and ``ib``)."""
    c = torch.eye(total, dtype=torch.float64, device=device)
    for rows in (ia, ib):
        c[rows[:, None], rows[None, :]] -= 1.0 / rows.numel()
    return c


def whitened_gram(gram: Tensor, ia: Tensor, ib: Tensor, dim: int) -> Tensor:
    """The Gram matrix X Σ⁻¹ Xᵀ [N, N] of the pooled rows X [N, H] (``gram`` = X Xᵀ) after whitening by Σ, the
    Ledoit-Wolf shrunk covariance of the rows around their own sample's mean (``shrunk_covariance``'s estimate).

    Computed in the N-dimensional dual by Woodbury, Σ = αI + β XcᵀXc with Xc = C X, so a relabelling costs one
    N x N solve instead of an H x H eigendecomposition: the permutation test recomputes the whitening for every
    split it scores, which keeps it exact (a covariance taken around the observed split's means and reused for
    the relabellings leaves out the direction between the observed means only, and made two samples of one
    distribution "different" at several times the level). Rows with no spread around their means are left
    unwhitened (the separation is then 0 for one point and unbounded for two)."""
    n = gram.shape[0]
    c = within_centering(ia, ib, n, gram.device).to(gram.dtype)
    inner = c @ gram @ c  # Xc Xcᵀ [N, N]
    mu = float(inner.trace()) / (n * dim)  # mean eigenvalue of the covariance S = XcᵀXc / N
    if not mu > 0:
        return gram
    frob = float((inner**2).sum()) / n**2  # ||S||²_F
    delta = frob - mu * mu * dim  # ||S - mu I||²_F
    beta = (float((inner.diagonal() ** 2).mean()) - frob) / n  # (1/N²) Σ_i ||x_i x_iᵀ - S||²_F
    shrink = min(1.0, max(1e-9, beta / delta if delta > 0 else 1.0))
    alpha, scale = shrink * mu, (1 - shrink) / n  # Σ = alpha I + scale XcᵀXc
    cross = gram @ c  # X Xcᵀ [N, N]
    system = alpha * torch.eye(n, dtype=gram.dtype, device=gram.device) + scale * inner
    return (gram - scale * cross @ torch.linalg.solve(system, cross.T)) / alpha


def whitened_separation_from_gram(gram: Tensor, ia: Tensor, ib: Tensor, dim: int) -> float:
    """``separation`` after whitening by the split's own shrunk within-sample covariance (``whitened_gram``):
    the statistic of the ``mahalanobis`` method, for ``permutation_pvalue`` with ``gram`` = X Xᵀ unwhitened."""
    return separation_from_gram(whitened_gram(gram, ia, ib, dim), ia, ib)


def permutation_pvalue(gram: Tensor, ia: Tensor, ib: Tensor, statistic: Statistic = separation_from_gram, *,
                       permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """(observed statistic, p-value) of the split (``ia``, ``ib``) among the relabellings of the pooled rows.
    When there are at most ``permutations`` splits, all of them are scored and p is exact (the share scoring at
    least the observed value, the observed split included); otherwise p is the seeded Monte Carlo estimate
    (hits + 1) / (permutations + 1). Each split is scored on its sorted rows, so one split scores the same
    however it was drawn, and values within rounding (1e-9 relative) of the observed one count as ties."""
    observed = statistic(gram, ia.sort().values, ib.sort().values)
    n, total = ia.numel(), ia.numel() + ib.numel()
    tie = observed - 1e-9 * max(1.0, abs(observed))
    everything = torch.arange(total)
    if math.comb(total, n) <= permutations:
        splits = list(itertools.combinations(range(total), n))
        hits = 0
        for chosen in splits:
            keep = torch.ones(total, dtype=torch.bool)
            keep[list(chosen)] = False
            hits += statistic(gram, torch.tensor(chosen, dtype=torch.long), everything[keep]) >= tie
        return observed, hits / len(splits)
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(permutations):
        perm = torch.randperm(total, generator=generator)
        hits += statistic(gram, perm[:n].sort().values, perm[n:].sort().values) >= tie
    return observed, (hits + 1) / (permutations + 1)


def smallest_pvalue(n: int, m: int, permutations: int) -> float:
    """The smallest p-value ``permutation_pvalue`` can return for samples of ``n`` and ``m`` rows: one split of all
    of them when they are scored exhaustively, else 1 / (permutations + 1)."""
    splits = math.comb(n + m, n)
    return 1.0 / splits if splits <= permutations else 1.0 / (permutations + 1)


def mixture_weight(target: Tensor, mean_a: Tensor, mean_b: Tensor) -> float:
    """alpha in [0, 1] that puts ``alpha * mean_a + (1 - alpha) * mean_b`` closest to ``target`` (all [H]): the
    share of skill ``a`` in data that mixes two skills, by least squares on the segment between their means."""
    direction = (mean_a - mean_b).double()
    norm = float(direction @ direction)
    if norm <= 1e-24:
        return 0.5
    return min(1.0, max(0.0, float((target.double() - mean_b.double()) @ direction) / norm))


def mixture_rows(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """Rows ``alpha * a_(i mod len a) + (1 - alpha) * b_(i mod len b)`` for i < max(len(a), len(b)): a sample
    from examples that each mix the two skills in the share alpha, as an example embedding (a mean over its
    tokens) does when part of its tokens are one skill's and part the other's. Its mean is the mixture of the two
    means; its spread, alpha² var_a + (1 - alpha)² var_b, is below either skill's, so the comparison is no looser
    than against one skill. The smaller sample is cycled rather than the larger one cut: a reference of a
    3-example skill's size would leave the test too weak to reject anything."""
    k = max(a.shape[0], b.shape[0])
    index = torch.arange(k)
    return alpha * a[index % a.shape[0]].double() + (1 - alpha) * b[index % b.shape[0]].double()  # [k, H]


def canonical_order(x: Tensor) -> Tensor:
    """Row indices of ``x`` [N, H] sorted by a fixed projection, so that seeded permutation tests do not
    depend on the order the examples arrived in."""
    generator = torch.Generator().manual_seed(1234)
    direction = torch.randn(x.shape[1], generator=generator, dtype=torch.float64)
    return torch.argsort(x.double().cpu() @ direction)


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row of ``probs`` [N, E], normalised by log E to [0, 1] (E >= 2)."""
    e = probs.shape[-1]
    h = -(probs.clamp(min=1e-12).log() * probs).sum(-1)
    return h / math.log(e) if e > 1 else torch.zeros_like(h)
