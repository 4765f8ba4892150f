"""Fused mixture of LoRA experts: one backbone pass, every adapted layer adds the routed experts' deltas.

The spec mixes experts at the output: one full forward per expert, then a weighted sum of logits. Here
each adapted linear layer computes

    y = W x + sum_e w_e * s_e * B_e A_e x

for all routed experts at once, as forward hooks on peft's LoRA layers (whose own adapter path is switched
off). Dense routing concatenates the experts' A and B along the rank axis, so the whole pool costs two
matmuls of rank sum(r_e); sparse routing gathers only the selected experts per sample and runs batched
matmuls, so samples of one batch may use different experts (per-token sparse routing runs the dense path
over the selected experts, whose other weights are zero, so no layer waits on the host to find its experts).
Stacked weights are cached between forwards while they cannot change (no gradient flows into them) and
rebuilt when the manager's version moves. While an expert trains, the frozen experts' stack is still cached
(it changes only when the pool or the trainable set does) and only the trainable experts' weights are stacked
with autograd on each forward, so a training step costs the same whatever the number of frozen experts.

Axis key: B batch, T tokens, I in-features, O out-features, S experts in the active set, R rank,
K experts per sample (top-k).

Numerics follow peft's LoRA layer: the delta is computed in the adapters' dtype (peft keeps adapters in fp32
on a bf16/fp16 backbone), added to the base output in that dtype, and only the sum is rounded back. The
routing weights arrive in float32 (the router's dtype) and are cast to the adapters' dtype where they scale
the ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .manager import ExpertManager, expert_name


class MixturePlan(NamedTuple):
    """The routing of one forward, in positions of the stacked active set.

    ``weights`` is set for dense routing ([B, S] per sequence or [B, T, S] per token); ``indices`` and
    ``topk_weights`` for sparse per-sequence routing ([B, K], positions into ``active``).
    """

    active: tuple[str, ...]  # adapter names, in stack order
    weights: Tensor | None = None
    indices: Tensor | None = None
    topk_weights: Tensor | None = None
    cacheable: bool = True


class ConcatStack(NamedTuple):
    A: Tensor  # [sum R, I]
    B: Tensor  # [O, sum R]
    owner: Tensor  # [sum R] position in the active set of each rank row
    scale: Tensor  # [sum R] LoRA scaling of the owning expert


class PaddedStack(NamedTuple):
    A: Tensor  # [S, R, I], rows past an expert's rank are zero
    B: Tensor  # [S, O, R]
    scale: Tensor  # [S]


def stack_concat(layer: LoraLayer, names: list[str], only: frozenset[str] | None = None) -> ConcatStack | None:
    """The experts ``names`` (those in ``only``, when given) concatenated along the rank; ``owner`` holds
    positions in ``names``. ``None`` when the layer adapts none of them."""
    index = concat_index(layer, names, only)
    return None if index is None else ConcatStack(*concat_weights(layer, names, only), *index)


def _members(layer: LoraLayer, names: list[str], only: frozenset[str] | None) -> list[tuple[int, str]]:
    return [(pos, n) for pos, n in enumerate(names) if n in layer.lora_A and (only is None or n in only)]


def concat_weights(layer: LoraLayer, names: list[str], only: frozenset[str] | None = None) -> tuple[Tensor, Tensor]:
    """A [sum R, I] and B [O, sum R] of ``stack_concat``: what a trained expert's step changes."""
    members = _members(layer, names, only)
    return (torch.cat([layer.lora_A[n].weight for _, n in members], 0),
            torch.cat([layer.lora_B[n].weight for _, n in members], 1))


def concat_index(layer: LoraLayer, names: list[str],
                 only: frozenset[str] | None = None) -> tuple[Tensor, Tensor] | None:
    """owner and scale [sum R] of ``stack_concat``, on the weights' device: they depend on the experts' names,
    ranks and scalings only, so a training pass caches them rather than copying them to the device per layer.
    ``None`` when the layer adapts none of the experts."""
    members = _members(layer, names, only)
    if not members:
        return None
    ref = layer.lora_A[members[0][1]].weight
    ranks = [layer.lora_A[n].weight.shape[0] for _, n in members]
    # filled on the device (no host-to-device copy, which would wait for every queued kernel)
    owner = torch.cat([torch.full((r,), pos, dtype=torch.long, device=ref.device)
                       for (pos, _), r in zip(members, ranks, strict=True)])
    scale = torch.cat([torch.full((r,), float(layer.scaling[n]), dtype=ref.dtype, device=ref.device)
                       for (_, n), r in zip(members, ranks, strict=True)])
    return owner, scale


