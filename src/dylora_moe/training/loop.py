"""The continual-learning loop (spec 4 and lifecycle phases 4.1-4.5).

For each step of a skill stream: the novelty detector decides whether the data is a new skill (phase 1);
a new skill gets an expert (phase 2) trained with high-rate seeding (phase 3) then low-rate consolidation
(phase 4), the gate learning in parallel while it rehearses where earlier skills go (phase 5); a known
skill continues training its expert at the consolidation rate; data recognised as a mixture of two known
skills (``NoveltyConfig.mixtures``) trains no expert: its routing features join the memory as multi-label rows
and only the gate is fitted. After each step every skill seen so far is
evaluated (loss on response tokens, routing of its held-out prompts), filling the loss matrix; with
``evaluate_ahead`` the skills still to come are evaluated too (the upper triangle, which forward transfer
needs).

Baselines (``evaluation/baselines.py``) reuse the loop by overriding ``assign`` (which expert a step trains),
``training_set``, ``train_expert`` (e.g. under pinned routing), ``eval_routing`` (pinned routing at
evaluation) and the class attribute ``trains_router``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from transformers import TrainingArguments

from ..data.augment import instruction_view, language_request, normalise_example
from ..data.preprocess import build_dataset, render_prompt, renders_chat
from ..data.sources import Example
from ..data.stream import SkillSpec, StreamSpec, load_examples, split_examples
from ..experts.pool import closest_pair, merge, serving_expert
from ..model import DyLoRAMoE
from ..novelty import NoveltyResult
from ..routing.fit import fit_gate
from ..routing.router import SPARSE
from .config import TrainingConfig, resolve_precision
from .distill import Anchors, anchor_texts, build_anchors
from .measure import collator, example_losses, gate_features, routed_experts, routing_entropy
from .rehearsal import RoutingMemory, mixture_key
from .trainer import DyLoRATrainer

logger = logging.getLogger(__name__)

# Under per-token routing the routing memory keeps one row per token; a skill keeps up to this many rows per
# stored example (``rehearsal_per_skill`` examples' worth of tokens, sampled uniformly).
TOKEN_ROWS_PER_EXAMPLE = 32


@dataclass
class StepData:
    """One stream step's data: the formatted examples and their token datasets."""

    skill: SkillSpec
    train: list[Example]
    held_out: list[Example]
    train_set: datasets.Dataset
    eval_set: datasets.Dataset
    held_out_features: torch.Tensor | None = None  # routing features of held-out prompts (expert-independent)


@dataclass
class StepRecord:
    """What happened at one step and what was measured after it."""

    step: int
    skill: str
    novelty: NoveltyResult
    train_examples: int
    eval_examples: int
    train_seconds: float
    losses: list[float | None]  # eval loss on every stream step's skill (None: not yet seen)
    routing: list[dict[int, float]]  # per seen step: expert id -> share of its held-out prompts (of their tokens,
    # under per-token routing)
    routing_entropy: list[float]
    experts: int
    train_log: list[dict] = field(default_factory=list)


