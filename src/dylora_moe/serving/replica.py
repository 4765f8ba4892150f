"""The system a Ray generation replica serves: the whole frozen backbone, and only the experts it was asked for.

Experts are loaded by id from the system folder when a request needs them and dropped when Ray Serve's
multiplexing evicts them (LRU, ``max_num_models_per_replica``). The gate keeps the rows of the resident experts,
in their order; a request is only sent here with every expert its routing selects resident (one expert under
top-1, the top-k set under top-k, every expert while the router is dense), and the top-k of a subset that holds
the selected experts is the same set with the same weights, so the replica routes each prompt exactly as the
whole system would. ``ReplicaSystem`` stands where ``dylora serve`` has its ``ServedSystem`` (``model``,
``lock``), so the single-process generation ``Engine`` runs unchanged on it.

Everything it holds comes from one version of the folder (see ``snapshot.py``). A request for another
version makes the replica read the folder again; when the folder is not at the requested version (a save came
in between) the replica raises ``StaleVersion`` and the ingress routes the request again on the new version.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

from ..checkpoint import reading
from ..config import DyLoRAConfig
from ..model import DyLoRAMoE
from ..novelty import SkillLibrary
from .snapshot import Snapshot, expert_digests, read_snapshot
from .system import SystemFiles

logger = logging.getLogger("dylora_moe.serving")


class StaleVersion(RuntimeError):
    """The system folder is no longer at the version a request was routed on: route it again."""


class ExpertSet:
    """Experts held for one multiplexed model id (``version:ids``); Ray Serve calls ``__del__`` on eviction."""

    def __init__(self, system: ReplicaSystem, version: str, expert_ids: tuple[int, ...], epoch: int) -> None:
        self.system, self.version, self.expert_ids, self.epoch = system, version, expert_ids, epoch
        self._released = False

    def release(self) -> None:
        if not self._released:  # Ray's eviction calls __del__, and the garbage collector may call it again
            self._released = True
            self.system.release(self)

    def __del__(self) -> None:
        self.release()


class ReplicaSystem:
    """A backbone with the experts that requests asked for, and their gate rows.

    Args:
        path: a run folder or a system folder (see ``SystemFiles.locate``).
        overrides: DyLoRAConfig fields replaced at load (``device``, ``dtype``).
    """

    def __init__(self, path: str | Path, **overrides) -> None:
        self.files = SystemFiles.locate(path)
        self.lock = threading.RLock()  # the Engine holds it for a whole batch: loads and evictions wait
        self.snapshot = read_snapshot(self.files.system)
        config = DyLoRAConfig.from_dict({**self.snapshot.manifest["config"], **overrides})
        self._model = DyLoRAMoE.from_config(config).eval()
        self.epoch = 0  # bumped when the replica moves to another version: older holds are void
        self.held: Counter[int] = Counter()  # expert id -> multiplexed model ids holding it
        self.in_use: Counter[int] = Counter()  # expert id -> requests generating with it
        self._counts = threading.Lock()  # guards held and in_use
        self._load_state()

    @property
    def model(self) -> DyLoRAMoE:
        return self._model

    @property
    def version(self) -> str:
        return self.snapshot.version

    @property
    def resident(self) -> list[int]:
        return list(self._model.experts.expert_ids)

    # ------------------------------------------------------------------ holding experts
    def hold(self, version: str, expert_ids: tuple[int, ...]) -> ExpertSet:
        """Make ``expert_ids`` of ``version`` resident and keep them until the returned set is released."""
        with self.lock:
            if version != self.version:
                self._switch()
                if version != self.version:
                    raise StaleVersion(f"asked for version {version}, the folder holds {self.version}")
            unknown = set(expert_ids) - set(self.snapshot.expert_ids)
            if unknown:
                raise ValueError(f"version {version} has no expert(s) {sorted(unknown)}")
            for expert_id in expert_ids:
                if expert_id not in self._model.experts.ranks:
                    self._load_expert(expert_id)
            with self._counts:
                self.held.update(expert_ids)
            self._collect()  # experts kept from an older version that this one's requests have not asked for
            self._sync_router()
            logger.info("experts held", extra={"fields": {"event": "experts_held", "version": version,
                                                          "experts": list(expert_ids), "resident": self.resident}})
            return ExpertSet(self, version, tuple(expert_ids), self.epoch)

    def release(self, experts: ExpertSet) -> None:
        with self.lock:
            if experts.epoch == self.epoch:
                with self._counts:
                    self.held.subtract(experts.expert_ids)
                self._collect()

    def current(self, experts: ExpertSet) -> bool:
        """Whether a held set still belongs to the served version (a newer one may have replaced it)."""
        return experts.epoch == self.epoch

    def using_enter(self, experts: ExpertSet) -> None:
        """A request starts generating with ``experts``: they stay resident even if Ray evicts their set
        meanwhile. Counted under a lock of its own, never held during a batch, so the event loop never waits."""
        with self._counts:
            if experts.epoch == self.epoch:
                self.in_use.update(experts.expert_ids)

    def using_exit(self, experts: ExpertSet) -> bool:
        """The request finished; True when some resident expert is now idle (``collect`` drops it)."""
        with self._counts:
            if experts.epoch == self.epoch:
                self.in_use.subtract(experts.expert_ids)
            return any(self.held[e] <= 0 and self.in_use[e] <= 0 for e in self.resident)

    def collect(self) -> None:
        with self.lock:
            self._collect()

    # ------------------------------------------------------------------ state
    def _switch(self) -> None:
        snapshot = read_snapshot(self.files.system)
        if snapshot.version == self.version:
            return
        for expert_id in self.resident:  # a retrained (or deleted) expert is read again on demand; others stay
            if expert_digests(snapshot, expert_id, saved=True) != expert_digests(self.snapshot, expert_id, saved=True):
                self._model.experts.delete_expert(expert_id)
        self.snapshot = snapshot
        with self._counts:
            self.epoch += 1
            self.held.clear()
            self.in_use.clear()
        self._load_state()
        logger.info("system version picked up", extra={"fields": {"event": "version_switch",
                                                                  "version": snapshot.version}})

    def _load_state(self) -> None:
        library = SkillLibrary(self._model.config.novelty.capacity)
        library.load_state_dict(self.snapshot.library, self.snapshot.library_tensors)
        self._model.library = library
        self._sync_router()

    def _load_expert(self, expert_id: int) -> None:
        snapshot: Snapshot = self.snapshot
        with reading(snapshot.folder):
            current = expert_digests(snapshot, expert_id)
            if any(snapshot.digests[f] != d for f, d in current.items()):
                raise StaleVersion(f"expert {expert_id} changed on disk since version {snapshot.version}")
            rank = snapshot.manifest["ranks"][str(expert_id)]
            self._model.experts.load_expert(expert_id, str(snapshot.expert_folder(expert_id)), rank)

    def _collect(self) -> None:
        """Drop experts that no multiplexed id holds and no request uses."""
        with self._counts:
            idle = [e for e in self.resident if self.held[e] <= 0 and self.in_use[e] <= 0]
        for expert_id in idle:
            self._model.experts.delete_expert(expert_id)
        if idle:
            self._sync_router()
            logger.info("experts evicted", extra={"fields": {"event": "experts_evicted", "experts": idle,
                                                             "resident": self.resident}})

    def _sync_router(self) -> None:
        """Gate rows and maturity of the resident experts, in the pool's order."""
        columns = [self.snapshot.expert_ids.index(e) for e in self._model.experts.expert_ids]
        self._model.router.load_state_dict({name: t[columns] for name, t in self.snapshot.router.items()})
        self._model.experts.disable_adapters()
        self._model.mixture.sync()
