"""What the ingress of a Ray deployment routes with: the tokenizer, the backbone up to the layer the gate reads,
the gate and the skill library, without the experts and without the rest of the backbone.

The gate reads the input of decoder layer ``route_layer`` (0 by default: the token embeddings), so the ingress
loads the backbone with ``route_layer + 1`` decoder layers (the weights of the others are never read) and
routes with the model's own ``RoutingControl``, whose hook stops the pass before that layer runs: the routing
is the one ``dylora serve`` computes, at the cost of an embedding lookup. A system routed on the final hidden
states (``route_layer=None``) needs the whole frozen backbone here. ``RoutingHead`` stands where the
single-process app has its ``ServedSystem`` (``model``, ``version``), so ``create_app`` serves the registry
endpoints from it unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers.utils import logging as hf_logging

from ..backbone import load_backbone
from ..config import DyLoRAConfig
from ..experts import ExpertManager, ExpertMixture
from ..novelty import SkillLibrary
from ..routing import DynamicHybridRouter, RouterOutput
from ..routing.control import RoutingControl
from .snapshot import Snapshot, read_snapshot, stamp
from .system import SystemFiles


@dataclass
class ExpertPool:
    """The served experts as the registry endpoints list them (ids in gate-column order, ranks)."""

    expert_ids: list[int] = field(default_factory=list)
    ranks: dict[int, int] = field(default_factory=dict)


class RouterModel:
    """The routing half of a ``DyLoRAMoE``: ``route``, ``tokenizer``, ``router``, ``library``, ``experts``."""

    def __init__(self, config: DyLoRAConfig) -> None:
        self.config = config
        route_layer = config.router.route_layer
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the weights of the layers left out are reported as unexpected
        try:
            self.backbone, self.tokenizer = load_backbone(
                config.model, dtype=config.dtype, device="cpu",
                layers=None if route_layer is None else route_layer + 1)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.router = DynamicHybridRouter(self.backbone.config.hidden_size, top_k=config.router.top_k,
                                          temperature=config.router.temperature,
                                          dense_top_m=config.router.dense_top_m,
                                          cumulative_weight=config.router.cumulative_weight)
        # an empty pool: the routing control needs one to switch experts off for its prefix pass
        empty = ExpertManager(self.backbone, config.expert, first_layer=config.router.first_adapted_layer)
        self.routing = RoutingControl(self.backbone, self.router, empty, ExpertMixture(empty), config.router)
        self.library = SkillLibrary(config.novelty.capacity)
        self.experts = ExpertPool()

    @property
    def num_experts(self) -> int:
        return len(self.experts.expert_ids)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @torch.no_grad()
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> RouterOutput:
        return self.routing.route(input_ids, attention_mask)

    def load(self, snapshot: Snapshot) -> None:
        self.router.load_state_dict(snapshot.router)
        library = SkillLibrary(self.config.novelty.capacity)
        library.load_state_dict(snapshot.library, snapshot.library_tensors)
        self.library = library
        self.experts = ExpertPool(snapshot.expert_ids, {int(k): v for k, v in snapshot.manifest["ranks"].items()})


class RoutingHead:
    """The ingress's view of a served system folder, following its saves.

    Args:
        path: a run folder or a system folder (see ``SystemFiles.locate``).
    """

    def __init__(self, path: str | Path) -> None:
        self.files = SystemFiles.locate(path)
        self.lock = threading.RLock()
        self.snapshot = read_snapshot(self.files.system)
        self.model = RouterModel(DyLoRAConfig.from_dict(self.snapshot.manifest["config"]))
        self.model.load(self.snapshot)

    @property
    def version(self) -> str:
        return self.snapshot.version

    def refresh(self) -> bool:
        """Pick up a newer save of the folder (one ``stat`` when there is none); True when the version changed."""
        try:
            if stamp(self.files.system) == self.snapshot.stamp:
                return False
        except FileNotFoundError:  # between the two renames of a save: the next request looks again
            return False
        with self.lock:
            snapshot = read_snapshot(self.files.system)
            changed = snapshot.version != self.snapshot.version
            if changed:
                self.model.load(snapshot)
            self.snapshot = snapshot
            return changed
