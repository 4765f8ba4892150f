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


def load_balancing_loss(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Switch Transformer balance loss ``E * sum_e f_e * P_e`` over routing decisions.

    logits: [..., E] gate logits. f_e is the share of decisions whose top-1 is e, P_e the mean softmax
    probability of e; the loss is 1 when routing is uniform and grows as it collapses onto few experts.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [N, E]
    probs = torch.softmax(flat / temperature, dim=-1)
    share = torch.nn.functional.one_hot(probs.argmax(-1), flat.shape[-1]).float().mean(0)  # [E]
    return flat.shape[-1] * (share * probs.mean(0)).sum()
