"""The expert pool: peft LoRA adapters on the frozen backbone, created, activated, offloaded and deleted.

Every expert is an ordinary peft adapter named ``expert_<id>``; ids grow and are never reused. The
manager owns the ``PeftModel`` wrapper (created with the first expert) but the adapted modules live in
the backbone itself, so the rest of the system keeps calling the backbone directly.

Offloading (spec 3.3, memory optimisation): when ``offload_device`` is set, the weights of experts that the
current batch does not use are moved there and the module keeps an empty ``meta`` placeholder, so an
accelerator holds only the experts in use. The same code runs on CPU (tests offload to ``cpu`` and see the
placeholders), and ``onload`` restores the exact tensors. Offloading replaces parameter objects, which an
optimizer would no longer see: trainable experts are therefore never offloaded. Moving weights does not
change them, so caches of stacked weights survive offloading.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..config import ExpertConfig
from .targets import decoder_layers, detect_target_modules

logger = logging.getLogger(__name__)


def expert_name(expert_id: int) -> str:
    return f"expert_{expert_id}"


# peft's add_weighted_adapter methods; those without ``svd`` but ``cat`` combine the experts' A and B factors one by
# one, which needs one rank for all
MERGE_METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
                 "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# peft methods that prune each delta to a share ``density`` of its entries before combining them
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")


def merge_weights(method: str, n: int = 2) -> list[float]:
    """The weights under which peft's ``add_weighted_adapter`` averages ``n`` experts with ``method``: 1 each
    for the TIES methods, whose disjoint merge already divides every entry by the number of experts that agree
    on its sign (at 1/n they would shrink the merged delta n-fold); else 1/n each for the methods that sum the
    weighted deltas (``cat``, ``svd``, ``dare_linear_svd``, ``magnitude_prune_svd``), and 1/n**2 each for those
    that sum the factors (``linear``, ``dare_linear``, ``magnitude_prune``): peft weighs A and B by the root of
    the weight each, so their product, the delta, scales as the square of the summed roots (at 1/n, n
    identical experts would merge into one with n times their delta)."""
    if "ties" in method:
        return [1.0] * n
    if method == "cat" or "svd" in method:
        return [1.0 / n] * n
    return [1.0 / n**2] * n


class ExpertManager:
    """Creates and tracks the LoRA experts of one backbone.

    Args:
        backbone: the frozen causal LM; adapters are injected into it in place.
        config: rank, alpha, dropout, target modules, offload device.
        first_layer: experts adapt decoder layers ``>= first_layer`` only (0: all layers).
    """

    def __init__(self, backbone: PreTrainedModel, config: ExpertConfig, *, first_layer: int = 0) -> None:
        self.backbone = backbone
        self.config = config
        self.first_layer = first_layer
        self.target_modules = detect_target_modules(backbone, config.target_modules)
        # GPT-2 style Conv1D layers store weights transposed; peft needs to know.
        self.fan_in_fan_out = any(
            isinstance(m, Conv1D) and any(n.endswith("." + s) for s in self.target_modules)
            for n, m in backbone.named_modules()
        )
        self.num_layers = len(decoder_layers(backbone))
        if first_layer >= self.num_layers:
            raise ValueError(f"route_layer={first_layer} leaves no layer to adapt ({self.num_layers} layers)")
        self.peft_model: PeftModel | None = None
        self.expert_ids: list[int] = []
        self.ranks: dict[int, int] = {}
        self.next_id = 0
        self.current_expert_id: int | None = None
        # Bumped whenever expert weights may have changed; caches of stacked weights key on it.
        self.version = 0
        # Bumped when a frozen expert's weights may have changed (the pool, a load, the trainable set), not
        # after each optimizer step of a trainable expert; caches of frozen experts' stacks key on it.
        self.frozen_version = 0
        # Expert id -> the saved system folder holding exactly its current weights (it was loaded from there
        # or last saved there); a save to that folder links those files instead of writing them again.
        self.written: dict[int, Path] = {}
        self.trainable_ids: frozenset[int] = frozenset()
        # Merged expert id -> {"merged_from": [a, b], "method": ...}: saved with the system (the manifest), so the
        # lineage survives a crash between the save and the registry's write.
        self.lineage: dict[int, dict] = {}
        self._offloaded: dict[int, dict[str, tuple[torch.Tensor, bool]]] = {}
        self._layers: list[LoraLayer] = []

    # ------------------------------------------------------------------ pool
    def lora_config(self, rank: int) -> LoraConfig:
        layers = list(range(self.first_layer, self.num_layers)) if self.first_layer > 0 else None
        return LoraConfig(
            r=rank,
            lora_alpha=self.config.alpha * rank / self.config.rank,
            lora_dropout=self.config.dropout,
            target_modules=list(self.target_modules),
            layers_to_transform=layers,
            bias="none",
            fan_in_fan_out=self.fan_in_fan_out,
            task_type="CAUSAL_LM",
        )

    def create_expert(self, rank: int | None = None) -> int:
        """Add a new randomly initialised expert (B = 0, so it starts as the identity) and return its id."""
        rank = rank or self.config.rank
        expert_id = self.next_id
        name = expert_name(expert_id)
        config = self.lora_config(rank)
        # peft freezes everything but adapters and activates the new one; keep our own trainability.
        grads = {n: p.requires_grad for n, p in self.backbone.named_parameters()}
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.backbone, config, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, config)
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(grads.get(n, False))
        self.next_id += 1
        self.expert_ids.append(expert_id)
        self.ranks[expert_id] = rank
        self._refresh()
        if self.config.offload_device is not None:
            self.offload([expert_id])
        return expert_id

    def load_expert(self, expert_id: int, folder: str, rank: int) -> None:
        """Add a saved expert (a peft adapter folder) under its original id. Its target modules must be the
        pool's: experts on different layers cannot be stacked, mixed or merged."""
        name = expert_name(expert_id)
        saved = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8")).get("target_modules")
        saved = sorted([saved] if isinstance(saved, str) else saved or [])
        if saved != sorted(self.target_modules):
            raise ValueError(f"expert {expert_id} adapts {saved} but this system's expert.target_modules give "
                             f"{sorted(self.target_modules)}: the pool's experts must adapt the same layers; load the "
                             "system without an expert.target_modules override (or start a new one for those targets)")
        grads = {n: p.requires_grad for n, p in self.backbone.named_parameters()}
        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(self.backbone, str(folder), adapter_name=name)
        else:
            self.peft_model.load_adapter(str(folder), adapter_name=name)
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(grads.get(n, False))
        self.expert_ids.append(expert_id)
        self.ranks[expert_id] = rank
        self.next_id = max(self.next_id, expert_id + 1)
        self._refresh()
        if self.config.offload_device is not None:
            self.offload([expert_id])

    def merge_experts(self, expert_ids: list[int], weights: list[float], method: str = "cat",
                      rank: int | None = None, density: float | None = None) -> int:
        """A new expert combining ``expert_ids`` with peft's ``add_weighted_adapter`` (``cat`` is exact: its
        delta is the weighted sum of theirs, at the sum of their ranks; ``svd`` and the ``*_svd`` methods
        approximate that sum at ``rank``, by default the largest source rank; ``ties``/``dare_*`` need
        ``density``; ``merge_weights`` gives the weights that average). The sources stay in the pool, resident or
        offloaded as they were; the new expert is offloaded when offloading is on, as a created one. Returns the
        new id."""
        for expert_id in expert_ids:
            self._check(expert_id)
        if len(expert_ids) < 2 or len(weights) != len(expert_ids):
            raise ValueError(f"merge needs two or more experts and one weight each, got {expert_ids} and {weights}")
        self._check_merge_options(method, rank, density, expert_ids)
        expert_id, name = self.next_id, expert_name(self.next_id)
        extra = {"svd_rank": rank or max(self.ranks[e] for e in expert_ids)} if "svd" in method else {}
        if density is not None:
            extra["density"] = density
        grads = {n: p.requires_grad for n, p in self.backbone.named_parameters()}
        # Offloaded sources come back for peft to read them and go again after (also when the merge fails): a
        # merge leaves every expert where it was.
        offloaded = [e for e in expert_ids if not self.is_resident(e)]
        self.onload(offloaded)
        try:
            try:
                self.peft_model.add_weighted_adapter([expert_name(e) for e in expert_ids], list(weights), name,
                                                     combination_type=method, **extra)
            except BaseException as err:
                # peft registers the new adapter before it fills it, and a later add_weighted_adapter under the same
                # name returns at once: a half-made adapter left behind would become the next merge's expert
                if name in self.peft_model.peft_config:
                    self.peft_model.delete_adapter(name)
                if isinstance(err, torch.linalg.LinAlgError):  # the svd of the combined delta did not converge
                    raise ValueError(f"merging experts {expert_ids} with {method!r} failed in its SVD ({err}): an "
                                     "expert holds non-finite or degenerate weights; check them, or merge with 'cat' "
                                     "(no SVD)") from err
                raise
            finally:
                for n, p in self.backbone.named_parameters():
                    p.requires_grad_(grads.get(n, False))
            # peft keeps the adapters of a half-precision backbone in float32, but writes a merged one in the
            # backbone's dtype: the merged expert takes its sources' dtype, as a new expert would. A cat merge was
            # rounded to the backbone's dtype on the way (the other methods hand over tensors in their sources'), so
            # it is filled again in the sources' dtype, as peft fills it, and stays exact.
            sources = [expert_name(e) for e in expert_ids]
            for layer in self.layers():
                if name in layer.lora_A and sources[0] in layer.lora_A:
                    dtype = layer.lora_A[sources[0]].weight.dtype
                    rounded = layer.lora_A[name].weight.dtype != dtype
                    layer.lora_A[name].to(dtype)
                    layer.lora_B[name].to(dtype)
                    if method == "cat" and rounded:
                        parts = [(s, w) for s, w in zip(sources, weights, strict=True) if s in layer.lora_A]
                        with torch.no_grad():
                            a = torch.cat([layer.lora_A[s].weight * w * layer.scaling[s] for s, w in parts])
                            b = torch.cat([layer.lora_B[s].weight for s, _ in parts], dim=1)
                            layer.lora_A[name].weight[: a.shape[0]].copy_(a)
                            layer.lora_B[name].weight[:, : b.shape[1]].copy_(b)
        finally:
            self.offload(offloaded)
        self.next_id += 1
        self.expert_ids.append(expert_id)
        self.ranks[expert_id] = self.peft_model.peft_config[name].r
        self._refresh()
        self._apply_trainable()
        if self.config.offload_device is not None:  # a new expert, offloaded as a created or loaded one is
            self.offload([expert_id])
        return expert_id

    def _check_merge_options(self, method: str, rank: int | None, density: float | None,
                             expert_ids: Sequence[int] = ()) -> None:
        """Refuse options a merge method would ignore or turn into a broken expert: an unknown method; experts of
        different ranks to a method that combines their factors; a density outside (0, 1] (0 keeps nothing of
        either delta), or one given to a method that does not prune; a rank below 1, given to a method that does
        not truncate, or above the smallest adapted layer's width (peft then cuts that layer's factors to its
        width, and the saved expert no longer matches its own config)."""
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; the methods are {', '.join(MERGE_METHODS)}")
        ranks = [self.ranks[e] for e in expert_ids]
        if method in FACTOR_METHODS and len(set(ranks)) > 1:
            svd = "svd" if method == "linear" else f"{method}_svd"
            raise ValueError(f"merge method {method!r} combines the experts' factors one by one and needs one rank, "
                             f"but experts {list(expert_ids)} have ranks {ranks}: use {svd} (the same merge of the "
                             "deltas, at one rank) or cat")
        if method in NEEDS_DENSITY:
            if density is None:
                raise ValueError(f"merge method {method!r} prunes the deltas: give the share to keep, "
                                 "density in (0, 1]")
            if not 0 < density <= 1:
                raise ValueError(f"density is the share of each delta kept, in (0, 1]; got {density}")
        elif density is not None:
            raise ValueError(f"merge method {method!r} keeps every entry and takes no density; "
                             f"the pruning methods are {', '.join(NEEDS_DENSITY)}")
        if rank is None:
            return
        if "svd" not in method:
            raise ValueError(f"merge method {method!r} keeps the sources' ranks and takes no rank; "
                             "give one to an svd method (svd, ties_svd, dare_ties_svd, ...)")
        widest = min((min(layer.in_features, layer.out_features) for layer in self._layers), default=rank)
        if not 1 <= rank <= widest:
            raise ValueError(f"an svd merge's rank must be in [1, {widest}] (the narrowest adapted layer's width); "
                             f"got {rank}")

    def delete_expert(self, expert_id: int) -> None:
        self._check(expert_id)
        self.onload([expert_id])
        self.peft_model.delete_adapter(expert_name(expert_id))
        self.expert_ids.remove(expert_id)
        del self.ranks[expert_id]
        self.written.pop(expert_id, None)
        self.trainable_ids = self.trainable_ids - {expert_id}
        self.lineage.pop(expert_id, None)
        if self.current_expert_id == expert_id:
            self.current_expert_id = None
        self._refresh()
        # peft activates another adapter when the active one goes, and an active adapter requires grad: put the
        # trainable set back, so a frozen expert does not silently become trainable.
        self._apply_trainable()

    def set_active_expert(self, expert_id: int) -> None:
        """Make one expert the only active peft adapter (single-expert forward), offloading the previous one."""
        self._check(expert_id)
        previous = self.current_expert_id
        self.onload([expert_id])
        self.peft_model.base_model.enable_adapter_layers()
        self.peft_model.set_adapter(expert_name(expert_id))
        self.current_expert_id = expert_id
        if previous is not None and previous != expert_id and self.config.offload_device is not None:
            self.offload([previous])
        self._apply_trainable()  # peft's set_adapter makes the active adapter trainable: keep ours

    def disable_adapters(self) -> None:
        """Switch off peft's own adapter path: the fused mixture adds the experts' deltas itself."""
        if self.peft_model is not None:
            self.peft_model.base_model.disable_adapter_layers()
            self._apply_trainable()  # peft freezes every adapter when it disables them: keep ours trainable
        self.current_expert_id = None

    def set_trainable(self, expert_ids: Iterable[int]) -> None:
        """Only the given experts' LoRA weights receive gradients; every other expert stays frozen. Trainable
        experts are brought back and stay resident, so an optimizer built now holds their parameters."""
        expert_ids = frozenset(expert_ids)
        for expert_id in expert_ids:
            self._check(expert_id)
        self.trainable_ids = expert_ids
        for expert_id in self.trainable_ids:  # their weights will change: the next save writes them
            self.written.pop(expert_id, None)
        self.onload(self.trainable_ids)
        self._apply_trainable()
        self.version += 1
        self.frozen_version += 1

    def _apply_trainable(self) -> None:
        wanted = {expert_name(e) for e in self.trainable_ids}
        for layer in self._layers:
            for name in self.names():
                for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()):
                    p.requires_grad_(name in wanted)

    def parameters(self, expert_id: int) -> Iterator[nn.Parameter]:
        name = expert_name(expert_id)
        for layer in self._layers:
            if name in layer.lora_A:
                yield from layer.lora_A[name].parameters()
                yield from layer.lora_B[name].parameters()

    @contextlib.contextmanager
    def weights(self, expert_id: int, values: Sequence[torch.Tensor]) -> Iterator[None]:
        """Run with ``values`` (in the order of ``parameters(expert_id)``) as the expert's weights, e.g. a copy
        taken before training, and its own weights back after. The tensors are swapped, not copied, and the
        cached stacks are invalidated on both sides; an optimizer's state, keyed on the parameters, is kept."""
        params = list(self.parameters(expert_id))
        if len(params) != len(values):
            raise ValueError(f"expert {expert_id} has {len(params)} weight tensors, {len(values)} given")
        with swapped(params, values):
            self.touch(trained_only=expert_id in self.trainable_ids)
            try:
                yield
            finally:
                self.touch(trained_only=expert_id in self.trainable_ids)

    def num_parameters(self, expert_id: int) -> int:
        """The expert's weight count; an offloaded expert's ``meta`` placeholders have its weights' shapes, so
        it is counted where it is, without moving it."""
        return sum(p.numel() for p in self.parameters(expert_id))

    # ---------------------------------------------------------------- state
    def names(self) -> list[str]:
        return [expert_name(e) for e in self.expert_ids]

    def layers(self) -> list[LoraLayer]:
        return self._layers

    def touch(self, trained_only: bool = False) -> None:
        """Record that expert weights may have changed: after editing them by hand (every expert then counts as
        changed, for caches and saves alike), or with ``trained_only`` after an optimizer step (the trainable
        experts only, which ``set_trainable`` already marked as changed)."""
        self.version += 1
        if not trained_only:
            self.frozen_version += 1
            self.written.clear()

    def _refresh(self) -> None:
        self._layers = [m for m in self.backbone.modules() if isinstance(m, LoraLayer)]
        self.version += 1
        self.frozen_version += 1

    def _check(self, expert_id: int) -> None:
        if expert_id not in self.ranks:
            raise KeyError(f"no expert with id {expert_id}; experts are {self.expert_ids}")

    # -------------------------------------------------------------- offload
    def is_resident(self, expert_id: int) -> bool:
        return expert_id not in self._offloaded

    def _adapter_tensors(self, expert_id: int) -> Iterator[tuple[str, nn.Module, str]]:
        """(key, owning module, attribute) of every weight of one expert."""
        name = expert_name(expert_id)
        for i, layer in enumerate(self._layers):
            if name not in layer.lora_A:
                continue
            for part, modules in (("A", layer.lora_A), ("B", layer.lora_B)):
                for attr, _ in modules[name].named_parameters(recurse=False):
                    yield f"{i}.{part}.{attr}", modules[name], attr

    def offload(self, expert_ids: Iterable[int]) -> None:
        """Move the experts' weights to ``offload_device``; the modules keep ``meta`` placeholders. Trainable
        experts stay where they are."""
        device = self.config.offload_device
        if device is None:
            return
        for expert_id in expert_ids:
            if expert_id in self._offloaded or expert_id in self.trainable_ids:
                continue
            store = {}
            for key, module, attr in self._adapter_tensors(expert_id):
                param = getattr(module, attr)
                store[key] = (param.data.to(device), param.requires_grad)
                setattr(module, attr, nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad))
            self._offloaded[expert_id] = store

    def onload(self, expert_ids: Iterable[int]) -> None:
        """Bring offloaded experts back to the device of the backbone weights they adapt."""
        for expert_id in list(expert_ids):
            store = self._offloaded.pop(expert_id, None)
            if store is None:
                continue
            for key, module, attr in self._adapter_tensors(expert_id):
                layer_device = self._layers[int(key.split(".", 1)[0])].get_base_layer().weight.device
                data, requires_grad = store[key]
                setattr(module, attr, nn.Parameter(data.to(layer_device), requires_grad))

    def convert_offloaded(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply the dtype change of a ``Module._apply`` function (``half``, ``float``, ``to(dtype)``) to the
        offloaded experts' weights where they are, so that they come back in the dtype of the experts the call
        converted; a device move in ``fn`` is not applied to them (``onload`` follows the backbone)."""
        for expert_id, store in self._offloaded.items():
            for key, module, attr in self._adapter_tensors(expert_id):
                data, requires_grad = store[key]
                dtype = fn(torch.empty(0, dtype=data.dtype, device=data.device)).dtype  # what fn makes of it
                if dtype != data.dtype:
                    store[key] = (data.to(dtype), requires_grad)
                    setattr(module, attr, nn.Parameter(torch.empty_like(data, device="meta", dtype=dtype),
                                                       requires_grad))

    @contextlib.contextmanager
    def placeholders_detached(self) -> Iterator[None]:
        """Take the ``meta`` placeholders of the offloaded experts out of their modules for the duration, and put
        them back after: a ``Module.to`` (``_apply``) of the whole model cannot move a tensor that holds no data
        and would raise. The offloaded weights stay where ``offload`` put them; ``onload`` brings them to
        wherever the backbone is then."""
        held = [(module, attr, module._parameters[attr])
                for expert_id in self._offloaded for _, module, attr in self._adapter_tensors(expert_id)]
        for module, attr, _ in held:
            module._parameters[attr] = None  # ``_apply`` skips an unset parameter
        try:
            yield
        finally:
            for module, attr, placeholder in held:
                module._parameters[attr] = placeholder

    def ensure_resident(self, expert_ids: Iterable[int]) -> None:
        """Onload ``expert_ids`` and, when offloading is on, offload every other expert that is not trainable."""
        wanted = set(expert_ids)
        self.onload(wanted)
        if self.config.offload_device is not None:
            self.offload([e for e in self.expert_ids if e not in wanted and self.is_resident(e)])


@contextlib.contextmanager
def swapped(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run with ``values`` as the data of ``params`` (swapped, not copied) and their own data back after."""
    own = [p.data for p in params]
    for p, v in zip(params, values, strict=True):
        p.data = v
    try:
        yield
    finally:
        for p, v in zip(params, own, strict=True):
            p.data = v
