"""Supervised fitting of the gate on labelled routing features (rehearsal of which skill goes where).

Because the gate reads hidden states that do not depend on the experts (the frozen prefix up to
``route_layer``, or the frozen backbone's final states), its input for a stored example never changes, and
the gate can be fitted as a linear classifier on features computed once: cheap enough to run after every
new skill so that the gate learns the new skill without forgetting where the earlier ones go.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .router import DynamicHybridRouter


def fit_gate(router: DynamicHybridRouter, features: Tensor, columns: Tensor, *, steps: int = 200,
             lr: float = 5e-2, weight_decay: float = 0.0) -> list[float]:
    """Minimise cross-entropy between ``gate(features) / temperature`` [N, E] and target ``columns`` [N].

    Returns the loss per step. Only the gate's parameters change.
    """
    if features.shape[0] != columns.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need one target column per feature row, got {features.shape[0]} and {columns.shape[0]}")
    gate = router.gate
    features = features.to(gate.weight.device, gate.weight.dtype)
    columns = columns.to(gate.weight.device)
    # Standardising makes one learning rate work for hidden states of any scale; folded back afterwards.
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6) if features.shape[0] > 1 else 1.0
    x = (features - mean) / std
    w = (gate.weight.detach() * std).clone().requires_grad_(True)  # [E, H] in standardised units
    b = (gate.bias.detach() + gate.weight.detach() @ mean).clone().requires_grad_(True)  # [E]
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy((x @ w.T + b) / router.temperature, columns)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # read once at the end: a read per step stalls an accelerator
    with torch.no_grad():
        gate.weight.copy_(w / std)
        gate.bias.copy_(b - gate.weight @ mean)
    return torch.stack(losses).tolist()
