"""Keeping what the frozen model could do: a KL term from the frozen model to the routed system.

An expert trained on a few dozen examples in one format learns that format and, with it, habits that break
ordinary requests of its domain (an expert fitted to VerilogEval, whose answers start with a newline and
tabs, answers "Write a Verilog module for an AND gate" with newlines). The term below pulls the system's
next-token distribution towards the frozen model's on the tokens of the inputs the expert trains on, so the
expert changes only what the task loss needs; its weight is ``TrainingConfig.kl_weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_to_frozen(logits: Tensor, frozen_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over positions where ``mask`` is 1 of KL(frozen || system) between next-token distributions.

    logits, frozen_logits: [B, T, V]; mask: [B, T] (1 = a position whose prediction counts).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    log_q = torch.log_softmax(frozen_logits.float(), dim=-1)  # [B, T, V]
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)  # [B, T]
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)
