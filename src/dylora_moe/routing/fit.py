"""Supervised fitting of the gate on labelled routing features (rehearsal of which skill goes where).

Because the gate reads hidden states that do not depend on the experts (the frozen prefix up to
``route_layer``, or the frozen backbone's final states), its input for a stored example never changes, and
the gate can be fitted as a linear classifier on features computed once: cheap enough to run after every
new skill so that the gate learns the new skill without forgetting where the earlier ones go.

Targets are expert columns (single-label: one skill per example) or target distributions over the columns
(multi-label: an example that needs several skills, e.g. a composed task, spreads its target equally over
their experts). The loss is the cross-entropy against the target either way, so one-hot distributions fit
exactly as columns do; with a soft target the gate learns to give the label set's experts equal weight, which
the cumulative-weight rule of sparse routing (``RouterConfig.cumulative_weight``) turns into top-2 routing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .router import DynamicHybridRouter


def fit_gate(router: DynamicHybridRouter, features: Tensor, columns: Tensor, *, steps: int = 200,
             lr: float = 5e-2, weight_decay: float = 0.0) -> list[float]:
    """Minimise cross-entropy between ``gate(features) / temperature`` [N, E] and the targets: expert
    ``columns`` [N] (int), or target distributions [N, E] (float rows summing to 1, multi-label).

    Returns the loss per step (none, and the gate unchanged, for ``steps=0``). Only the gate's parameters
    change. The fit starts from the gate as it is, unless that fits the targets worse than the uniform gate
    (zero weights): a freshly initialised column's random weights on features far from the origin give logits
    of hundreds, which Adam's steps of ``lr`` cannot undo in ``steps``.
    """
    if features.shape[0] != columns.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need one target column per feature row, got {features.shape[0]} and {columns.shape[0]}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    gate = router.gate
    dtype = torch.promote_types(gate.weight.dtype, torch.float32)  # a bf16 gate is fitted in fp32
    features = features.to(gate.weight.device, dtype)
    columns = check_targets(columns, router.num_experts).to(gate.weight.device)
    if steps == 0:  # no fit: the gate as it is (the uniform restart below is part of a fit)
        return []
    # Standardising makes one learning rate work for hidden states of any scale; folded back afterwards.
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6) if features.shape[0] > 1 else 1.0
    x = (features - mean) / std
    weight, bias = gate.weight.detach().to(dtype), gate.bias.detach().to(dtype)
    w = weight * std  # [E, H] in standardised units
    b = bias + weight @ mean  # [E]

    def fit_loss(w: Tensor, b: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy((x @ w.T + b) / router.temperature, columns)

    with torch.no_grad():  # the gate as it is is a warm start only when it fits better than the uniform gate
        warm = fit_loss(w, b) <= fit_loss(torch.zeros_like(w), torch.zeros_like(b))  # on device: no host sync
        w, b = torch.where(warm, w, 0.0), torch.where(warm, b, 0.0)
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = fit_loss(w, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # read once at the end: a read per step stalls an accelerator
    with torch.no_grad():
        weight = w / std
        gate.weight.copy_(weight)
        gate.bias.copy_(b - weight @ mean)
    return torch.stack(losses).tolist()


def check_targets(targets: Tensor, num_experts: int) -> Tensor:
    """Targets as ``cross_entropy`` takes them: columns [N] (int), or distributions [N, E] in float32."""
    if targets.dim() == 1 and not targets.is_floating_point():
        return targets
    if targets.dim() != 2 or targets.shape[1] != num_experts:
        raise ValueError(f"targets must be columns [N] or distributions [N, {num_experts}], got {tuple(targets.shape)}")
    targets = targets.float()
    if not torch.allclose(targets.sum(1), torch.ones(targets.shape[0], device=targets.device), atol=1e-4):
        raise ValueError("each multi-label target row must sum to 1 (the label set's experts weighted equally)")
    return targets
