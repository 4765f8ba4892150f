"""Keeping the pool bounded: which experts are redundant or unused, and merging or pruning them.

- ``closest_pair``: the two experts whose skills are most alike (cosine of their skills' mean library
  embeddings): the merge candidates when the pool is full, or after a recognition was missed (two experts
  learned one skill).
- ``routing_shares``: the share of the routing memory's rows (every stored skill's prompts) that the gate
  sends to each expert, top-1: an expert near zero serves nothing the system has seen.
- ``merge``: two experts become one (``DyLoRAMoE.merge_experts``), their memory rows follow, the gate is
  refitted on the whole memory.
- ``prune``: an unused expert's skills and memory rows move to the expert its skills' prompts are routed to,
  then it is deleted, and the gate is refitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..routing.fit import fit_gate

if TYPE_CHECKING:  # the training package imports this module: a runtime import would be circular
    from ..training.rehearsal import RoutingMemory


def check_share(below: float) -> float:
    """``below`` if it is a routing share a prune can use, else a ValueError naming the range. NaN would prune
    every expert but one (no share compares as ``>=`` it)."""
    if not 0.0 <= below <= 1.0:  # False for NaN too
        raise ValueError(f"prune below={below!r}: give a routing share in [0, 1], e.g. 0.01 for experts the gate "
                         "sends under 1% of the stored prompts (0 prunes nothing, 1 every expert but the most used "
                         "one)")
    return below


def serving_expert(expert_id: int, merges: dict[int, int]) -> int:
    """The expert that serves what ``expert_id`` served, following merges and prunes (old id -> the expert that
    took its skills)."""
    while expert_id in merges:
        expert_id = merges[expert_id]
    return expert_id


def closest_pair(model, exclude: set[int] = frozenset()) -> tuple[int, int, float] | None:
    """``(a, b, cosine)`` of the two experts (not in ``exclude``) whose skills are most alike; ``None`` when
    fewer than two experts serve skills."""
    by_expert: dict[int, list[torch.Tensor]] = {}
    for skill in model.library.skills.values():
        if skill.expert_id not in exclude and skill.expert_id in model.experts.expert_ids:
            by_expert.setdefault(skill.expert_id, []).append(skill.embedding.float())
    ids = sorted(by_expert)
    if len(ids) < 2:
        return None
    centres = F.normalize(torch.stack([torch.stack(by_expert[e]).mean(0) for e in ids]), dim=-1)  # [X, H]
    sims = centres @ centres.T
    sims.fill_diagonal_(-2.0)
    flat = int(sims.argmax())
    i, j = divmod(flat, len(ids))
    return min(ids[i], ids[j]), max(ids[i], ids[j]), float(sims[i, j])


@torch.no_grad()
def routing_shares(model, memory: RoutingMemory) -> dict[int, float]:
    """Share of the memory's rows routed (top-1 of the gate) to each expert of the pool; empty when the memory
    holds no row of the pool's experts (no traffic is known, which is not the same as none)."""
    ids = model.experts.expert_ids
    batch = memory.batch(ids, model.device)
    if batch is None:
        return {}
    features, _ = batch
    chosen = model.router.logits(features).argmax(-1)  # [M]
    counts = torch.bincount(chosen, minlength=len(ids)).tolist()
    return {e: counts[c] / features.shape[0] for c, e in enumerate(ids)}


def refit(model, memory: RoutingMemory, steps: int, weight_decay: float | None = None) -> None:
    """Fit the gate on the memory, penalised as the loop's fits are (``TrainingConfig.router_weight_decay``,
    its default unless ``weight_decay`` is given)."""
    if weight_decay is None:
        from ..training.config import TrainingConfig  # the training package imports this module

        weight_decay = TrainingConfig.router_weight_decay
    batch = memory.batch(model.experts.expert_ids, model.device)
    if batch is not None and steps > 0:
        fit_gate(model.router, *batch, steps=steps, weight_decay=weight_decay)


def merge(model, memory: RoutingMemory, a: int, b: int, *, method: str = "cat", fit_steps: int = 200,
          fit_decay: float | None = None, **kwargs) -> int:
    """Merge experts ``a`` and ``b``; their memory rows follow and the gate is refitted (``refit``). Returns the
    new id."""
    merged = model.merge_experts(a, b, method=method, **kwargs)
    memory.reassign(a, merged)
    memory.reassign(b, merged)
    refit(model, memory, fit_steps, fit_decay)
    return merged


@torch.no_grad()
def prune(model, memory: RoutingMemory, below: float, *, fit_steps: int = 200,
          fit_decay: float | None = None) -> list[tuple[int, int | None]]:
    """Delete every expert the gate sends less than ``below`` of the memory's rows to; each one's skills and
    rows move to the expert its own skills' rows are routed to (``None`` when it has no rows: its skills go
    with it). Returns ``(pruned, now serving its skills)`` pairs; the last expert is never pruned, and a memory
    without rows of the pool's experts prunes nothing (``routing_shares`` is empty: no expert is known unused).
    ``below`` is a share in [0, 1]: 0 prunes nothing, 1 every expert but the most used one."""
    check_share(below)
    shares = routing_shares(model, memory)
    done = []
    for expert_id in sorted(shares, key=shares.get):
        if shares[expert_id] >= below or model.num_experts <= 1:
            break
        rows = [f for e, f in memory.skills.values() if e == expert_id and f.numel()]
        into = None
        if rows:
            logits = model.router.logits(torch.cat(rows).to(model.device))
            logits[:, model.column(expert_id)] = float("-inf")
            votes = torch.bincount(logits.argmax(-1), minlength=model.num_experts)
            into = model.experts.expert_ids[int(votes.argmax())]
            model.library.reassign(expert_id, into)
            memory.reassign(expert_id, into)
        else:
            memory.drop_expert(expert_id)
        model.delete_expert(expert_id)
        done.append((expert_id, into))
    if done:
        refit(model, memory, fit_steps, fit_decay)
    return done
