"""The served system: where it lives on disk, the model answering requests, and its atomic replacement.

``dylora serve DIR`` takes a ``dylora train`` output folder (the system in ``DIR/system``, the registry in
``DIR/store.db``, events in ``DIR/events.jsonl``) or a saved system folder directly (no store then).
``swap`` replaces the model (and its routing memory) under ``lock``; readers take the same lock to see a
consistent pair. A swap never changes a model in place: the generation worker keeps a running batch on the
model it started with (static batching holds the lock for each batch instead), so a request runs on one
system from its first token to its last and later requests see the new one.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from ..checkpoint import MANIFEST, holds_writer_lock, load_tensors, recover
from ..model import DyLoRAMoE
from ..store import SkillStore
from ..store.reconcile import reconcile
from ..training.progress import MEMORY, PROGRESS
from ..training.rehearsal import RoutingMemory

logger = logging.getLogger("dylora_moe.serving")


@dataclass
class SystemFiles:
    system: Path  # folder written by save_pretrained
    store: Path | None  # the run's SkillStore (SQLite file), when serving a run folder
    events: Path | None  # the run's events.jsonl

    @classmethod
    def locate(cls, path: str | Path) -> SystemFiles:
        path = Path(path)
        for folder in (path / "system", path):
            recover(folder)
        if (path / "system" / MANIFEST).is_file():
            return cls(path / "system", path / "store.db", path / "events.jsonl")
        if (path / MANIFEST).is_file():
            return cls(path, None, None)
        raise FileNotFoundError(f"{path} is neither a `dylora train` output folder (with system/{MANIFEST}) nor a "
                                f"saved system (with {MANIFEST}): give the folder `dylora train --out` or "
                                "save_pretrained wrote")


class ServedSystem:
    """The model being served, its routing memory (for rehearsal when a skill is learned) and its files.

    Args:
        path: a run folder or a system folder (see ``SystemFiles.locate``).
        overrides: DyLoRAConfig fields replaced at load (``device``, ``dtype``).
    """

    def __init__(self, path: str | Path, **overrides) -> None:
        self.files = SystemFiles.locate(path)
        self.overrides = overrides
        self.lock = threading.RLock()
        self.store = SkillStore(self.files.store) if self.files.store is not None else None
        self.version = 0
        self._model = self.load_model()
        self.memory = self.load_memory()
        if self.store is not None and holds_writer_lock(self.files.system):
            self.reconcile()

    def reconcile(self) -> list[str]:
        """Repair the store where it lags behind the folder (a process killed between a save and its store
        write); only the folder's writer does this, so it never races a writer."""
        changes = reconcile(self.store, self._model, self.files.system)
        for line in changes:
            logger.warning("store reconciled with the system folder: %s", line,
                           extra={"fields": {"event": "store_reconciled", "change": line}})
        return changes

    @property
    def model(self) -> DyLoRAMoE:
        return self._model

    def load_model(self) -> DyLoRAMoE:
        """A fresh copy of the system as saved (which is what is served: every change is saved before its swap)."""
        model = DyLoRAMoE.from_pretrained(self.files.system, **self.overrides).eval()
        if self.files.events is not None:
            model.events.attach_file(self.files.events)
        if self.store is not None:
            model.events.subscribe(self.store.record_event)
        return model

    def load_memory(self) -> RoutingMemory:
        memory = RoutingMemory(per_skill=64)
        if (self.files.system / MEMORY).is_file():
            memory.load_tensors(load_tensors(self.files.system / MEMORY))
        return memory

    def unrehearsable(self) -> list[str]:
        """Skills of the served system with no stored routing features: the gate would forget them."""
        return [f"{s.skill_id} ({s.name})" for s in self.model.library.skills.values()
                if s.skill_id not in self.memory.skills]

    def save(self, model: DyLoRAMoE, memory: RoutingMemory) -> Path:
        """Write ``model`` over the system folder atomically, with its routing memory; a run's progress file
        is carried over so ``dylora train --resume`` still knows the run."""
        progress = self.files.system / PROGRESS

        def extra(folder: Path) -> None:
            save_file(memory.tensors() or {}, str(folder / MEMORY))
            if progress.is_file():
                shutil.copyfile(progress, folder / PROGRESS)

        return model.save_pretrained(self.files.system, extra=extra)

    def swap(self, model: DyLoRAMoE, memory: RoutingMemory) -> None:
        """Serve ``model`` from the next request on; a request in flight finishes on the old one."""
        with self.lock:
            self._model, self.memory = model.eval(), memory
            self.version += 1