class ContinualLearner:
    """Runs a stream through a ``DyLoRAMoE``.

    Args:
        model: the system (its tokenizer formats the data).
        stream: the skills, in order.
        training: rates, steps, rehearsal, logging.
        out_dir: Trainer logs go to ``out_dir/logs``.
        data_dir: folder of the datasets builtin sources read (e.g. ../shared/data).
        before_skill, after_skill: hooks called with (step, skill) and (step, StepRecord).
        evaluate_ahead: after each step also evaluate the skills not yet seen (the full loss matrix).
    """

    trains_router = True  # the gate trains with the expert and is fitted on the routing memory

    def __init__(self, model: DyLoRAMoE, stream: StreamSpec, training: TrainingConfig, out_dir: str | Path, *,
                 data_dir: str | Path | None = None, before_skill: Callable | None = None,
                 after_skill: Callable | None = None, evaluate_ahead: bool = False) -> None:
        check_one_process_per_gpu(model)
        self.model = model
        self.stream = stream
        self.training = training
        self.out_dir = Path(out_dir)
        self.data_dir = data_dir
        self.skills = stream.active(data_dir)
        per_token = model.config.router.granularity == "token"
        rows = training.rehearsal_per_skill * (TOKEN_ROWS_PER_EXAMPLE if per_token else 1)
        self.memory = RoutingMemory(rows, seed=training.seed)
        self.steps: list[StepData] = []
        self.evaluate_ahead = evaluate_ahead
        self._ahead: dict[int, StepData] = {}  # data of steps not yet run, prepared for evaluate_ahead
        self.records: list[StepRecord] = []
        self.merges: dict[int, int] = {}  # expert id -> the expert it was merged into (DyLoRAConfig.max_experts)
        # Evaluation reuses an example's loss while the expert it is routed to is the one it was scored with,
        # untrained since (``evaluate``): expert id -> the training run that last changed it, and per (step,
        # example) the (expert, run) it was scored with, its summed loss and its response tokens.
        self.trainings = 0
        self.trained_at: dict[int, int] = {}
        self.scores: dict[tuple[int, int], tuple[tuple[int | None, int], float, int]] = {}
        self.eval_features: dict[int, torch.Tensor] = {}  # per step, what the gate reads of its held-out examples
        self.examples_evaluated = 0  # examples that ran through the model, for the benchmark's cost figures
        self.frozen_answers: dict[tuple[int, ...], list[int]] = {}  # the frozen model's answers to anchor prompts
        self.before_skill = before_skill
        self.after_skill = after_skill

    # ------------------------------------------------------------------ data
    def prepare(self, skill: SkillSpec) -> StepData:
        examples = load_examples(skill, self.data_dir)
        train, held = split_examples(examples, skill.eval_share, skill.name)
        train, held = train[: skill.max_train], held[: skill.max_eval]
        cfg, tok = self.training, self.model.tokenizer
        chat = skill.format.chat
        return StepData(skill, train, held, self.train_dataset(train, chat),
                        build_dataset(tok, held, max_length=cfg.max_length, chat=chat, packing=False))

    def train_dataset(self, train: list[Example], chat: bool) -> datasets.Dataset:
        """The training sequences, after the format augmentation the training config asks for."""
        cfg, tok = self.training, self.model.tokenizer
        if cfg.strip_leading_blank_lines:
            train = [normalise_example(e) for e in train]
        built = build_dataset(tok, train, max_length=cfg.max_length, chat=chat, packing=cfg.packing)
        if cfg.raw_copies and chat:
            raw = build_dataset(tok, train, max_length=cfg.max_length, chat=False, packing=cfg.packing)
            built = datasets.concatenate_datasets([built, raw])
        if views := self.views(train):  # bare requests are chat turns, whatever the dataset's own format
            forms = (True, False) if cfg.raw_copies else (True,)  # and raw completions too, with raw_copies
            built = datasets.concatenate_datasets([built, *(
                build_dataset(tok, views, max_length=cfg.max_length, chat=form, packing=cfg.packing)
                for form in forms)])
        return built

    def views(self, examples: list[Example]) -> list[Example]:
        """The examples as bare requests (``data/augment.instruction_view``), when the config asks for them."""
        return [view for e in examples if (view := self.view(e)) is not None]

    def view(self, example: Example) -> Example | None:
        """``example`` as a bare request, or ``None`` (no view, or the config asks for none)."""
        if not self.training.instruction_views:
            return None
        return instruction_view(example, comments=self.training.comment_views)

    def prompts(self, step: StepData, examples: list[Example]) -> list[str]:
        return [render_prompt(self.model.tokenizer, e.prompt, step.skill.format.chat) for e in examples]

    def held_out_features(self, step: StepData) -> torch.Tensor:
        """The routing features of a step's held-out prompts [N, H], computed once (they do not depend on the
        experts) and kept on the step."""
        if step.held_out_features is None:
            texts, raw = self.routed_texts(step, step.held_out)
            step.held_out_features = self.model.routing_features_for(texts, raw=raw,
                                                                     max_length=self.training.max_length)
        return step.held_out_features

    def routed_texts(self, step: StepData, examples: list[Example]) -> tuple[list[str], list[bool]]:
        """What the gate reads of each example, as generation would route it, and whether it is raw (not
        chat-rendered): its rendered prompt, or for plain text (no prompt) the text itself, raw, as it trains
        (``data.preprocess.encode_example``)."""
        chat = step.skill.format.chat
        texts = [render_prompt(self.model.tokenizer, e.prompt, chat) if e.prompt.strip() else e.response
                 for e in examples]
        rendered = renders_chat(self.model.tokenizer, chat)  # no chat template: chat prompts stay raw text
        return texts, [not (rendered and e.prompt.strip()) for e in examples]

    # ------------------------------------------------------------------ loop
    def run(self, progress: Callable[[str], None] | None = None) -> list[StepRecord]:
        for i in range(len(self.records), len(self.skills)):
            self.run_step(i, progress)
        return self.records

    def run_step(self, i: int, progress: Callable[[str], None] | None = None) -> StepRecord:
        say = progress or (lambda msg: logger.info(msg))
        skill = self.skills[i]
        if self.before_skill:
            self.before_skill(i, skill)
        say(f"[{i + 1}/{len(self.skills)}] loading {skill.name}")
        data = self._ahead.pop(i, None) or self.prepare(skill)
        self.steps.append(data)
        transformers.set_seed(self.training.seed + i)  # identical experts on every process of a DDP run
        result = self.assign(i, data)
        verdict = "new skill -> expert" if result.is_novel else "recognised as skill"
        say(f"[{i + 1}/{len(self.skills)}] {skill.name}: {verdict} {result.expert_id} ({result.evidence()})")
        self.remember(data, result)
        start = time.perf_counter()
        self.fit_router()
        # A mixture of known skills teaches the gate to combine their experts (multi-label rows); no expert
        # trains on it, so neither skill's expert drifts towards the composed format.
        train_log = [] if result.components else self.train_expert(i, data, result)
        self.fit_router()
        seconds = time.perf_counter() - start
        self.model.mark_mature(result.expert_id)
        say(f"[{i + 1}/{len(self.skills)}] evaluating {i + 1} skill(s)")
        record = self.measure(i, data, result, seconds)
        record.train_log = train_log
        self.records.append(record)
        if self.after_skill:
            self.after_skill(i, record)
        return record

    # ------------------------------------------------------------------ overridable by baselines
    def assign(self, i: int, data: StepData) -> NoveltyResult:
        """Which expert step ``i`` trains: the novelty detector decides (spec 3.1.3). A new expert that takes
        the pool past ``max_experts`` first has the two closest established experts merged, as often as it
        takes to come back to the bound (more than once when the bound was lowered on a loaded system)."""
        result = self.model.add_new_skill(data.train, name=data.skill.name)
        self.bound_pool(result)
        return result

    def bound_pool(self, result: NoveltyResult) -> None:
        """When ``result`` created an expert that takes the pool past ``max_experts``, merge the two closest
        established experts (not the new one) until the pool is back at the bound."""
        limit = self.model.config.max_experts
        while result.is_novel and limit is not None and self.model.num_experts > limit:
            pair = closest_pair(self.model, exclude={result.expert_id})
            if pair is None:
                break
            merged = merge(self.model, self.memory, pair[0], pair[1], fit_steps=self.training.router_fit_steps,
                           fit_decay=self.training.router_weight_decay)
            self.merged(pair[0], pair[1], merged)
            logger.info("pool full (%d experts): merged experts %d and %d (skills %.3f alike) into %d",
                        limit, pair[0], pair[1], pair[2], merged)

    def merged(self, a: int, b: int, into: int) -> None:
        """Experts ``a`` and ``b`` were merged into ``into``: what the loop keeps per expert follows."""
        self.merges.update({a: into, b: into})

    def served_by(self, j: int) -> int:
        """The expert serving step ``j``'s skill now: its own, or the one it was merged or pruned into."""
        return serving_expert(self.records[j].novelty.expert_id, self.merges)

    def training_set(self, i: int, data: StepData, expert_id: int | None = None) -> datasets.Dataset:
        """What step ``i`` trains on: the step's own data, and with ``expert_replay`` the training data of the
        earlier steps whose skills ``expert_id`` serves (``replayed``), concatenated (the Trainer shuffles)."""
        earlier = self.replayed(i, expert_id) if expert_id is not None and self.training.expert_replay else []
        return datasets.concatenate_datasets([*earlier, data.train_set]) if earlier else data.train_set

    def replayed(self, i: int, expert_id: int) -> list[datasets.Dataset]:
        """The training sets of the steps before ``i`` whose skill ``expert_id`` serves now (its own, one
        recognised as it, or one merged or pruned into it)."""
        return [step.train_set for j, step in enumerate(self.steps[:i])
                if j < len(self.records) and self.served_by(j) == expert_id]

    def eval_routing(self, j: int) -> contextlib.AbstractContextManager:
        """How evaluation of step ``j``'s skill is routed: by the gate (a baseline may pin an expert)."""
        return contextlib.nullcontext()

    def remember(self, data: StepData, result: NoveltyResult) -> None:
        """Store, for gate rehearsal, the routing features the gate reads on the skill's training examples: of
        their prompts (sequence routing on the prompt, as in generation); of their whole texts per token (every
        token is routed on its own prefix); or, with ``route_on="text"``, of whole texts and prompts alone."""
        sample = data.train[: self.training.rehearsal_per_skill]
        prompts, raw = self.routed_texts(data, sample)  # raw: which texts are not chat-rendered
        whole = [p + e.response if e.prompt.strip() else p for p, e in zip(prompts, sample, strict=True)]
        views = self.views(sample)  # requests in prose route to the skill too, not only its dataset's layout
        if self.training.instruction_views:  # and requests that name the skill's language
            views += [r for e in sample if (r := language_request(e)) is not None]
        view_prompts = [render_prompt(self.model.tokenizer, v.prompt, True) for v in views]
        prompts, whole = prompts + view_prompts, whole + [p + v.response for p, v in zip(view_prompts, views,
                                                                                          strict=True)]
        raw += [not renders_chat(self.model.tokenizer, True)] * len(view_prompts)
        if self.training.raw_routing:  # the same requests as plain text (a chat-format skill's prompts too)
            plain = (sample if data.skill.format.chat else []) + views
            prompts, whole = prompts + [e.prompt for e in plain], whole + [e.prompt + e.response for e in plain]
            raw += [True] * len(plain)
        router = self.model.config.router
        if router.granularity == "token":
            texts, flags = whole, raw
        elif router.route_on == "prompt":
            texts, flags = prompts, raw
        else:
            texts, flags = whole + prompts, raw + raw
        feats = self.model.routing_features_for(texts, raw=flags, max_length=self.training.max_length)
        if result.components:  # a mixture of two known skills: multi-label rows, under their own key
            self.memory.add(mixture_key(result.components), self.model.component_experts(result), feats)
        else:
            self.memory.add(result.skill_id, result.expert_id, feats)

    def fit_router(self) -> None:
        if not self.trains_router:
            return
        batch = self.memory.batch(self.model.experts.expert_ids, self.model.device)
        if batch is not None and self.training.router_fit_steps > 0 and self.training.rehearsal_weight > 0:
            fit_gate(self.model.router, *batch, steps=self.training.router_fit_steps,
                     weight_decay=self.training.router_weight_decay)

    def train_expert(self, i: int, data: StepData, result: NoveltyResult,
                     steps: tuple[int, int] | None = None) -> list[dict]:
        """Train the step's expert (and the gate) on ``training_set``: ``steps`` = (seeding, consolidation)
        optimizer steps, by default ``seed_steps`` (new skills only) and ``consolidation_steps``."""
        cfg = self.training
        seed_steps = cfg.seed_steps if result.is_novel else 0
        consolidation_steps = cfg.consolidation_steps
        if steps is not None:
            seed_steps, consolidation_steps = steps
        if seed_steps + consolidation_steps == 0:  # the Trainer, given max_steps=0, would still take a step
            return []
        self.model.set_trainable([result.expert_id], router=self.trains_router)
        self.model.train()
        args = TrainingArguments(
            output_dir=str(self.out_dir / "logs" / f"step_{i}"),
            max_steps=seed_steps + consolidation_steps, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.seed_lr, weight_decay=0.0,
            logging_steps=cfg.logging_steps, report_to=cfg.report_to, save_strategy="no", seed=cfg.seed + i,
            remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
            disable_tqdm=False, warmup_steps=0, use_cpu=self.model.device.type == "cpu",
            max_grad_norm=1.0, run_name=f"{self.stream.name}-step{i}-{data.skill.name}",
            **precision_flags(resolve_precision(cfg.precision, self.model.device)),
        )
        trainer = DyLoRATrainer(model=self.model, args=args,
                                train_dataset=self.training_set(i, data, result.expert_id),
                                data_collator=collator(self.model), training=cfg, seed_steps=seed_steps,
                                memory=self.memory if self.trains_router else None,
                                anchors=self.anchors(i, data, result.expert_id) if cfg.kl_weight > 0 else None,
                                retained=self.retained(i, result.expert_id) if cfg.retain_kl_weight > 0 else None,
                                frozen_answers=self.frozen_answers)
        trainer.train()
        self.trainings += 1
        self.trained_at[result.expert_id] = self.trainings
        self.model.set_trainable([], router=False)
        self.model.eval()
        return [entry for entry in trainer.state.log_history if "loss" in entry or "task_loss" in entry]

    def anchors(self, i: int, data: StepData, expert_id: int) -> Anchors | None:
        """Anchor prompts of the KL to the frozen model: this skill's requests without their code, and prompts of
        the skills seen before (``training/distill.py``). A request the instruction views teach the expert to
        answer in the skill's language is no anchor: the KL would pull that answer back to the frozen model's.
        ``None`` when nothing is left to anchor on."""
        others = [step for j, step in enumerate(self.steps[:i])  # a returning skill's own prompts are no anchor
                  if j < len(self.records) and self.served_by(j) != expert_id]
        per = self.training.anchors_per_skill
        earlier = [p for step in others for p in self.prompts(step, prompted(step.train[:per]))]
        own = [e.prompt for e in data.train if self.view(e) is None]
        texts = anchor_texts(self.model.tokenizer, own, earlier, with_prose=self.training.prose_anchors)
        return build_anchors(self.model.tokenizer, texts, expert_id, max_length=self.training.max_length)

    def retained(self, i: int, expert_id: int) -> Anchors | None:
        """Prompts of the earlier steps whose skill ``expert_id`` serves (a recognised or returning skill trains
        it further), on which the expert keeps what it answered before this step (``training/distill.py``);
        ``None`` when the expert is new."""
        mine = [step for j, step in enumerate(self.steps[:i])
                if j < len(self.records) and self.served_by(j) == expert_id]
        per = self.training.anchors_per_skill
        texts = [p for step in mine for p in self.prompts(step, prompted(step.train[:per]))]
        return build_anchors(self.model.tokenizer, texts, expert_id, max_length=self.training.max_length)

    def measure(self, i: int, data: StepData, result: NoveltyResult, seconds: float) -> StepRecord:
        losses: list[float | None] = [None] * len(self.skills)
        routing, entropy = [], []
        for j, step in enumerate(self.steps):
            losses[j] = self.evaluate(j, step)
            chosen = routed_experts(self.model, self.held_out_features(step))
            shares = {e: chosen.count(e) / len(chosen) for e in sorted(set(chosen))}
            routing.append(shares)
            entropy.append(routing_entropy(list(shares.values())))
        if self.evaluate_ahead:
            for j in range(len(self.steps), len(self.skills)):
                if j not in self._ahead:
                    self._ahead[j] = self.prepare(self.skills[j])
                losses[j] = self.evaluate(j, self._ahead[j])
        return StepRecord(i, data.skill.name, result, len(data.train), len(data.held_out), seconds, losses,
                          routing, entropy, self.model.num_experts)

    def evaluate(self, j: int, step: StepData) -> float:
        """Eval loss on step ``j``'s held-out examples, routed as ``eval_routing`` says. Where ``eval_experts``
        names the one expert that decides each example's loss, an example keeps the loss it was last scored with
        while its expert is the same and untrained since; only the others run."""
        experts = self.eval_experts(j, step)
        if experts is None:
            with self.eval_routing(j):
                rows = example_losses(self.model, step.eval_set, self.training.eval_batch_size)
            self.examples_evaluated += len(rows)
        else:
            keys = [(e, self.trained_at.get(e, 0) if e is not None else 0) for e in experts]
            todo = [k for k, key in enumerate(keys) if (j, k) not in self.scores or self.scores[j, k][0] != key]
            if todo:
                with self.eval_routing(j):
                    fresh = example_losses(self.model, step.eval_set.select(todo), self.training.eval_batch_size)
                self.scores.update({(j, k): (keys[k], *row) for k, row in zip(todo, fresh, strict=True)})
                self.examples_evaluated += len(todo)
            rows = [self.scores[j, k][1:] for k in range(len(keys))]
        return sum(total for total, _ in rows) / max(sum(count for _, count in rows), 1)

    def eval_experts(self, j: int, step: StepData) -> list[int | None] | None:
        """The expert (``None``: the frozen model) that alone decides the eval loss of each of step ``j``'s
        held-out examples, or ``None`` when no single expert does: once every expert is mature the gate routes
        each sequence top-1, and the loss depends on that expert's weights only (inside the one fused pass, or
        in the one expert pass of output-level mixing, weighted 1). The gate's inputs come from the frozen
        backbone, so they are computed once per step's held-out set and routed by the current gate each time.
        With ``trainable_lm_head`` the shared head trains at every step, and no expert alone decides a loss."""
        router, config = self.model.router, self.model.config
        if router.strategy != SPARSE or router.top_k != 1 or config.router.granularity != "sequence":
            return None
        if config.trainable_lm_head:
            return None
        if j not in self.eval_features:
            self.eval_features[j] = gate_features(self.model, step.eval_set, self.training.eval_batch_size)
        return routed_experts(self.model, self.eval_features[j])