def stack_padded(layer: LoraLayer, names: list[str], blank: frozenset[str] = frozenset()) -> PaddedStack:
    """The experts ``names`` padded to one rank; experts in ``blank`` keep their place and scale with zero
    weights (filled in later, see ``fill_padded``)."""
    present = [n for n in names if n in layer.lora_A]
    ref = layer.lora_A[present[0]].weight
    rank = max(layer.lora_A[n].weight.shape[0] for n in present)
    in_f, out_f = ref.shape[1], layer.lora_B[present[0]].weight.shape[0]
    As, Bs, scale = [], [], []
    for name in names:
        if name not in layer.lora_A or name in blank:
            As.append(ref.new_zeros(rank, in_f))
            Bs.append(ref.new_zeros(out_f, rank))
            scale.append(layer.scaling[name] if name in layer.lora_A else 0.0)
            continue
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        pad = rank - a.shape[0]
        As.append(torch.nn.functional.pad(a, (0, 0, 0, pad)))  # [R, I]
        Bs.append(torch.nn.functional.pad(b, (0, pad)))  # [O, R]
        scale.append(layer.scaling[name])
    return PaddedStack(torch.stack(As), torch.stack(Bs), torch.tensor(scale, device=ref.device, dtype=ref.dtype))


def fill_padded(layer: LoraLayer, stack: PaddedStack, fill: list[str], pos: Tensor) -> PaddedStack:
    """``stack`` with the experts ``fill`` (blank in it, at positions ``pos`` [F]) put in place, out of place so
    that gradients reach their weights."""
    if not fill:
        return stack
    rank = stack.A.shape[1]
    a = torch.stack([torch.nn.functional.pad(layer.lora_A[n].weight, (0, 0, 0, rank - layer.lora_A[n].weight.shape[0]))
                     for n in fill])  # [F, R, I]
    b = torch.stack([torch.nn.functional.pad(layer.lora_B[n].weight, (0, rank - layer.lora_B[n].weight.shape[1]))
                     for n in fill])  # [F, O, R]
    return PaddedStack(stack.A.index_put((pos,), a), stack.B.index_put((pos,), b), stack.scale)


def dense_delta(x: Tensor, st: ConcatStack, weights: Tensor) -> Tensor:
    """sum_e w_e s_e B_e A_e x for every expert; ``weights`` is [B, S] or [B, T, S]."""
    h = x @ st.A.T  # [B, T, sum R]
    coef = weights.index_select(-1, st.owner).to(st.scale.dtype) * st.scale  # [B, sum R] or [B, T, sum R]
    if coef.dim() == 2:
        coef = coef.unsqueeze(1)  # [B, 1, sum R]
    return (h * coef) @ st.B.T  # [B, T, O]


def sparse_sequence_delta(x: Tensor, st: PaddedStack, indices: Tensor, weights: Tensor) -> Tensor:
    """Each sample uses only its K selected experts; ``indices``/``weights`` are [B, K]."""
    b, k = indices.shape
    r = st.A.shape[1]
    a = st.A[indices].reshape(b, k * r, -1)  # [B, K*R, I]
    bw = st.B[indices].permute(0, 2, 1, 3).reshape(b, -1, k * r)  # [B, K, O, R] -> [B, O, K*R]
    coef = (weights.to(st.scale.dtype) * st.scale[indices]).repeat_interleave(r, dim=1)  # [B, K*R]
    h = torch.bmm(x, a.transpose(1, 2)) * coef.unsqueeze(1)  # [B, T, K*R]
    return torch.bmm(h, bw.transpose(1, 2))  # [B, T, O]


CACHED_PLANS = 2  # stacks kept per layer: one per plan of the two a pass alternates between


def _cached(store: dict[int, dict[tuple, object]], layer: LoraLayer, key: tuple, build):
    """``store``'s entry for ``layer`` and ``key``, built on a miss; each layer keeps its ``CACHED_PLANS`` most
    recently used keys (a key holds the weights' version, so stale stacks age out)."""
    entries = store.setdefault(id(layer), {})
    if key in entries:
        entries[key] = entries.pop(key)  # most recently used last
        return entries[key]
    value = entries[key] = build()
    while len(entries) > CACHED_PLANS:
        del entries[next(iter(entries))]
    return value


