"""``DyLoRAMoE``: a frozen causal LM, a growing pool of LoRA experts, the hybrid router and the novelty detector.

The forward pass runs the backbone once. The gate reads the input of decoder layer ``route_layer`` (experts
adapt only the layers from there on, so that prefix does not depend on the routing); a forward pre-hook on
that layer computes the routing mid-pass and hands it to the fused mixture, whose hooks add the routed
experts' deltas in every adapted layer. With ``route_layer=None`` the gate reads the frozen backbone's final
hidden states as in the spec, at the price of a second pass. ``mixing="reference"`` keeps the spec's
output-level mixing (one pass per expert) as a check.

During generation the routing of a sequence is decided on its prompt and pinned for every new token, so
generation with the KV cache equals generation without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from .backbone import load_backbone, untie_lm_head
from .checkpoint import load_pretrained, save_pretrained
from .config import DyLoRAConfig
from .data.sources import Example
from .events import EXPERT_CREATED, EXPERT_DELETED, SKILL_RECOGNISED, EventLog
from .experts import ExpertManager, ExpertMixture, MixturePlan, decoder_layers, expert_rank
from .novelty import NoveltyDetector, NoveltyResult, SkillLibrary, SkillSample, content_key
from .routing import DynamicHybridRouter, RouterOutput
from .routing.losses import rehearsal_loss


@dataclass
class DyLoRAOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus how the batch was routed.

    routing_weights: [B, E] or [B, T, E] mixing weights over experts (zeros for unselected experts).
    router_logits: gate logits of the same shape, for auxiliary losses.
    routing_strategy: ``dense`` or ``sparse``.
    rehearsal_loss: gate cross-entropy on stored routing features, when the forward was given some.
    """

    routing_weights: Tensor | None = None
    router_logits: Tensor | None = None
    routing_strategy: str | None = None
    rehearsal_loss: Tensor | None = None


_NO_EXPERT = -1  # force_expert(None)


class _RoutingComputed(Exception):
    """Stops a forward pass once the routing hook has run (routing-only passes)."""


@dataclass
class _Scope:
    attention_mask: Tensor | None
    pin: bool = False
    stop: bool = False
    routing: RouterOutput | None = None
    hidden: Tensor | None = None


