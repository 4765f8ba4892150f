"""What a response says about its routing, read from the routing its generation used (no second routing pass).

``describe`` lists every expert of non-zero weight per sequence (the metrics count them all); ``summarise``
keeps what a client needs: dense routing gives every expert some weight, so a response lists at most the
``top`` heaviest experts of weight at least ``min_weight`` (the heaviest always) and sums up the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import DyLoRAMoE
    from ..routing import RouterOutput


def describe(model: DyLoRAMoE, routing: RouterOutput | None, pool_mask: torch.Tensor | None,
             rows: int) -> list[dict]:
    """Per sequence ``{"strategy", "granularity", "experts": [{"expert_id", "skill", "weight"}]}``, heaviest
    first. Per-token routing reports the mean weight over the tokens of ``pool_mask`` [B, T] (the prompt)."""
    granularity = model.config.router.granularity
    if model.num_experts == 0 or routing is None:
        return [{"strategy": "none", "granularity": granularity, "experts": []} for _ in range(rows)]
    weights = routing.weights.float()  # [B, E] or [B, T, E]
    if weights.dim() == 3:
        m = torch.ones(weights.shape[:2], device=weights.device) if pool_mask is None else pool_mask
        m = m.to(weights.dtype).unsqueeze(-1)  # [B, T, 1]
        weights = (weights * m).sum(1) / m.sum(1).clamp(min=1)  # [B, E]
    skills: dict[int, list[str]] = {}
    for s in model.library.skills.values():
        skills.setdefault(s.expert_id, []).append(s.name)
    ids = model.experts.expert_ids
    out = []
    for row in weights.cpu().tolist():  # one copy for the whole batch, once per prefill
        experts = [{"expert_id": ids[c], "skill": ", ".join(skills.get(ids[c], [])) or None, "weight": round(w, 6)}
                   for c, w in enumerate(row) if w > 0]
        experts.sort(key=lambda e: -e["weight"])
        out.append({"strategy": routing.strategy, "granularity": granularity, "experts": experts})
    return out


def summarise(info: dict, top: int, min_weight: float) -> dict:
    """``info`` with at most ``top`` experts of weight >= ``min_weight`` (the heaviest one always); the others
    are counted in ``omitted_experts`` and their weight summed in ``omitted_weight`` (absent when none is)."""
    experts = info["experts"]
    kept = [e for i, e in enumerate(experts) if i == 0 or (i < top and e["weight"] >= min_weight)]
    if len(kept) == len(experts):
        return info
    rest = experts[len(kept):]
    return {**info, "experts": kept, "omitted_experts": len(rest),
            "omitted_weight": round(sum(e["weight"] for e in rest), 6)}


def route_prompt(model: DyLoRAMoE, input_ids: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    """``describe`` of a fresh routing pass over prompts [B, T] (a caller that routes without generating, such
    as the Ray ingress); the worker itself reads the routing of its own generation pass instead."""
    routing = model.route(input_ids, mask) if model.num_experts else None
    return describe(model, routing, mask, input_ids.shape[0])
