"""The skill library (spec 2.2.3): one representative embedding per known skill, and its expert.

Embeddings are stored unit-normalised. When data of a known skill arrives again, its centroid is updated
as the running mean of all the examples seen for it, so recognition sharpens as a skill is revisited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Skill:
    skill_id: int
    name: str
    expert_id: int
    embedding: Tensor  # [H], unit norm
    examples: int


class SkillLibrary:
    def __init__(self) -> None:
        self.skills: dict[int, Skill] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.skills)

    def add_skill(self, embedding: Tensor, *, expert_id: int, name: str | None = None, examples: int = 1) -> Skill:
        skill_id = self._next_id
        self._next_id += 1
        skill = Skill(skill_id, name or f"skill_{skill_id}", expert_id, _unit(embedding), examples)
        self.skills[skill_id] = skill
        return skill

    def update_skill(self, skill_id: int, embedding: Tensor, examples: int) -> Skill:
        """Fold ``examples`` new examples with mean embedding ``embedding`` into the skill's centroid."""
        skill = self.skills[skill_id]
        total = skill.examples + examples
        mixed = (skill.embedding * skill.examples + _unit(embedding) * examples) / total
        skill.embedding, skill.examples = _unit(mixed), total
        return skill

    def remove_expert(self, expert_id: int) -> list[int]:
        """Forget the skills an expert served; returns their ids."""
        gone = [s.skill_id for s in self.skills.values() if s.expert_id == expert_id]
        for skill_id in gone:
            del self.skills[skill_id]
        return gone

    def get_all_skills(self) -> tuple[list[int], Tensor | None]:
        """Skill ids and their stacked embeddings [S, H] (``None`` when the library is empty)."""
        if not self.skills:
            return [], None
        ids = list(self.skills)
        return ids, torch.stack([self.skills[i].embedding for i in ids])

    def state_dict(self) -> dict:
        return {
            "next_id": self._next_id,
            "skills": [
                {"skill_id": s.skill_id, "name": s.name, "expert_id": s.expert_id,
                 "embedding": s.embedding.cpu(), "examples": s.examples}
                for s in self.skills.values()
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self._next_id = state["next_id"]
        self.skills = {s["skill_id"]: Skill(**s) for s in state["skills"]}


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.detach().float().flatten(), dim=0)