class DyLoRAMoE(nn.Module):
    """The whole system around one backbone.

    Build it with ``DyLoRAMoE.from_config(DyLoRAConfig(...))`` (loads the backbone) or pass an already loaded
    backbone and tokenizer (tests use tiny models built from a config).
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        config: DyLoRAConfig | None = None,
        *,
        events: EventLog | None = None,
    ) -> None:
        super().__init__()
        self.config = config or DyLoRAConfig()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.events = events or EventLog()
        backbone.config.use_cache = True
        for p in backbone.parameters():
            p.requires_grad_(False)
        if self.config.trainable_lm_head:
            untie_lm_head(backbone)
        route_layer = self.config.router.route_layer
        layers = decoder_layers(backbone)
        if route_layer is not None and route_layer >= len(layers):
            raise ValueError(f"route_layer={route_layer} but the model has {len(layers)} decoder layers")
        self.experts = ExpertManager(backbone, self.config.expert, first_layer=route_layer or 0)
        self.mixture = ExpertMixture(self.experts)
        weight = next(backbone.parameters())
        self.router = DynamicHybridRouter(
            backbone.config.hidden_size,
            top_k=self.config.router.top_k,
            temperature=self.config.router.temperature,
            events=self.events,
        ).to(weight.device)
        self.library = SkillLibrary(self.config.novelty.capacity)
        self.novelty = NoveltyDetector(self.library, self.config.novelty)
        self._scope: _Scope | None = None
        self._forced: int | None = None  # router column every sequence is sent to (force_expert)
        if route_layer is not None:
            layers[route_layer].register_forward_pre_hook(self._route_hook, with_kwargs=True)

    @classmethod
    def from_config(cls, config: DyLoRAConfig | None = None, **kwargs) -> DyLoRAMoE:
        config = config or DyLoRAConfig()
        backbone, tokenizer = load_backbone(config.model, dtype=config.dtype, device=config.device)
        return cls(backbone, tokenizer, config, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, backbone: PreTrainedModel | None = None,
                        tokenizer: PreTrainedTokenizerBase | None = None, **overrides) -> DyLoRAMoE:
        """Load a system written by ``save_pretrained`` (the backbone is loaded from the saved config's
        ``model`` unless one is given); ``overrides`` replace saved DyLoRAConfig fields."""
        return load_pretrained(cls, path, backbone=backbone, tokenizer=tokenizer, **overrides)

    def save_pretrained(self, path: str | Path, extra=None) -> Path:
        """Experts as standard peft adapter folders, plus router, skill library and config; atomic.
        ``extra(folder)`` may write more files that must change together with the weights."""
        return save_pretrained(self, path, extra=extra)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def num_experts(self) -> int:
        return len(self.experts.expert_ids)

    # ------------------------------------------------------------------ experts
    def create_expert(self, rank: int | None = None) -> int:
        """Add an expert to the pool and a column to the gate; returns the expert id."""
        expert_id = self.experts.create_expert(rank)
        self.experts.disable_adapters()
        self.mixture.sync()
        self.router.add_expert()
        return expert_id

    def delete_expert(self, expert_id: int) -> None:
        column = self.column(expert_id)
        self.experts.delete_expert(expert_id)
        self.mixture.sync()
        self.router.remove_expert(column)
        skills = self.library.remove_expert(expert_id)
        self.events.emit(EXPERT_DELETED, expert_id=expert_id, skills=skills)

    def column(self, expert_id: int) -> int:
        """The router column of an expert."""
        if expert_id not in self.experts.expert_ids:
            raise KeyError(f"no expert with id {expert_id}; experts are {self.experts.expert_ids}")
        return self.experts.expert_ids.index(expert_id)

    def mark_mature(self, expert_id: int, mature: bool = True) -> None:
        self.router.set_maturity(self.column(expert_id), mature)

    def set_trainable(self, experts: Sequence[int] = (), *, router: bool = True) -> None:
        """Gradients flow only into the given experts and (optionally) the gate; the backbone stays frozen."""
        self.experts.set_trainable(experts)
        for p in self.router.parameters():
            p.requires_grad_(router)

    @contextlib.contextmanager
    def single_expert(self, expert_id: int) -> Iterator[None]:
        """Run the backbone with exactly one expert, through peft's own adapter path."""
        self.experts.set_active_expert(expert_id)
        try:
            yield
        finally:
            self.experts.disable_adapters()

    @contextlib.contextmanager
    def force_expert(self, expert_id: int | None) -> Iterator[None]:
        """Send every sequence (every token, with per-token routing) to ``expert_id`` with weight 1, without
        consulting the gate: oracle routing in benchmarks, or a caller that names its expert. ``None``: no
        expert at all (the frozen model's output, through the same path)."""
        column = _NO_EXPERT if expert_id is None else self.column(expert_id)
        outer, self._forced = self._forced, column
        try:
            yield
        finally:
            self._forced = outer

    # ------------------------------------------------------------------ skills
    @torch.no_grad()
    def embed(self, data: Sequence[str | Example] | Tensor | dict) -> tuple[Tensor, int]:
        """Skill embedding (spec 3.1.3): mean over examples and tokens of the unit-normalised hidden states of
        the frozen backbone (``novelty.layer``). Returns the [H] embedding and the number of examples used."""
        sample = self.embed_sample(data, gate=False)
        return sample.mean, len(sample)

    @torch.no_grad()
    def embed_sample(self, data: Sequence[str | Example] | Tensor | dict, *, gate: bool = True) -> SkillSample:
        """Per-example embeddings of skill data for the novelty decision: the mean of the unit-normalised
        hidden states of each example (``Example`` items embedded on the part ``novelty.embed_on`` names), and
        with ``gate`` what the router reads for each example. At most ``novelty.max_examples`` examples are
        used, chosen by a hash of their content, so the result does not depend on their order."""
        cfg = self.config.novelty
        features, gates, keys = [], [], []
        for input_ids, mask, gate_ids, gate_mask, key in self._novelty_batches(data):
            hidden = self._novelty_hidden(input_ids, mask)
            unit = nn.functional.normalize(hidden.float(), dim=-1)  # [B, T, H]
            m = mask[..., None].to(unit.dtype)
            features.append((unit * m).sum(1) / m.sum(1).clamp(min=1))  # [B, H]
            if gate:
                with self._plain():
                    gates.append(self._pool(self._routing_hidden(gate_ids, gate_mask), gate_mask).float())
            keys.append(key)
        if not features:
            raise ValueError("skill data is empty: give at least one example with a non-empty "
                             f"{cfg.embed_on if cfg.embed_on == 'response' else 'text'}")
        keys = torch.cat(keys)
        order = torch.argsort(keys)  # content-key order, whatever order the batches ran in
        return SkillSample(torch.cat(features).cpu()[order], torch.cat(gates).cpu()[order] if gate else None,
                           keys[order])

    def _novelty_hidden(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        layer = self.config.novelty.layer
        if layer == 0:  # the token embeddings: no pass through the decoder needed
            return self.backbone.get_input_embeddings()(input_ids)
        with self._plain():
            out = self.backbone.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False,
                                           output_hidden_states=layer != -1)
        if layer == -1:
            return out.last_hidden_state
        if layer >= len(out.hidden_states):
            raise ValueError(f"novelty.layer={layer} but the model has {len(out.hidden_states) - 1} decoder layers")
        return out.hidden_states[layer]

    def add_new_skill(self, data: Sequence[str | Example] | Tensor | dict, name: str | None = None) -> NoveltyResult:
        """Spec 3.1.3: embed the data; when the detector finds it novel, mark the previous expert mature and
        create an expert, a gate column and a library entry; otherwise fold the data into the known skill it
        belongs to. The result carries the detector's evidence."""
        return self.add_skill_sample(self.embed_sample(data), name)

    def add_skill_sample(self, sample: SkillSample, name: str | None = None) -> NoveltyResult:
        """``add_new_skill`` on data already embedded by ``embed_sample``."""
        embedding = nn.functional.normalize(sample.mean, dim=0)
        decision = self.novelty.decide(sample, embedding, (self.router, list(self.experts.expert_ids)))
        similarity = None
        if decision.nearest_skill is not None:
            known = self.library.skills[decision.nearest_skill].embedding
            similarity = float(nn.functional.cosine_similarity(known, embedding.to(known.device), dim=0))
        evidence = {"method": self.config.novelty.method, "statistic": decision.statistic,
                    "boundary": decision.boundary, "p_value": decision.p_value, "scores": decision.scores}
        if not decision.is_novel:
            skill = self.library.update_skill(decision.nearest_skill, embedding, len(sample), sample)
            self.events.emit(SKILL_RECOGNISED, skill_id=skill.skill_id, name=name or skill.name,
                             expert_id=skill.expert_id, similarity=similarity, **evidence)
            return NoveltyResult(False, skill.skill_id, skill.expert_id, decision.nearest_skill, similarity,
                                 self.experts.ranks[skill.expert_id], **evidence)
        if self.experts.expert_ids:
            self.mark_mature(self.experts.expert_ids[-1])
        cfg = self.config.expert
        rank = expert_rank(cfg.rank_rule, cfg.rank, cfg.max_rank, decision.excess)
        expert_id = self.create_expert(rank)
        skill = self.library.add_skill(embedding, expert_id=expert_id, name=name, examples=len(sample), sample=sample)
        self.events.emit(EXPERT_CREATED, expert_id=expert_id, skill_id=skill.skill_id, name=skill.name,
                         rank=rank, nearest_skill=decision.nearest_skill, similarity=similarity,
                         experts=self.num_experts, **evidence)
        return NoveltyResult(True, skill.skill_id, expert_id, decision.nearest_skill, similarity, rank, **evidence)

    def _novelty_batches(self, data) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """(ids, mask) to embed, (ids, mask) the router reads, and content keys [B], ``batch_size`` at a time."""
        cfg = self.config.novelty
        if isinstance(data, Tensor):
            data = {"input_ids": data}
        if isinstance(data, dict):
            ids = data["input_ids"]
            mask = data.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            keys = torch.tensor([content_key(" ".join(map(str, row.tolist()))) for row in ids], dtype=torch.long)
            order = torch.argsort(keys)[: cfg.max_examples]
            for i in range(0, order.numel(), cfg.batch_size):
                rows = order[i : i + cfg.batch_size]
                pair = (ids[rows].to(self.device), mask[rows].to(self.device))
                yield (*pair, *pair, keys[rows])
            return
        if self.tokenizer is None:
            raise ValueError("text data needs a tokenizer; pass token ids or build the model with a tokenizer")
        on_response = cfg.embed_on == "response"
        items = []
        for d in data:
            embedded = (d.response if on_response else d.text) if isinstance(d, Example) else d
            if isinstance(embedded, str) and embedded.strip():
                routed = d.text if isinstance(d, Example) else d
                items.append((content_key(d.text if isinstance(d, Example) else d), embedded, routed))
        items = sorted({key: item for key, *item in items}.items())[: cfg.max_examples]  # [(key, (text, routed))]
        items.sort(key=lambda item: len(item[1][0]))  # batches of similar length pad less; rows are re-keyed
        for i in range(0, len(items), cfg.batch_size):
            chunk = items[i : i + cfg.batch_size]
            enc = self.tokenizer([t for _, (t, _) in chunk], return_tensors="pt", padding=True, truncation=True,
                                 max_length=cfg.max_length)
            routed = self.tokenizer([r for _, (_, r) in chunk], return_tensors="pt", padding=True, truncation=True,
                                    max_length=cfg.max_length, add_special_tokens=False)
            yield (enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
                   routed["input_ids"].to(self.device), routed["attention_mask"].to(self.device),
                   torch.tensor([k for k, _ in chunk], dtype=torch.long))

    # ------------------------------------------------------------------ routing
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> RouterOutput:
        """The routing of a batch, without running the experts (a prefix pass up to ``route_layer``)."""
        return self._route_hidden(self._routing_hidden(input_ids, attention_mask), attention_mask)

    @torch.no_grad()
    def routing_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """What the gate reads: pooled [B, H] (sequence routing) or per-token [B, T, H] hidden states. They do
        not depend on the experts, so stored examples keep their features as the pool grows."""
        hidden = self._routing_hidden(input_ids, attention_mask)
        if self.config.router.granularity == "token":
            return hidden
        return self._pool(hidden, attention_mask)

    @torch.no_grad()
    def routing_features_for(self, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8) -> Tensor:
        """``routing_features`` of raw texts, tokenised as the model sees them: [N, H]."""
        rows = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=max_length, add_special_tokens=False)
            rows.append(self.routing_features(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)))
        return torch.cat(rows)

    def _routing_hidden(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if self.config.router.route_layer is None:
            return self._frozen_final_hidden(input_ids, attention_mask)
        with (self._plain(), self._routing_scope(attention_mask, stop=True) as scope,
              contextlib.suppress(_RoutingComputed)):
            self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return scope.hidden

    @staticmethod
    def _pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Masked mean over tokens: [B, T, H] -> [B, H]."""
        if attention_mask is None or attention_mask.shape[1] != hidden.shape[1]:
            return hidden.mean(1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _route_hidden(self, hidden: Tensor, attention_mask: Tensor | None) -> RouterOutput:
        if self._forced is not None:
            return self._forced_routing(hidden)
        if self.config.router.granularity == "token":
            return self.router(hidden)  # [B, T, E]
        # The gate is linear, so routing the mean hidden state equals averaging the per-token logits.
        return self.router(self._pool(hidden, attention_mask))  # [B, E]

    def _forced_routing(self, hidden: Tensor) -> RouterOutput:
        lead = hidden.shape[:-1] if self.config.router.granularity == "token" else hidden.shape[:1]  # [B] or [B, T]
        dtype, device = self.router.gate.weight.dtype, hidden.device
        weights = torch.zeros(*lead, self.num_experts, dtype=dtype, device=device)  # [..., E]
        if self._forced == _NO_EXPERT:
            return RouterOutput(weights, weights.clone(), None, None, "dense")  # every delta weighted 0
        weights[..., self._forced] = 1.0
        indices = torch.full((*lead, 1), self._forced, dtype=torch.long, device=device)  # [..., 1]
        return RouterOutput(weights, weights.clone(), indices, torch.ones(*lead, 1, dtype=dtype, device=device),
                            "sparse")

    @torch.no_grad()
    def _frozen_final_hidden(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        with self._plain():
            out = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state  # [B, T, H]

    def _route_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        scope = self._scope
        if scope is None or (scope.pin and scope.routing is not None):
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        if scope.stop:
            scope.hidden = hidden
            raise _RoutingComputed
        scope.routing = self._route_hidden(hidden, scope.attention_mask)
        self._apply_routing(scope.routing)

    def _apply_routing(self, routing: RouterOutput) -> None:
        ids, names = self.experts.expert_ids, self.experts.names()
        cacheable = not (torch.is_grad_enabled() and self.experts.trainable_ids)
        if routing.indices is None:
            self.experts.ensure_resident(ids)
            plan = MixturePlan(tuple(names), weights=routing.weights, cacheable=cacheable)
        else:
            used = routing.indices.unique().tolist()  # sorted columns selected by some sample
            self.experts.ensure_resident([ids[c] for c in used])
            active = tuple(names[c] for c in used)
            if len(used) == routing.indices.shape[-1]:
                # Every sample selected the same experts (always so at batch 1): the dense path over just
                # those experts is exact and skips the per-sample gather.
                plan = MixturePlan(active, weights=routing.weights[..., used], cacheable=cacheable)
            else:
                remap = torch.full((len(ids),), -1, dtype=torch.long, device=routing.indices.device)
                remap[used] = torch.arange(len(used), device=remap.device)
                plan = MixturePlan(active, indices=remap[routing.indices], topk_weights=routing.topk_weights,
                                   cacheable=cacheable)
        self.mixture.set_plan(plan)

    @contextlib.contextmanager
    def _routing_scope(self, attention_mask: Tensor | None, *, pin: bool = False,
                       stop: bool = False) -> Iterator[_Scope]:
        outer, plan = self._scope, self.mixture.plan
        self._scope = _Scope(attention_mask, pin=pin, stop=stop)
        try:
            yield self._scope
        finally:
            self._scope = outer
            self.mixture.set_plan(plan)

    @contextlib.contextmanager
    def _plain(self) -> Iterator[None]:
        """The frozen backbone alone: no routing, no expert deltas."""
        outer, plan = self._scope, self.mixture.plan
        self._scope = None
        self.mixture.set_plan(None)
        try:
            yield
        finally:
            self._scope = outer
            self.mixture.set_plan(plan)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        rehearsal: tuple[Tensor, Tensor] | None = None,
        **kwargs,
    ) -> DyLoRAOutput:
        """input_ids, attention_mask, labels: [B, T]. ``rehearsal`` = (features [M, H], expert columns [M]) of
        stored examples adds the gate's cross-entropy on them as ``rehearsal_loss`` (inside the forward, so a
        DDP-wrapped model reduces its gradient like any other). Other keyword arguments go to the backbone."""
        out = self._forward(input_ids, attention_mask, labels, **kwargs)
        if rehearsal is not None:
            features, columns = rehearsal
            out.rehearsal_loss = rehearsal_loss(self.router(features).logits, columns, self.router.temperature)
        return out

    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None,
                 **kwargs) -> DyLoRAOutput:
        if self.num_experts == 0:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            return DyLoRAOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values)
        if self.config.mixing == "reference":
            return self._reference_forward(input_ids, attention_mask, labels)
        pinned = self._scope is not None and self._scope.pin
        scope_cm = contextlib.nullcontext(self._scope) if pinned else self._routing_scope(attention_mask)
        with scope_cm as scope:
            if self.config.router.route_layer is None and scope.routing is None:
                scope.routing = self.route(input_ids, attention_mask)
                self._apply_routing(scope.routing)
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            routing = scope.routing
        return DyLoRAOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values,
                            routing_weights=routing.weights, router_logits=routing.logits,
                            routing_strategy=routing.strategy)

    def _reference_forward(self, input_ids: Tensor, attention_mask: Tensor | None,
                           labels: Tensor | None) -> DyLoRAOutput:
        """Spec 3.1.2: one full pass per routed expert, logits mixed with the routing weights."""
        routing = self.route(input_ids, attention_mask)
        weights = routing.weights  # [B, E] or [B, T, E]
        logits = None
        for column, expert_id in enumerate(list(self.experts.expert_ids)):
            w = weights[..., column]
            if not bool((w != 0).any()):
                continue
            with self._plain(), self.single_expert(expert_id):
                part = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            w = w[:, None, None] if w.dim() == 1 else w[..., None]  # broadcast over [B, T, V]
            logits = w * part if logits is None else logits + w * part
        loss = None
        if labels is not None:
            loss = self.backbone.loss_function(logits=logits, labels=labels,
                                               vocab_size=self.backbone.config.vocab_size)
        return DyLoRAOutput(loss=loss, logits=logits, routing_weights=routing.weights,
                            router_logits=routing.logits, routing_strategy=routing.strategy)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """``transformers`` generation through the fused path; each sequence is routed on its prompt (per-token
        routing routes every new token as it comes). The KV cache is used unless ``use_cache=False``."""
        if self.num_experts == 0:
            return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        per_sequence = self.config.router.granularity == "sequence"
        with self._routing_scope(attention_mask, pin=per_sequence) as scope:
            if self.config.router.route_layer is None:
                scope.routing = self.route(input_ids, attention_mask)
                self._apply_routing(scope.routing)
            return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int = 64, chat: bool = True,
                 batch_size: int | None = None, max_prompt_tokens: int | None = None) -> list[str]:
        """Greedy completions of text prompts, ``batch_size`` at a time (all at once by default), left-padded.
        The chat template is applied when ``chat`` and the tokenizer has one (and then it supplies the special
        tokens); prompts longer than ``max_prompt_tokens`` are truncated. Generation stops at the tokenizer's
        end-of-sequence token."""
        tok = self.tokenizer
        rendered = bool(chat and tok.chat_template)
        if rendered:
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        size = batch_size or max(len(prompts), 1)
        side, tok.padding_side = tok.padding_side, "left"
        texts: list[str] = []
        try:
            for i in range(0, len(prompts), size):
                enc = tok(list(prompts[i : i + size]), return_tensors="pt", padding=True,
                          add_special_tokens=not rendered, truncation=max_prompt_tokens is not None,
                          max_length=max_prompt_tokens).to(self.device)
                out = self.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        finally:
            tok.padding_side = side
        return texts
