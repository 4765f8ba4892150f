"""Novelty detection (spec 3.4): is this data a skill the library already knows?

The detector compares a data embedding with every skill embedding by cosine similarity; below the
threshold for all of them, the data is novel. ``NoveltyResult`` carries the decision and its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .library import SkillLibrary


@dataclass
class NoveltyResult:
    """Outcome of ``DyLoRAMoE.add_new_skill``.

    is_novel: a new skill (and so a new expert) was created.
    skill_id: the new skill, or the known skill the data was recognised as.
    expert_id: the expert that serves ``skill_id``.
    nearest_skill: the most similar known skill before this call (``None`` for an empty library).
    similarity: cosine similarity to ``nearest_skill`` (``None`` for an empty library).
    rank: LoRA rank of the expert.
    """

    is_novel: bool
    skill_id: int
    expert_id: int
    nearest_skill: int | None
    similarity: float | None
    rank: int


class NoveltyDetector:
    def __init__(self, library: SkillLibrary, similarity_threshold: float = 0.9) -> None:
        self.library = library
        self.similarity_threshold = similarity_threshold

    def nearest(self, embedding: Tensor) -> tuple[int | None, float | None]:
        """The most similar known skill and its cosine similarity to ``embedding`` [H]."""
        ids, bank = self.library.get_all_skills()
        if bank is None:
            return None, None
        sims = torch.nn.functional.cosine_similarity(bank, embedding.float().flatten()[None], dim=-1)  # [S]
        best = int(sims.argmax())
        return ids[best], float(sims[best])

    def is_novel(self, embedding: Tensor) -> bool:
        _, similarity = self.nearest(embedding)
        return similarity is None or similarity < self.similarity_threshold
