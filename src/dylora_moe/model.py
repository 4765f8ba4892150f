"""``DyLoRAMoE``: a frozen causal LM, a growing pool of LoRA experts, the hybrid router and the novelty detector.

The forward pass runs the backbone once: ``routing/control.py`` routes it mid-pass (on the input of decoder
layer ``route_layer``) and the fused mixture (``experts/fused.py``) adds the routed experts' deltas in every
adapted layer. ``mixing="reference"`` keeps the spec's output-level mixing (one pass per expert) as a check.
Sequence routing reads the prompt only: in training and evaluation the tokens labelled ``-100``, in generation
the whole input, so a sequence is routed the same way whether or not its answer is present.
Generation and text completion live in ``generation.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import generation
from .backbone import TrainableHead, absolute_if_local, load_backbone, untie_lm_head
from .checkpoint import load_pretrained, save_pretrained
from .config import DyLoRAConfig
from .data.preprocess import bos_prefix
from .data.sources import Example
from .events import EXPERT_CREATED, EXPERT_DELETED, EXPERTS_MERGED, SKILL_RECOGNISED, EventLog
from .experts import ExpertManager, ExpertMixture, decoder_layers, expert_rank
from .experts.manager import merge_weights
from .novelty import NoveltyDetector, NoveltyResult, SkillLibrary, SkillSample
from .novelty.detector import Decision
from .novelty.embedding import embed_sample
from .routing import DynamicHybridRouter, RouterOutput
from .routing.control import NO_EXPERT, RoutingControl, prompt_mask
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


class DyLoRAMoE(nn.Module):
    """The whole system around one backbone.

    Build it with ``DyLoRAMoE.from_config(DyLoRAConfig(...))`` (loads the backbone) or pass an already loaded
    backbone and tokenizer (tests use tiny models built from a config).
    """

    # The forward takes ``num_items_in_batch`` and normalises the task loss by it, so the Trainer must not divide
    # by the accumulation steps again (its own detection would guess from ``**kwargs``).
    accepts_loss_kwargs = True
    # The loss is the backbone's causal LM loss, which shifts the labels: the Trainer then counts the targets
    # ``num_items_in_batch`` normalises by without each row's first label, which no position predicts (a plain
    # text row, all of whose labels are targets, would otherwise add one to the count).
    loss_type = "ForCausalLM"

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        config: DyLoRAConfig | None = None,
        *,
        events: EventLog | None = None,
    ) -> None:
        super().__init__()
        check_single_device(backbone)
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
        self.experts = ExpertManager(backbone, self.config.expert, first_layer=self.config.router.first_adapted_layer)
        self.mixture = ExpertMixture(self.experts)
        weight = next(backbone.parameters())
        self.router = DynamicHybridRouter(
            backbone.config.hidden_size,
            top_k=self.config.router.top_k,
            temperature=self.config.router.temperature,
            dense_top_m=self.config.router.dense_top_m,
            cumulative_weight=self.config.router.cumulative_weight,
            events=self.events,
        ).to(weight.device)
        self.routing = RoutingControl(backbone, self.router, self.experts, self.mixture, self.config.router)
        self.library = SkillLibrary(self.config.novelty.capacity)
        self.novelty = NoveltyDetector(self.library, self.config.novelty)

    def _apply(self, fn, recurse: bool = True):
        """``to``/``cuda``/``float`` of the whole system (the Trainer moves its model to its device): offloaded
        experts' placeholders hold no data and are left out (``ExpertManager.placeholders_detached``)."""
        experts = self.__dict__.get("experts")  # not yet set while ``__init__`` runs
        if experts is None:
            return super()._apply(fn, recurse)
        with experts.placeholders_detached():
            out = super()._apply(fn, recurse)
        experts.convert_offloaded(fn)  # ``half()``/``to(dtype)``: offloaded experts follow the resident ones
        return out

    @classmethod
    def from_config(cls, config: DyLoRAConfig | None = None, **kwargs) -> DyLoRAMoE:
        """Load the backbone ``config.model`` and build the system on it. A local folder given by a relative path
        is recorded absolute, so the saved system finds it again from another working directory."""
        config = config or DyLoRAConfig()
        config = dataclasses.replace(config, model=absolute_if_local(config.model))
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

    def merge_experts(self, a: int, b: int, *, method: str = "cat", weights: tuple[float, float] | None = None,
                      rank: int | None = None, density: float | None = None) -> int:
        """Replace experts ``a`` and ``b`` by one (``ExpertManager.merge_experts``; ``weights`` by default
        those under which ``method`` averages the two, ``merge_weights``: ``cat`` then averages the deltas
        exactly). The gate gets one column for it (the two rows averaged, the biases combined as a log-sum-exp:
        a start that keeps the pair's total bias, not a fit to their inputs; refit the gate on the routing memory
        afterwards, as ``pool.merge`` does), their skills move to it, and it is mature when both were. Returns its
        id."""
        if a == b:
            raise ValueError(f"cannot merge expert {a} with itself")
        columns = [self.column(a), self.column(b)]
        mature = all(bool(self.router.expert_maturity[c]) for c in columns)
        weights = list(weights) if weights is not None else merge_weights(method)
        merged = self.experts.merge_experts([a, b], weights, method, rank=rank, density=density)
        self.experts.disable_adapters()
        self.mixture.sync()
        column = self.router.add_expert()
        with torch.no_grad():
            gate = self.router.gate
            gate.weight[column] = gate.weight[columns].mean(0)
            gate.bias[column] = torch.logsumexp(gate.bias[columns], 0)
        self.router.set_maturity(column, mature)
        skills = self.library.reassign(a, merged) + self.library.reassign(b, merged)
        for old in (a, b):
            self.delete_expert(old)
        self.experts.lineage[merged] = {"merged_from": [a, b], "method": method}
        self.events.emit(EXPERTS_MERGED, expert_id=merged, merged_from=[a, b], method=method, skills=skills,
                         rank=self.experts.ranks[merged])
        return merged

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
        """Run the backbone with exactly one expert, through peft's own adapter path. An offloaded expert is
        brought back for it and stays resident after, as one a routed forward used: the next routed forward
        offloads it if its batch does not use it."""
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
        with self.routing.force(NO_EXPERT if expert_id is None else self.column(expert_id)):
            yield

    @contextlib.contextmanager
    def frozen_head(self) -> Iterator[None]:
        """With ``trainable_lm_head``: the backbone's own output head in place of the trained one, so that a pass
        under ``force_expert(None)`` gives the frozen model's logits (``TrainableHead``). Otherwise nothing
        changes: the head is the backbone's, frozen."""
        head = self.backbone.get_output_embeddings()
        if not isinstance(head, TrainableHead):
            yield
            return
        outer, head.frozen = head.frozen, True
        try:
            yield
        finally:
            head.frozen = outer

    # ------------------------------------------------------------------ skills
    @torch.no_grad()
    def embed(self, data: Sequence[str | Example] | Tensor | dict) -> tuple[Tensor, int]:
        """Skill embedding (spec 3.1.3): mean over examples and tokens of the unit-normalised hidden states of
        the frozen backbone (``novelty.layer``). Returns the [H] embedding and the number of examples used."""
        sample = self.embed_sample(data, gate=False)
        return sample.mean, len(sample)

    def embed_sample(self, data: Sequence[str | Example] | Tensor | dict, *, gate: bool = True,
                     limit: int | None = None) -> SkillSample:
        """Per-example embeddings of skill data for the novelty decision (``novelty.embedding``)."""
        return embed_sample(self, data, gate=gate, limit=limit)

    def add_new_skill(self, data: Sequence[str | Example] | Tensor | dict, name: str | None = None) -> NoveltyResult:
        """Spec 3.1.3: embed the data; when the detector finds it novel, mark the previous expert mature and
        create an expert, a gate column and a library entry; otherwise fold the data into the known skill it
        belongs to (a mixture of two known skills, ``novelty.mixtures``, is named but folded into neither). The
        result carries the detector's evidence."""
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
        if decision.components is not None:
            return self._recognise_mixture(decision, name, similarity, evidence)
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

    def _recognise_mixture(self, decision: Decision, name: str | None, similarity: float | None,
                           evidence: dict) -> NoveltyResult:
        """Data that needs two known skills at once: no expert, and neither skill's sample changes (composed rows
        would blur the skill they were folded into); the result names both skills for multi-label routing."""
        main = self.library.skills[decision.components[0]]
        self.events.emit(SKILL_RECOGNISED, skill_id=main.skill_id, name=name or main.name, expert_id=main.expert_id,
                         similarity=similarity, components=list(decision.components),
                         mixture_weight=decision.mixture_weight, **evidence)
        return NoveltyResult(False, main.skill_id, main.expert_id, decision.nearest_skill, similarity,
                             self.experts.ranks[main.expert_id], components=list(decision.components),
                             mixture_weight=decision.mixture_weight, **evidence)

    def component_experts(self, result: NoveltyResult) -> list[int]:
        """The experts of a result's skills: both components' for a mixture, else the one expert."""
        if not result.components:
            return [result.expert_id]
        return [self.library.skills[s].expert_id for s in result.components]

    # ------------------------------------------------------------------ routing
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              position_ids: Tensor | None = None) -> RouterOutput:
        """The routing of a batch of prompts, without running the experts (a prefix pass up to ``route_layer``).
        Tokens are numbered as a forward without ``position_ids`` numbers them; to route left-padded prompts as
        generation does, pass ``generation.prompt_positions(attention_mask)``."""
        return self.routing.route(input_ids, attention_mask, position_ids=position_ids)

    @torch.no_grad()
    def routing_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """What the gate reads: pooled [B, H] (sequence routing) or per-token [B, T, H] hidden states. They do
        not depend on the experts, so stored examples keep their features as the pool grows."""
        return self.routing.features(input_ids, attention_mask)

    @torch.no_grad()
    def routing_features_for(self, texts: Sequence[str], *, raw: bool | Sequence[bool] = False, max_length: int = 256,
                             batch_size: int = 8) -> Tensor:
        """``routing_features`` of texts, tokenised as the model sees them, one row per gate decision: [N, H]
        with N = len(texts) under sequence routing, the number of tokens of all texts under per-token routing.
        ``raw`` marks the texts that are not chat-rendered (one flag, or one per text): they begin with the
        start-of-sequence token that training and generation give a raw prompt (``preprocess.bos_prefix``;
        none for tokenizers that add none), so the gate is fitted on what it later reads."""
        flags = [raw] * len(texts) if isinstance(raw, bool) else list(raw)
        if len(flags) != len(texts):
            raise ValueError(f"raw needs one flag per text, got {len(flags)} for {len(texts)} texts")
        prefix = bos_prefix(self.tokenizer)
        rows = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size]), add_special_tokens=False)["input_ids"]
            ids = [(prefix if flag else []) + row for row, flag in zip(tokens, flags[i : i + batch_size], strict=True)]
            # padded on the right whatever the tokenizer's (shared) padding side: each text's tokens keep the
            # positions they have alone, which absolute position embeddings put into the gate's input
            enc = self.tokenizer.pad({"input_ids": [row[:max_length] for row in ids]}, padding_side="right",
                                     return_tensors="pt")
            mask = enc["attention_mask"].to(self.device)
            features = self.routing_features(enc["input_ids"].to(self.device), mask)
            rows.append(features[mask.bool()] if features.dim() == 3 else features)  # [N_tokens, H] or [B, H]
        return torch.cat(rows)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        rehearsal: tuple[Tensor, Tensor] | None = None,
        **kwargs,
    ) -> DyLoRAOutput:
        """input_ids, attention_mask, labels: [B, T]. With labels, sequence routing pools over the prompt (the
        tokens labelled ``-100``) unless ``router.route_on="text"``; without, over the whole input.
        ``rehearsal`` = (features [M, H], expert columns [M] or multi-label target distributions [M, E]) of
        stored examples adds the gate's cross-entropy
        on them as ``rehearsal_loss`` (inside the forward, so a DDP-wrapped model reduces its gradient like any
        other). Other keyword arguments (``num_items_in_batch`` among them) go to the backbone."""
        if self.training or labels is not None:
            kwargs.setdefault("use_cache", False)  # a KV cache only serves generation
        out = self._forward(input_ids, attention_mask, labels, **kwargs)
        if rehearsal is not None:
            features, columns = rehearsal
            out.rehearsal_loss = rehearsal_loss(self.router(features).logits, columns, self.router.temperature)
        return out

    def pool_mask(self, attention_mask: Tensor | None, labels: Tensor | None) -> Tensor | None:
        """The tokens a sequence is routed on: its prompt when labels mark it, else every attended token."""
        if labels is None or self.config.router.route_on == "text":
            return attention_mask
        return prompt_mask(attention_mask, labels)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None,
                 **kwargs) -> DyLoRAOutput:
        if self.num_experts == 0:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            return DyLoRAOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values)
        pool_mask = self.pool_mask(attention_mask, labels)
        if self.config.mixing == "reference":
            return self._reference_forward(input_ids, attention_mask, labels, pool_mask, **kwargs)
        control = self.routing
        pinned = control.scope is not None and control.scope.pin
        scope_cm = contextlib.nullcontext(control.scope) if pinned else control.scoped(pool_mask)
        with scope_cm as scope:
            if self.config.router.separate_pass and scope.routing is None:
                scope.routing = control.route(input_ids, attention_mask, pool_mask, kwargs.get("position_ids"))
                control.apply(scope.routing)
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            routing = scope.routing
        return DyLoRAOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values,
                            routing_weights=routing.weights, router_logits=routing.logits,
                            routing_strategy=routing.strategy)

    def _reference_forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None,
                           pool_mask: Tensor | None, **kwargs) -> DyLoRAOutput:
        """Spec 3.1.2: one full pass per routed expert, logits mixed with the routing weights. Every pass numbers
        the tokens as the fused one would (``position_ids``, when given: left-padded rows)."""
        position_ids = kwargs.get("position_ids")
        positions = {} if position_ids is None else {"position_ids": position_ids}
        routing = self.routing.route(input_ids, attention_mask, pool_mask, position_ids)
        weights = routing.weights  # [B, E] or [B, T, E]
        logits = None
        # One host read per forward (not one per expert): the experts some sample or token weighs.
        used = (weights.reshape(-1, weights.shape[-1]) != 0).any(0).tolist()  # [E]
        # The manager's policy, as the fused forward applies it: the experts the batch weighs resident, the others
        # offloaded (``single_expert`` brings an expert back for its pass but sends none away).
        self.experts.ensure_resident([e for e, u in zip(self.experts.expert_ids, used, strict=True) if u])
        for column, expert_id in enumerate(list(self.experts.expert_ids)):
            if not used[column]:
                continue
            w = weights[..., column]
            with self.routing.plain(), self.single_expert(expert_id):
                part = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                     **positions).logits
            w = w[:, None, None] if w.dim() == 1 else w[..., None]  # broadcast over [B, T, V]
            logits = w * part if logits is None else logits + w * part
        if logits is None:  # no expert weighed anywhere (``force_expert(None)``): the frozen model's output
            with self.routing.plain():
                logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                       **positions).logits
        loss = None
        if labels is not None:
            loss = self.backbone.loss_function(logits=logits, labels=labels, vocab_size=self.backbone.config.vocab_size,
                                               num_items_in_batch=kwargs.get("num_items_in_batch"))
        return DyLoRAOutput(loss=loss, logits=logits, routing_weights=routing.weights,
                            router_logits=routing.logits, routing_strategy=routing.strategy)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """``transformers`` generation through the fused path: see ``generation.generate``."""
        return generation.generate(self, input_ids, attention_mask, **kwargs)

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int = 64, chat: bool = True,
                 batch_size: int | None = None, max_prompt_tokens: int | None = None) -> list[str]:
        """Greedy completions of text prompts: see ``generation.complete``."""
        return generation.complete(self, prompts, max_new_tokens=max_new_tokens, chat=chat, batch_size=batch_size,
                                   max_prompt_tokens=max_prompt_tokens)


def check_single_device(backbone: PreTrainedModel) -> None:
    """Refuse a backbone that accelerate dispatched over several devices or offloaded to the CPU or disk
    (``device_map``): the router, the fused mixture's stacks and expert offloading keep one device per model,
    and an offloaded layer's weights live on ``meta``, where moving an expert would lose it."""
    placed = set(map(str, (getattr(backbone, "hf_device_map", None) or {}).values()))
    if len(placed) > 1 or placed & {"disk", "meta"}:
        raise ValueError(
            f"the backbone is dispatched over {sorted(placed)} (device_map); DyLoRA-MoE runs a backbone on one "
            "device: load it without device_map (or device_map={'': 0}) and, to save accelerator memory, offload "
            "idle experts instead (expert.offload_device='cpu')")
