"""Routing control: which experts each backbone pass uses, decided mid-pass and handed to the fused mixture.

The gate reads the input of decoder layer ``route_layer``: a forward pre-hook on that layer routes it and
sets the mixture's plan before any adapted layer runs (experts adapt only the layers from there on, so the
prefix the gate reads does not depend on the routing). With ``route_pass="separate"`` the same layer's input
is read from a frozen prefix pass of its own before the routed one (experts then adapt every layer), and with
``route_layer=None`` the gate reads the frozen backbone's final hidden states, also from a pass of its own.

A ``Scope`` holds the state of one call: the tokens the sequence gate pools over, whether the routing is
pinned once decided (generation: a sequence keeps the routing of its prompt for every new token), and
whether the pass stops as soon as it is routed (routing-only prefix passes). ``force`` replaces the gate by
one expert, or by none.

Axis key: B batch, T tokens, H hidden, E experts, K experts per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..config import RouterConfig
from ..experts import ExpertManager, ExpertMixture, MixturePlan, decoder_layers
from .router import DENSE, SPARSE, DynamicHybridRouter, RouterOutput

NO_EXPERT = -1  # force(NO_EXPERT): every expert weighted 0


class RoutingComputed(Exception):
    """Stops a forward pass once the routing hook has run (routing-only passes)."""


@dataclass
class Scope:
    pool_mask: Tensor | None  # [B, T] tokens the sequence gate pools over; None: every token
    pin: bool = False
    stop: bool = False
    from_inputs: bool = False  # take the pool mask from the backbone call itself (generation)
    routing: RouterOutput | None = None
    hidden: Tensor | None = None


def _positions(position_ids: Tensor | None) -> dict[str, Tensor]:
    """Keyword for a backbone call: passed only when given (some architectures take no ``position_ids``)."""
    return {} if position_ids is None else {"position_ids": position_ids}


def pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Masked mean over tokens: [B, T, H] -> [B, H], accumulated in float32 whatever the hidden states' dtype
    (a half-precision sum over a long prompt rounds away, or overflows in float16)."""
    hidden = hidden.float()
    if mask is None:
        return hidden.mean(1)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"pool mask {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:2])}")
    mask = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def prompt_mask(attention_mask: Tensor | None, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """[B, T] 1 on the tokens of the prompt: attended and not a training target (labels are ``-100`` on
    prompt tokens and padding). Packed sequences pool the prompts of all their examples. A row without a prompt
    (every token a target: plain language-model data) keeps its attention mask."""
    attended = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    mask = (labels == ignore_index) & attended
    return torch.where(mask.any(1, keepdim=True), mask, attended).long()


class RoutingControl:
    """Routes the passes of one backbone for the fused mixture.

    Args:
        backbone: the causal LM the experts adapt.
        router: the gate and its maturity state.
        experts, mixture: the pool and the fused layer hooks that read the plan set here.
        config: granularity and the layer the gate reads.
    """

    def __init__(self, backbone: PreTrainedModel, router: DynamicHybridRouter, experts: ExpertManager,
                 mixture: ExpertMixture, config: RouterConfig) -> None:
        self.backbone = backbone
        self.router = router
        self.experts = experts
        self.mixture = mixture
        self.config = config
        self.scope: Scope | None = None
        self.forced: int | None = None  # router column every sequence is sent to (force)
        backbone.register_forward_pre_hook(self._call_hook, with_kwargs=True)
        if config.route_layer is not None:
            decoder_layers(backbone)[config.route_layer].register_forward_pre_hook(self._layer_hook, with_kwargs=True)

    # ------------------------------------------------------------------ deciding
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              pool_mask: Tensor | None = None, position_ids: Tensor | None = None) -> RouterOutput:
        """The routing of a batch without running the experts; ``pool_mask`` defaults to the attention mask.
        ``position_ids`` [B, T] are the routed pass's own (left-padded generation), so the prefix pass sees each
        token where that pass does."""
        if self.forced is not None:  # a forced routing reads no hidden state: no prefix or frozen pass to run
            return self.forced_routing(input_ids)
        pool_mask = attention_mask if pool_mask is None else pool_mask
        return self.decide(self.hidden(input_ids, attention_mask, position_ids), pool_mask)

    @torch.no_grad()
    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 pool_mask: Tensor | None = None) -> Tensor:
        """What the gate reads: pooled [B, H] (sequence routing) or per-token [B, T, H] hidden states."""
        hidden = self.hidden(input_ids, attention_mask)
        if self.config.granularity == "token":
            return hidden
        return pool(hidden, attention_mask if pool_mask is None else pool_mask)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None,
               position_ids: Tensor | None = None) -> Tensor:
        """The gate's input [B, T, H]: a prefix pass up to ``route_layer``, or the frozen final states."""
        if self.config.route_layer is None:
            return self.frozen_final_hidden(input_ids, attention_mask, position_ids)
        with self.plain(), self.scoped(None, stop=True) as scope, contextlib.suppress(RoutingComputed):
            self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                     **_positions(position_ids))
        return scope.hidden

    @torch.no_grad()
    def frozen_final_hidden(self, input_ids: Tensor, attention_mask: Tensor | None,
                            position_ids: Tensor | None = None) -> Tensor:
        with self.plain():
            out = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                           **_positions(position_ids))
        return out.last_hidden_state  # [B, T, H]

    def decide(self, hidden: Tensor, pool_mask: Tensor | None) -> RouterOutput:
        """Route hidden states [B, T, H]: per token, or once per sequence on the pooled ``pool_mask`` tokens."""
        if self.forced is not None:
            return self.forced_routing(hidden[..., 0])
        if self.config.granularity == "token":
            return self.router(hidden)  # [B, T, E]
        # The gate is linear, so routing the mean hidden state equals averaging the per-token logits.
        return self.router(pool(hidden, pool_mask))  # [B, E]

    def forced_routing(self, tokens: Tensor) -> RouterOutput:
        """The forced column's routing for a batch of ``tokens`` [B, T] (ids, or any per-token tensor)."""
        lead = tokens.shape if self.config.granularity == "token" else tokens.shape[:1]  # [B, T] or [B]
        dtype, device = self.router.dtype, tokens.device
        weights = torch.zeros(*lead, self.router.num_experts, dtype=dtype, device=device)  # [..., E]
        if self.forced == NO_EXPERT:
            return RouterOutput(weights, weights.clone(), None, None, DENSE)  # every delta weighted 0
        weights[..., self.forced] = 1.0
        indices = torch.full((*lead, 1), self.forced, dtype=torch.long, device=device)  # [..., 1]
        return RouterOutput(weights, weights.clone(), indices, torch.ones(*lead, 1, dtype=dtype, device=device),
                            SPARSE)

    # ------------------------------------------------------------------ applying
    def apply(self, routing: RouterOutput) -> None:
        """Make the experts the routing uses resident and hand the mixture its plan."""
        ids, names = self.experts.expert_ids, self.experts.names()
        cacheable = not (torch.is_grad_enabled() and self.experts.trainable_ids)
        if self.forced == NO_EXPERT:  # the frozen model: no expert delta to compute at all
            self.mixture.set_plan(None)
            return
        if routing.indices is None and self.router.dense_restricted:
            # One host sync per pass: the experts some sample mixes; the others have weight 0 everywhere.
            used = (routing.weights.reshape(-1, len(ids)) > 0).any(0).nonzero().flatten().tolist()
            self.experts.ensure_resident([ids[c] for c in used])
            self.mixture.set_plan(MixturePlan(tuple(names[c] for c in used), weights=routing.weights[..., used],
                                              cacheable=cacheable))
            return
        if routing.indices is None:
            self.experts.ensure_resident(ids)
            self.mixture.set_plan(MixturePlan(tuple(names), weights=routing.weights, cacheable=cacheable))
            return
        # One host sync per pass (never per layer): which experts some sample selected, so that only those
        # are stacked (and, with offloading, resident).
        # (A forced routing's one column is known on the host: no read at all.)
        used = [self.forced] if self.forced is not None else routing.indices.unique().tolist()
        self.experts.ensure_resident([ids[c] for c in used])
        active = tuple(names[c] for c in used)
        if len(used) == routing.indices.shape[-1] or routing.indices.dim() == 3:
            # Every sample selected the same experts (always so at batch 1), or per-token routing: the dense path
            # over the selected experts is exact (unselected weights are 0) and needs no per-token gather.
            plan = MixturePlan(active, weights=routing.weights[..., used], cacheable=cacheable)
        else:
            remap = torch.full((len(ids),), -1, dtype=torch.long, device=routing.indices.device)
            remap[used] = torch.arange(len(used), device=remap.device)
            plan = MixturePlan(active, indices=remap[routing.indices], topk_weights=routing.topk_weights,
                               cacheable=cacheable)
        self.mixture.set_plan(plan)

    def _layer_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        scope = self.scope
        if scope is None or (scope.pin and scope.routing is not None):
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        if scope.stop:
            scope.hidden = hidden
            raise RoutingComputed
        if self.config.separate_pass:  # routed before the pass, by its own prefix pass
            return
        scope.routing = self.decide(hidden, scope.pool_mask)
        self.apply(scope.routing)

    def _call_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Generation expands each prompt into beams or several returns only inside ``generate``: the first call
        of the backbone shows the rows it really runs, so the pool mask (and, when the gate reads the final
        hidden states, the routing itself) is taken from there."""
        scope = self.scope
        if scope is None or not scope.from_inputs or (scope.pin and scope.routing is not None):
            return
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is None:
            raise ValueError("generation with experts needs input_ids (routing reads the prompt's tokens)")
        scope.pool_mask = mask if mask is None or mask.shape == input_ids.shape else None
        if self.config.separate_pass:
            scope.routing = self.route(input_ids, mask, position_ids=kwargs.get("position_ids"))
            self.apply(scope.routing)

    # ------------------------------------------------------------------ scopes
    @contextlib.contextmanager
    def scoped(self, pool_mask: Tensor | None, *, pin: bool = False, stop: bool = False,
               from_inputs: bool = False) -> Iterator[Scope]:
        outer, plan = self.scope, self.mixture.plan
        self.scope = Scope(pool_mask, pin=pin, stop=stop, from_inputs=from_inputs)
        try:
            yield self.scope
        finally:
            self.scope = outer
            self.mixture.set_plan(plan)

    @contextlib.contextmanager
    def plain(self) -> Iterator[None]:
        """The frozen backbone alone: no routing, no expert deltas."""
        outer, plan = self.scope, self.mixture.plan
        self.scope = None
        self.mixture.set_plan(None)
        try:
            yield
        finally:
            self.scope = outer
            self.mixture.set_plan(plan)

    @contextlib.contextmanager
    def force(self, column: int) -> Iterator[None]:
        """Every sequence (every token) goes to router ``column`` with weight 1; ``NO_EXPERT``: to none."""
        outer, self.forced = self.forced, column
        try:
            yield
        finally:
            self.forced = outer
