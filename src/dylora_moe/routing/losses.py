"""Auxiliary router losses: rehearsal cross-entropy (single- or multi-label) and the load-balancing loss (spec 6,
future work)."""

from __future__ import annotations

import torch
from torch import Tensor


def rehearsal_loss(logits: Tensor, columns: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy of gate logits [M, E] against the experts [M] stored examples belong to, or against
    target distributions [M, E] for multi-label rows (an example that needs several experts)."""
    if columns.is_floating_point():
        columns = columns.to(logits.dtype)
    return torch.nn.functional.cross_entropy(logits / temperature, columns)


def load_balancing_loss(logits: Tensor, temperature: float = 1.0, share: Tensor | None = None,
                        rows: Tensor | int | None = None, mask: Tensor | None = None) -> Tensor:
    """Switch Transformer balance loss ``E * sum_e f_e * P_e`` over routing decisions.

    logits: [..., E] gate logits; mask: [...] 1 for the decisions that count (e.g. the real tokens of a padded
    batch under per-token routing), or None for all. f_e is the share of decisions whose top-1 is e, P_e the
    mean softmax probability of e; the loss is 1 when routing is uniform and grows as it collapses onto few
    experts. With ``share`` [E] and ``rows``, the f_e and the number of decisions of a whole batch that
    ``logits`` is a part of (``top1_counts`` over every part): this part's term, ``E * sum_e f_e * (its
    probabilities of e summed) / rows``; the parts' terms add up to the whole batch's loss (f_e has no gradient,
    P_e is linear).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [N, E]
    probs = torch.softmax(flat / temperature, dim=-1)
    weights = _weights(flat, mask).to(probs.dtype)  # [N]
    summed = (probs * weights[:, None]).sum(0)  # [E]
    if share is None:
        rows = weights.sum().clamp_min(1.0)
        share = top1_counts(flat, mask).to(probs.dtype) / rows
    return flat.shape[-1] * (share.to(probs.dtype) * summed).sum() / rows


def top1_counts(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """[E] how many of the routing decisions ``logits`` [..., E] (those where ``mask`` [...] is 1) have each
    expert as their top-1; on the device, without reading it on the host."""
    flat = logits.reshape(-1, logits.shape[-1])  # [N, E]
    one_hot = torch.nn.functional.one_hot(flat.argmax(-1), flat.shape[-1])  # [N, E]
    return (one_hot * _weights(flat, mask).to(one_hot.dtype)[:, None]).sum(0)


def _weights(flat: Tensor, mask: Tensor | None) -> Tensor:
    """[N] 1 for the rows of ``flat`` [N, E] that count."""
    if mask is None:
        return torch.ones(flat.shape[0], dtype=torch.long, device=flat.device)
    return mask.reshape(-1).to(flat.device, torch.long)