def prompted(examples: list[Example]) -> list[Example]:
    """The examples that have a prompt (plain text has none to anchor a KL on)."""
    return [e for e in examples if e.prompt.strip()]


def check_one_process_per_gpu(model: DyLoRAMoE) -> None:
    """Refuse to train on several visible GPUs from one process: the Trainer would wrap the model in
    ``DataParallel``, whose replicas share one routing scope and mixture plan. Data parallelism is one process
    per GPU (``torchrun``), where each process sees its own."""
    launched = launched_processes() > 1  # torchrun/accelerate, before the Trainer joins
    distributed = launched or (torch.distributed.is_available() and torch.distributed.is_initialized())
    if model.device.type == "cuda" and torch.cuda.device_count() > 1 and not distributed:
        raise ValueError(
            f"{torch.cuda.device_count()} GPUs are visible to one process; train on one "
            "(CUDA_VISIBLE_DEVICES=0 dylora train ...) or on all of them with one process each "
            "(accelerate launch -m dylora_moe.cli train ..., or torchrun: one process per GPU)")


def precision_flags(precision: str) -> dict[str, bool]:
    """``TrainingArguments`` autocast flags of a resolved precision."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def launched_processes() -> int:
    """Processes of a data-parallel launch (torchrun and accelerate set ``WORLD_SIZE``; 1 without one), known
    before the Trainer joins them."""
    return int(os.environ.get("WORLD_SIZE", "1"))
