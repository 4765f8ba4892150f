"""Bring the registry back in line with the system folder, which is the truth: every change is saved to the
folder first and mirrored into the store afterwards, so a process killed (or a database that failed) between
the two leaves the store behind. ``reconcile`` repairs that at start-up:

- a skill or expert on disk but not in the store is registered (``training`` says ``reconciled``, with a merged
  expert's ``merged_from`` and method, which the folder's manifest keeps; the examples it was trained on are
  not recoverable from the folder, so its data history stays empty),
- an expert whose maturity differs is updated,
- an expert row whose weights are no longer in the folder is removed (its skill and data rows stay).
"""

from __future__ import annotations

import json
from pathlib import Path

from .store import SkillStore


def reconcile(store: SkillStore, model, system: str | Path) -> list[str]:
    """Make ``store`` describe ``model`` (a ``DyLoRAMoE`` loaded from the folder ``system``); returns one line
    per change made (empty when they already agreed)."""
    system = Path(system)
    changes: list[str] = []
    known_skills = {row.skill_id: row for row in store.skills()}
    for skill in model.library.skills.values():
        if skill.skill_id not in known_skills:
            store.add_skill(skill.skill_id, skill.name, skill.embedding.float().cpu().numpy())
            changes.append(f"registered skill {skill.skill_id} ({skill.name}), found in the system folder only")

    on_disk = set(model.experts.expert_ids)
    rows = {row.expert_id: row for row in store.experts()}
    for expert_id in model.experts.expert_ids:
        maturity = int(model.router.expert_maturity[model.column(expert_id)])
        row = rows.get(expert_id)
        if row is not None and row.maturity_state == maturity:
            continue
        skill_id = next((s.skill_id for s in model.library.skills.values() if s.expert_id == expert_id), None)
        name = f"expert_{expert_id}"
        config = model.experts.peft_model.peft_config[name].to_dict()
        store.register_expert(
            expert_id, skill_id=skill_id, lora_config=json.loads(json.dumps(config, default=str)),
            storage_path=str(system / "experts" / name), rank=model.experts.ranks[expert_id],
            maturity_state=maturity, training={"source": "reconciled", **model.experts.lineage.get(expert_id, {})})
        changes.append(f"registered expert {expert_id}, found in the system folder only" if row is None else
                       f"expert {expert_id}: maturity {row.maturity_state} -> {maturity} as in the system folder")
    for expert_id in sorted(set(rows) - on_disk):
        store.delete_expert(expert_id)
        changes.append(f"removed expert {expert_id} from the registry: its weights are not in the system folder "
                       "(its skill and data stay)")
    return changes