class ExpertMixture:
    """Adds the routed experts' deltas to every adapted layer while a plan is set."""

    def __init__(self, manager: ExpertManager) -> None:
        self.manager = manager
        self.plan: MixturePlan | None = None
        self._handles: dict[int, RemovableHandle] = {}
        # Per layer, the stacks of the last CACHED_PLANS keys (active experts, layout, weights' version): passes
        # alternate between plans (a training step's routed pass and its KL pass forced to one expert; a served
        # batch's decode steps and a joining request's prefill), and one entry per layer would rebuild both.
        self._cache: dict[int, dict[tuple, ConcatStack | PaddedStack]] = {}
        self._frozen: dict[int, dict[tuple, object]] = {}  # layer -> key -> frozen experts' stack (and indices)
        self._trained: frozenset[str] = frozenset()  # adapter names of the trainable experts, set per pass

    def sync(self) -> None:
        """Hook any LoRA layer that peft created since the last call."""
        for layer in self.manager.layers():
            if id(layer) not in self._handles:
                self._handles[id(layer)] = layer.register_forward_hook(self._hook)
        self._cache.clear()
        self._frozen.clear()

    def set_plan(self, plan: MixturePlan | None) -> None:
        if plan is not None and not plan.cacheable:
            # The trainable experts may change after this forward (an optimizer step): stale stacks of them
            # must not survive; the frozen experts' stacks stay valid.
            self.manager.touch(trained_only=True)
            self._trained = frozenset(expert_name(e) for e in self.manager.trainable_ids)  # once per pass
        self.plan = plan

    def _stack(self, layer: LoraLayer, padded: bool) -> ConcatStack | PaddedStack:
        plan = self.plan
        names = list(plan.active)
        if not plan.cacheable:
            return stack_padded(layer, names) if padded else stack_concat(layer, names)
        key = (plan.active, padded, self.manager.version)

        def build() -> ConcatStack | PaddedStack:
            with torch.no_grad():
                return stack_padded(layer, names) if padded else stack_concat(layer, names)

        return _cached(self._cache, layer, key, build)

    def _split_stacks(self, layer: LoraLayer) -> tuple[ConcatStack | None, ConcatStack | None]:
        """The plan's frozen experts (cached without autograd, keyed on the pool and the trainable set, which
        ``frozen_version`` follows) and its trainable ones (their weights stacked with autograd on every call,
        their owner and scale indices cached with the frozen stack: no host-to-device copy per layer)."""
        names = list(self.plan.active)
        trained = self._trained
        frozen_names = frozenset(names) - trained
        key = (self.plan.active, "frozen", self.manager.frozen_version)

        def build() -> tuple[ConcatStack | None, tuple[Tensor, Tensor] | None]:
            with torch.no_grad():
                frozen = stack_concat(layer, names, only=frozen_names) if frozen_names else None
                index = concat_index(layer, names, only=trained) if trained & set(names) else None
            return frozen, index

        frozen, index = _cached(self._frozen, layer, key, build)
        live = None if index is None else ConcatStack(*concat_weights(layer, names, only=trained), *index)
        return frozen, live

    def _padded_for_training(self, layer: LoraLayer) -> PaddedStack:
        """The frozen experts' padded stack (cached with the trained experts' positions in it, so no index is
        copied to the device per layer and step) with the trained experts filled in."""
        names = list(self.plan.active)
        key = (self.plan.active, "padded", self.manager.frozen_version)

        def build() -> tuple[PaddedStack, list[str], Tensor]:
            trained = [n for n in names if n in self._trained and n in layer.lora_A]
            with torch.no_grad():
                stack = stack_padded(layer, names, blank=frozenset(trained))
            pos = torch.tensor([names.index(n) for n in trained], dtype=torch.long, device=stack.A.device)
            return stack, trained, pos

        stack, trained, pos = _cached(self._frozen, layer, key, build)
        return fill_padded(layer, stack, trained, pos)

    def _hook(self, layer: LoraLayer, args: tuple, output: Tensor) -> Tensor | None:
        plan = self.plan
        if plan is None:
            return None
        first = next((name for name in plan.active if name in layer.lora_A), None)
        if first is None:
            return None
        x = layer.lora_dropout[first](args[0].to(layer.lora_A[first].weight.dtype))
        if plan.indices is None and not plan.cacheable:  # training: cached frozen experts + live trainable ones
            frozen, live = self._split_stacks(layer)
            deltas = [dense_delta(x, st, plan.weights) for st in (frozen, live) if st is not None]
            delta = deltas[0] if len(deltas) == 1 else deltas[0] + deltas[1]
        elif plan.indices is None:
            delta = dense_delta(x, self._stack(layer, padded=False), plan.weights)
        elif not plan.cacheable:  # training: the frozen experts' padded stack is cached, the trained filled in
            delta = sparse_sequence_delta(x, self._padded_for_training(layer), plan.indices, plan.topk_weights)
        else:
            delta = sparse_sequence_delta(x, self._stack(layer, padded=True), plan.indices, plan.topk_weights)
        # As peft: add in the delta's (adapter) dtype, then round the sum, not the delta, to the output dtype.
        return (output + delta).to(output.dtype)
