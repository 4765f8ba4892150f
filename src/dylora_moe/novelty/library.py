"""The skill library (spec 2.2.3): what the system knows of every skill, and which expert serves it.

Each skill keeps its mean embedding (unit norm: the spec's representative vector, used by the ``cosine``
method and the registry) and a bounded sample of per-example embeddings, in the novelty space (final
hidden states of what the skill produces) and in the gate's input space. The calibrated decisions compare
new data with these samples. When data of a known skill arrives again the samples are merged and cut back
to ``capacity`` rows by a content key, so the kept rows are the same whatever order the data came in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SkillSample:
    """Per-example embeddings of one batch of skill data.

    features: [n, H] novelty-space embeddings (mean of unit-normalised hidden states per example).
    gate: [n, H] what the router reads for each example (its routing features), or ``None``.
    keys: [n] int64 content keys (a hash of each example's text), which order and deduplicate rows.
    """

    features: Tensor
    gate: Tensor | None
    keys: Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def mean(self) -> Tensor:
        return self.features.mean(0)


@dataclass
class Skill:
    skill_id: int
    name: str
    expert_id: int
    embedding: Tensor  # [H], unit norm: mean embedding of every example seen
    examples: int
    sample: SkillSample | None = None  # None only for skills loaded from a library written before samples


class SkillLibrary:
    def __init__(self, capacity: int = 128) -> None:
        self.skills: dict[int, Skill] = {}
        self.capacity = capacity
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.skills)

    def add_skill(self, embedding: Tensor, *, expert_id: int, name: str | None = None, examples: int = 1,
                  sample: SkillSample | None = None) -> Skill:
        skill_id = self._next_id
        self._next_id += 1
        skill = Skill(skill_id, name or f"skill_{skill_id}", expert_id, _unit(embedding), examples,
                      None if sample is None else self._bounded(sample))
        self.skills[skill_id] = skill
        return skill

    def update_skill(self, skill_id: int, embedding: Tensor, examples: int,
                     sample: SkillSample | None = None) -> Skill:
        """Fold ``examples`` new examples with mean embedding ``embedding`` into the skill's centroid, and
        their per-example embeddings into its sample."""
        skill = self.skills[skill_id]
        embedding = embedding.to(skill.embedding.device)
        total = skill.examples + examples
        mixed = (skill.embedding * skill.examples + _unit(embedding) * examples) / total
        skill.embedding, skill.examples = _unit(mixed), total
        if sample is not None:
            skill.sample = self._bounded(sample if skill.sample is None else _concat(skill.sample, sample))
        return skill

    def _bounded(self, sample: SkillSample) -> SkillSample:
        """Deduplicate by key and keep the ``capacity`` rows with the smallest keys (a uniform choice that
        does not depend on arrival order)."""
        _, first = _first_of_each(sample.keys)
        keep = first[: self.capacity]  # unique keys come sorted
        gate = None if sample.gate is None else sample.gate[keep].detach()
        return SkillSample(sample.features[keep].detach().float(), gate, sample.keys[keep])

    def reassign(self, old_expert: int, new_expert: int) -> list[int]:
        """The skills ``old_expert`` served are served by ``new_expert`` (after a merge); returns their ids."""
        moved = [s.skill_id for s in self.skills.values() if s.expert_id == old_expert]
        for skill_id in moved:
            self.skills[skill_id].expert_id = new_expert
        return moved

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

    def state_dict(self) -> tuple[dict, dict[str, Tensor]]:
        """(JSON-able metadata, tensors by name) of the whole library."""
        meta, tensors = {"next_id": self._next_id, "capacity": self.capacity, "skills": []}, {}
        for s in self.skills.values():
            meta["skills"].append({"skill_id": s.skill_id, "name": s.name, "expert_id": s.expert_id,
                                   "examples": s.examples})
            tensors[f"skill_{s.skill_id}"] = s.embedding.detach().cpu().contiguous()
            if s.sample is not None:
                tensors[f"skill_{s.skill_id}.features"] = s.sample.features.cpu().contiguous()
                tensors[f"skill_{s.skill_id}.keys"] = s.sample.keys.cpu().contiguous()
                if s.sample.gate is not None:
                    tensors[f"skill_{s.skill_id}.gate"] = s.sample.gate.detach().cpu().contiguous()
        return meta, tensors

    def load_state_dict(self, meta: dict, tensors: dict[str, Tensor]) -> None:
        """The saved skills; ``capacity`` stays this library's (the system's ``novelty.capacity``, which a load
        may override: the saved metadata's copy of it is not read back)."""
        self._next_id = meta["next_id"]
        self.skills = {}
        for s in meta["skills"]:
            key = f"skill_{s['skill_id']}"
            sample = None
            if f"{key}.features" in tensors:
                sample = SkillSample(tensors[f"{key}.features"], tensors.get(f"{key}.gate"), tensors[f"{key}.keys"])
            self.skills[s["skill_id"]] = Skill(s["skill_id"], s["name"], s["expert_id"], tensors[key],
                                               s["examples"], sample)

    def missing_samples(self) -> list[str]:
        """Names of skills stored without per-example embeddings (libraries written by older versions)."""
        return [s.name for s in self.skills.values() if s.sample is None]


def content_key(text: str) -> int:
    """A stable signed 64-bit key of an example's content (orders and deduplicates library rows)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _concat(a: SkillSample, b: SkillSample) -> SkillSample:
    b_features = b.features.to(a.features.device)
    gate = None if a.gate is None or b.gate is None else torch.cat([a.gate, b.gate.to(a.gate.device)])
    return SkillSample(torch.cat([a.features, b_features.float()]), gate, torch.cat([a.keys, b.keys.to(a.keys.device)]))


def _first_of_each(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Unique keys and the index of the first row holding each."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amin")
    return unique, first


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.detach().float().flatten(), dim=0)
