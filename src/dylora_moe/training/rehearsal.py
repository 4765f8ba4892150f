"""The routing memory: stored routing features of each skill's training examples, for gate rehearsal.

The gate reads hidden states that do not depend on the experts, so a stored example's features stay valid
as the pool grows: rehearsing them costs one small matmul per step and no backbone pass.

Rows are single-label (one expert: the skill's) or multi-label (a label set: the experts of the skills a
composed input needs, ``data/composed.py``). A multi-label entry is kept under the negative key
``mixture_key(skill_ids)`` so it never collides with a skill's own rows. While every row is single-label,
``batch`` returns the experts' columns as today; once some row is multi-label it returns soft targets, the
label set's columns weighted equally, which ``routing.fit`` and ``routing.losses`` read as a target
distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Label = int | tuple[int, ...]  # an expert id, or the expert ids a multi-label row needs


def mixture_key(skill_ids: Sequence[int]) -> int:
    """The memory key of rows that need the skills ``skill_ids`` (two skills, ids below 2**20) together."""
    a, b = sorted(skill_ids)
    if a == b or not 0 <= a < b < 2**20:
        raise ValueError(f"a mixture key needs two distinct skill ids in [0, 2**20), got {list(skill_ids)}")
    return -1 - (a << 20 | b)


class RoutingMemory:
    """Per skill (or mixture of skills): the expert(s) it belongs to and up to ``per_skill`` feature rows [N, H]."""

    def __init__(self, per_skill: int = 64, seed: int = 0) -> None:
        self.per_skill = per_skill
        self.seed = seed
        self.skills: dict[int, tuple[Label, Tensor]] = {}

    def __len__(self) -> int:
        return sum(f.shape[0] for _, f in self.skills.values())

    @property
    def multi_label(self) -> bool:
        return any(isinstance(e, tuple) for e, _ in self.skills.values())

    def add(self, skill_id: int, expert_id: int | Sequence[int], features: Tensor) -> None:
        """Add ``features`` to the skill's rows and keep at most ``per_skill`` of them, drawn uniformly from the
        rows kept so far and the new ones, row for row: a returning skill's newest data is favoured over a
        uniform sample of everything it ever sent. ``expert_id`` is one expert, or the experts a multi-label row
        needs (stored as a sorted tuple; one expert stays an int)."""
        label = _label(expert_id)
        features = features.detach().float().cpu()
        if skill_id in self.skills:
            features = torch.cat([self.skills[skill_id][1], features])
        if features.shape[0] > self.per_skill:
            # Seeded by what is being sampled, not by a running generator, so a resumed run samples the same.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + skill_id * 1_009 + features.shape[0])
            keep = torch.randperm(features.shape[0], generator=generator)[: self.per_skill].sort().values
            features = features[keep]
        self.skills[skill_id] = (label, features)

    def reassign(self, old_expert: int, new_expert: int) -> None:
        """Rows stored for ``old_expert``'s skills now teach the gate ``new_expert`` (after a merge)."""
        def moved(label: Label) -> Label:
            if isinstance(label, tuple):
                return _label([new_expert if e == old_expert else e for e in label])
            return new_expert if label == old_expert else label

        self.skills = {s: (moved(e), f) for s, (e, f) in self.skills.items()}

    def drop_expert(self, expert_id: int) -> None:
        """Forget the rows of an expert's skills; multi-label rows keep the rest of their label set."""
        kept = {}
        for s, (e, f) in self.skills.items():
            rest = [x for x in (e if isinstance(e, tuple) else (e,)) if x != expert_id]
            if rest:
                kept[s] = (_label(rest), f)
        self.skills = kept

    def batch(self, expert_ids: list[int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor] | None:
        """All stored features [M, H] and their targets: the experts' router columns [M] while every row is
        single-label, else target distributions [M, E] (a label set's columns weighted equally); ``None`` when
        empty. Experts no longer in ``expert_ids`` are left out of a label set. Rows come in the order of their
        keys (skills by id, then mixtures), not of their arrival: a memory loaded from its file (``load_tensors``,
        whose order is the file's) gives a resumed run the batch, and so the gate fits, of the run it continues."""
        rows = []
        for key in sorted(self.skills, key=lambda k: (k < 0, abs(k))):
            label, f = self.skills[key]
            columns = [expert_ids.index(e) for e in (label if isinstance(label, tuple) else (label,))
                       if e in expert_ids]
            if columns and f.numel():
                rows.append((f, columns))
        if not rows:
            return None
        features = torch.cat([f for f, _ in rows]).to(device)
        if all(len(c) == 1 for _, c in rows) and not self.multi_label:
            columns = torch.cat([torch.full((f.shape[0],), c[0], dtype=torch.long) for f, c in rows]).to(device)
            return features, columns
        targets = torch.zeros(features.shape[0], len(expert_ids))  # [M, E]
        start = 0
        for f, columns in rows:
            targets[start : start + f.shape[0], columns] = 1.0 / len(columns)
            start += f.shape[0]
        return features, targets.to(device)

    def tensors(self) -> dict[str, Tensor]:
        """Flat safetensors-ready form: ``skill_<id>_expert_<id>`` -> features (``<id>-<id>`` for a label set)."""
        def name(label: Label) -> str:
            return "-".join(map(str, label)) if isinstance(label, tuple) else str(label)

        return {f"skill_{s}_expert_{name(e)}": f.contiguous() for s, (e, f) in self.skills.items()}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.skills = {}
        for key, features in tensors.items():
            _, skill, _, expert = key.split("_")
            self.skills[int(skill)] = (_label([int(e) for e in expert.split("-")]), features)


def _label(expert_id: int | Sequence[int]) -> Label:
    if isinstance(expert_id, int):
        return expert_id
    experts = tuple(sorted(set(int(e) for e in expert_id)))
    if not experts:
        raise ValueError("a routing-memory row needs at least one expert")
    return experts[0] if len(experts) == 1 else experts
