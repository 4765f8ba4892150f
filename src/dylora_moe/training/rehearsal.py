"""The routing memory: stored routing features of each skill's training examples, for gate rehearsal.

The gate reads hidden states that do not depend on the experts, so a stored example's features stay valid
as the pool grows: rehearsing them costs one small matmul per step and no backbone pass.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RoutingMemory:
    """Per skill: the expert it belongs to and up to ``per_skill`` feature rows [N, H]."""

    def __init__(self, per_skill: int = 64, seed: int = 0) -> None:
        self.per_skill = per_skill
        self.seed = seed
        self.skills: dict[int, tuple[int, Tensor]] = {}

    def __len__(self) -> int:
        return sum(f.shape[0] for _, f in self.skills.values())

    def add(self, skill_id: int, expert_id: int, features: Tensor) -> None:
        """Keep a uniform sample of all features seen for the skill, at most ``per_skill`` rows."""
        features = features.detach().float().cpu()
        if skill_id in self.skills:
            features = torch.cat([self.skills[skill_id][1], features])
        if features.shape[0] > self.per_skill:
            # Seeded by what is being sampled, not by a running generator, so a resumed run samples the same.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + skill_id * 1_009 + features.shape[0])
            keep = torch.randperm(features.shape[0], generator=generator)[: self.per_skill].sort().values
            features = features[keep]
        self.skills[skill_id] = (expert_id, features)

    def reassign(self, old_expert: int, new_expert: int) -> None:
        """Rows stored for ``old_expert``'s skills now teach the gate ``new_expert`` (after a merge)."""
        self.skills = {s: (new_expert if e == old_expert else e, f) for s, (e, f) in self.skills.items()}

    def drop_expert(self, expert_id: int) -> None:
        self.skills = {s: v for s, v in self.skills.items() if v[0] != expert_id}

    def batch(self, expert_ids: list[int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor] | None:
        """All stored features [M, H] and their experts' router columns [M]; ``None`` when empty."""
        rows = [(f, expert_ids.index(e)) for e, f in self.skills.values() if e in expert_ids and f.numel()]
        if not rows:
            return None
        features = torch.cat([f for f, _ in rows]).to(device)
        columns = torch.cat([torch.full((f.shape[0],), c, dtype=torch.long) for f, c in rows]).to(device)
        return features, columns

    def tensors(self) -> dict[str, Tensor]:
        """Flat safetensors-ready form: ``skill_<id>_expert_<id>`` -> features."""
        return {f"skill_{s}_expert_{e}": f.contiguous() for s, (e, f) in self.skills.items()}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.skills = {}
        for key, features in tensors.items():
            _, skill, _, expert = key.split("_")
            self.skills[int(skill)] = (int(expert), features)
