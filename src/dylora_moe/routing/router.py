"""The dynamic hybrid router (spec 3.2): dense while any expert is new, sparse top-k once all are mature.

A linear gate maps hidden states to one logit per expert. While any expert's maturity is 0 the router
mixes every expert with a softmax of ``logits / temperature`` (dense collaboration); once all are mature it
keeps the top-k logits and softmaxes over those only (sparse delegation). ``add_expert`` grows the gate
without touching the rows of existing experts, so their logits are unchanged.

With ``cumulative_weight`` = tau the number of experts is chosen per input (per sequence, or per token under
per-token routing): k(x) is the smallest k whose k largest gate probabilities (softmax over every expert) sum
to at least tau, capped at ``top_k``. An input the gate is sure of keeps one expert (exactly top-1 routing);
an input the gate splits between two skills (a composed task, once the gate was fitted on multi-label rows)
gets both, weighted by their renormalised probabilities.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..events import EXPERT_MATURED, ROUTING_STRATEGY_CHANGED, EventLog

DENSE = "dense"
SPARSE = "sparse"


class RouterOutput(NamedTuple):
    """Routing of a batch over all experts (columns in the router's expert order).

    weights: [..., E] mixing weights, zero for experts a sparse router did not select.
    logits: [..., E] gate logits before temperature.
    indices: [..., K] selected experts in sparse mode, ``None`` in dense mode.
    topk_weights: [..., K] the weights of ``indices``.
    strategy: ``dense`` or ``sparse``.
    """

    weights: Tensor
    logits: Tensor
    indices: Tensor | None
    topk_weights: Tensor | None
    strategy: str


class DynamicHybridRouter(nn.Module):
    """Gate + maturity state.

    Args:
        hidden_size: width of the hidden states that feed the gate.
        num_experts: initial number of experts (usually 0: experts arrive with skills).
        top_k: experts per sample in sparse mode.
        temperature: divides the logits before the softmax.
        dense_top_m: in dense mode, mature experts mixed per sample besides every immature one (``None``: all).
        cumulative_weight: sparse mode chooses k per input by cumulative gate probability, at most ``top_k``
            (``None``: always ``top_k``).
        events: where strategy changes are reported.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int = 0,
        *,
        top_k: int = 1,
        temperature: float = 1.0,
        dense_top_m: int | None = None,
        cumulative_weight: float | None = None,
        events: EventLog | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.temperature = temperature
        self.dense_top_m = dense_top_m
        self.cumulative_weight = cumulative_weight
        self.events = events or EventLog()
        self.gate = _linear(hidden_size, num_experts)
        self.register_buffer("expert_maturity", torch.zeros(num_experts, dtype=torch.long))
        # Maturity is read on every forward; a Python mirror of the buffer keeps that read off the device (on an
        # accelerator, reading a device tensor waits for every queued kernel).
        self._mature: list[bool] = [False] * num_experts
        self._strategy = self.strategy

    @property
    def num_experts(self) -> int:
        return self.gate.out_features

    @property
    def strategy(self) -> str:
        # An empty pool counts as dense: no expert has matured yet.
        mature = self.num_experts > 0 and all(self._mature)
        return SPARSE if mature else DENSE

    @property
    def dense_restricted(self) -> bool:
        """Does the dense phase leave some mature experts out of each sample's mix (``dense_top_m``)?"""
        return self.dense_top_m is not None and sum(self._mature) > self.dense_top_m

    def forward(self, hidden: Tensor) -> RouterOutput:
        """hidden: [..., H] (a pooled [B, H] or per-token [B, T, H]) -> routing over [..., E], in float32.

        The gate runs outside autocast and in at least float32 (as peft keeps adapters on a half-precision
        backbone): under bf16 autocast its logits, softmax and the rehearsal loss would otherwise be rounded to
        bf16, and a few hundredths of weight move a near-tie. The fused mixture casts the weights to its adapters'
        dtype where it uses them."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self._route(self.logits(hidden))

    def _route(self, logits: Tensor) -> RouterOutput:
        scaled = logits / self.temperature  # [..., E]
        if self.strategy == DENSE:
            if self.dense_restricted:  # every immature expert, and each sample's top-m mature ones
                mature = self.expert_maturity.bool()  # [E], on the device: no host read
                top = scaled.masked_fill(~mature, float("-inf")).topk(self.dense_top_m, dim=-1).indices  # [..., M]
                keep = (~mature).expand_as(scaled).scatter(-1, top, True)  # [..., E]
                scaled = scaled.masked_fill(~keep, float("-inf"))
            return RouterOutput(torch.softmax(scaled, dim=-1), logits, None, None, DENSE)
        k = min(self.top_k, self.num_experts)
        top, indices = scaled.topk(k, dim=-1)  # [..., K]
        topk_weights = torch.softmax(top, dim=-1)
        if self.cumulative_weight is not None and k > 1:
            topk_weights = self.cut_cumulative(scaled, top, indices)
        weights = torch.zeros_like(scaled).scatter(-1, indices, topk_weights)  # [..., E]
        return RouterOutput(weights, logits, indices, topk_weights, SPARSE)

    def logits(self, hidden: Tensor) -> Tensor:
        """Gate logits [..., E] of hidden states [..., H], in float32 (or the gate's dtype if wider), autocast off."""
        dtype = self.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            weight, bias = self.gate.weight.to(dtype), self.gate.bias.to(dtype)
            return torch.nn.functional.linear(hidden.to(dtype), weight, bias)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype routing is computed in: the gate's, at least float32."""
        return torch.promote_types(self.gate.weight.dtype, torch.float32)

    def cut_cumulative(self, scaled: Tensor, top: Tensor, indices: Tensor) -> Tensor:
        """Weights [..., K] of the top-k experts under the cumulative rule: an expert is kept when the
        probabilities of the experts ranked above it sum to less than ``cumulative_weight`` (the first is always
        kept); the kept ones are renormalised, the others weigh 0 (the mixture then adds nothing for them)."""
        probs = torch.softmax(scaled, dim=-1).gather(-1, indices)  # [..., K], descending
        before = probs.cumsum(-1) - probs  # [..., K] probability of the experts ranked higher
        keep = before < self.cumulative_weight
        kept = top.masked_fill(~keep, float("-inf"))
        return torch.softmax(kept, dim=-1)

    # ------------------------------------------------------------- experts
    def add_expert(self) -> int:
        """Append one expert (maturity 0); old gate rows and biases are copied unchanged."""
        old = self.gate
        new = _linear(self.hidden_size, old.out_features + 1).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_features].copy_(old.weight)
            new.bias[: old.out_features].copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
        self.gate = new
        self.expert_maturity = torch.cat([self.expert_maturity, self.expert_maturity.new_zeros(1)])
        self._mature.append(False)
        self._note_strategy()
        return self.num_experts - 1

    def remove_expert(self, column: int) -> None:
        keep = [i for i in range(self.num_experts) if i != column]
        old = self.gate
        new = _linear(self.hidden_size, len(keep)).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight[keep])
            new.bias.copy_(old.bias[keep])
        new.weight.requires_grad_(old.weight.requires_grad)  # a frozen gate stays frozen
        new.bias.requires_grad_(old.bias.requires_grad)
        self.gate = new
        self.expert_maturity = self.expert_maturity[keep]
        self._mature = [self._mature[i] for i in keep]
        self._note_strategy()

    def set_maturity(self, column: int, mature: bool = True) -> None:
        if self._mature[column] != mature:
            self.expert_maturity[column] = int(mature)
            self._mature[column] = mature
            if mature:
                self.events.emit(EXPERT_MATURED, column=column)
        self._note_strategy()

    def _note_strategy(self) -> None:
        strategy = self.strategy
        if strategy != self._strategy:
            self.events.emit(
                ROUTING_STRATEGY_CHANGED, previous=self._strategy, strategy=strategy, experts=self.num_experts
            )
            self._strategy = strategy

    # --------------------------------------------------------------- state
    def resize(self, num_experts: int) -> None:
        """Reshape to ``num_experts`` empty columns (before loading a saved state)."""
        device, dtype = self.gate.weight.device, self.gate.weight.dtype
        self.gate = _linear(self.hidden_size, num_experts).to(device, dtype)
        self.expert_maturity = torch.zeros(num_experts, dtype=torch.long, device=device)
        self._mature = [False] * num_experts

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        # without a gate weight, the strict load below names the missing key (a KeyError here named nothing)
        n = state_dict["gate.weight"].shape[0] if "gate.weight" in state_dict else self.num_experts
        if n != self.num_experts:
            self.resize(n)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._mature = [bool(m) for m in self.expert_maturity.tolist()]
        self._strategy = self.strategy
        return result


def _linear(hidden_size: int, num_experts: int) -> nn.Linear:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # an empty pool
        return nn.Linear(hidden_size, num_experts)
