"""``DyLoRATrainer``: the Hugging Face Trainer with the two-phase schedule and the router's extra losses.

Only the documented extension points change: ``create_optimizer`` (one group for the trainable expert, one
for the gate), ``create_scheduler`` (the two-phase ``LambdaLR``), ``compute_loss`` (router rehearsal, the
optional load-balancing loss, the KL to the frozen model and to the expert before the step),
``get_batch_samples`` (the balance loss's routing shares of a whole accumulated batch) and ``log`` (their
running means).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import Trainer

from ..experts.manager import swapped
from ..routing.losses import load_balancing_loss, top1_counts
from .config import TrainingConfig
from .distill import Anchors, first_token_unlikelihood, kl_on_anchors, kl_to_frozen
from .rehearsal import RoutingMemory
from .schedule import two_phase_scheduler


class DyLoRATrainer(Trainer):
    """Trains the experts and gate that require gradients on one skill.

    Args:
        training: rates, phase lengths and loss weights.
        seed_steps: steps of phase 1 for this run (0 for a recognised skill: consolidation only).
        memory: stored routing features rehearsed by the gate at every step.
        anchors: token ids of prompts on which the trained expert is pulled towards the frozen model
            (``training/distill.py``), and the expert that is, when ``training.kl_weight`` > 0; with
            ``training.anchor_answers`` the frozen model's answers to them are generated when the trainer is built
            (those not already in ``frozen_answers``, a cache the learner keeps across its steps).
        retained: prompts of earlier skills the trained expert serves, on which it is pulled towards itself as
            it is when the trainer is built (its weights are copied then, and the output head's with
            ``trainable_lm_head``, which trains with it), when ``training.retain_kl_weight`` > 0.
    """

    def __init__(self, *args, training: TrainingConfig, seed_steps: int, memory: RoutingMemory | None = None,
                 anchors: Anchors | None = None, retained: Anchors | None = None,
                 frozen_answers: dict[tuple[int, ...], list[int]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.training = training
        self.seed_steps = seed_steps
        self.memory = memory
        self.anchors = anchors
        if anchors is not None and training.kl_weight > 0 and training.anchor_answers > 0:
            core = self._core()
            was_training = core.training
            core.eval()
            try:
                anchors.answer_with_frozen(core, training.anchor_answers, batch_size=training.eval_batch_size,
                                           cache=frozen_answers)
            finally:  # a failed generation leaves the model in the mode it was given in
                core.train(was_training)
        self.retained = retained if training.retain_kl_weight > 0 else None
        self._before = None  # the retained expert's weights as the step starts (the teacher)
        self._head_before = None  # and the trained output head's (none unless ``trainable_lm_head``)
        if self.retained is not None:
            core = self._core()
            self._before = [p.detach().clone() for p in core.experts.parameters(self.retained.expert_id)]
            self._head_before = [p.detach().clone() for p in trained_head(core)]
        self._rehearsal = None  # the memory does not change while one skill trains: batch it once
        self._micro_batches = 0  # training micro-batches so far: which anchor batch the next one takes
        self._step_start = (-1, 0)  # (optimizer step, micro-batches before its first one)
        self._positions: dict[int, int] = {}  # per anchor set: its positions in the current optimizer step
        self._extra: dict[str, torch.Tensor] = {}  # per loss term: its sum over the steps since the last log
        self._balance: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's top-1 shares [E] and decisions
        self._logged_step = 0
        self._evaluating = False  # inside ``evaluate``: its log holds its metrics, not the training terms

    def _core(self):
        return self.accelerator.unwrap_model(self.model)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            core = self._core()
            router = {id(p) for p in core.router.parameters()}
            experts = [p for p in core.parameters() if p.requires_grad and id(p) not in router]
            gate = [p for p in core.router.parameters() if p.requires_grad]
            groups = [{"params": experts, "lr": self.training.seed_lr}]
            if gate:
                groups.append({"params": gate, "lr": self.training.router_lr, "weight_decay": 0.0})
            self.optimizer = torch.optim.AdamW(groups, weight_decay=self.args.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            self.lr_scheduler = two_phase_scheduler(
                optimizer, seed_steps=self.seed_steps, seed_lr=self.training.seed_lr,
                consolidation_lr=self.training.consolidation_lr,
                constant_groups=tuple(range(1, len(optimizer.param_groups))),
            )
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss + weighted router losses. With ``num_items_in_batch`` (the response tokens of the whole
        accumulated batch) the task loss is a sum over this micro-batch's tokens divided by it, and the Trainer
        does not divide by the accumulation steps; the KL terms likewise sum over this micro-batch's anchor
        positions divided by those of the whole accumulated batch (``step_positions``); the load-balancing loss
        weighs this micro-batch's probabilities by the whole batch's top-1 shares (``get_batch_samples``); the
        rehearsal and unlikelihood losses, means over rows every micro-batch has as many of, are divided by the
        steps here, so every term of ``grad_accum`` micro-batches adds up to the term of one large batch."""
        core = self._core()
        # an evaluation pass (the Trainer's eval loop) reports the task's loss alone: the gate rehearses in training
        if model.training and self.memory is not None and self.training.rehearsal_weight > 0:
            if self._rehearsal is None:
                self._rehearsal = self.memory.batch(core.experts.expert_ids, core.device)
            inputs = {**inputs, "rehearsal": self._rehearsal}
        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        scaled = num_items_in_batch is not None
        share = 1.0 / steps if scaled else 1.0  # the Trainer divides unscaled losses by the steps itself
        whole = 1.0 if scaled else float(steps)  # and so a term normalised over the whole step is multiplied back
        loss = outputs.loss
        if scaled and self.args.average_tokens_across_devices:
            # ``num_items_in_batch`` then counts every process's tokens, while DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        # an evaluation pass (the Trainer's eval loop) is not part of the training terms ``log`` reports
        if model.training:
            self._note("task_loss", loss, 1.0 if scaled else 1.0 / steps)
        if outputs.rehearsal_loss is not None:
            loss = loss + share * self.training.rehearsal_weight * outputs.rehearsal_loss
            self._note("rehearsal_loss", outputs.rehearsal_loss, 1.0 / steps)
        if not model.training:  # an evaluation pass: the task's loss alone
            return (loss, outputs) if return_outputs else loss
        index = self.anchor_index()
        if self.training.kl_weight > 0 and self.anchors is not None:
            kl, logits, mask = self.frozen_kl(index)
            loss = loss + whole * self.training.kl_weight * kl
            self._note("kl_to_frozen", kl, 1.0)
            if self.training.empty_unlikelihood > 0 and self.anchors.eos_id is not None:
                ends = self.anchors.request_ends(index, self.args.per_device_train_batch_size, logits.device)
                unlikely = first_token_unlikelihood(logits, mask, self.anchors.eos_id, ends)
                loss = loss + share * self.training.empty_unlikelihood * unlikely
                self._note("empty_unlikelihood", unlikely, 1.0 / steps)
        if self.retained is not None:
            kl = self.retained_kl(index)
            loss = loss + whole * self.training.retain_kl_weight * kl
            self._note("kl_to_before", kl, 1.0)
        if self.training.balance_weight > 0 and outputs.router_logits is not None:
            logits, mask = outputs.router_logits, decisions(outputs.router_logits, inputs.get("attention_mask"))
            # one micro-batch (no shares counted beforehand): its own shares are the step's
            shares = (None, None) if self._balance is None else self._balance
            balance = load_balancing_loss(logits, core.router.temperature, *shares, mask=mask)
            loss = loss + whole * self.training.balance_weight * balance
            self._note("balance_loss", balance, 1.0)
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The Trainer's micro-batches of one optimizer step; with the load-balancing loss and more than one of
        them, also their top-1 routing shares (``balance_shares``), which every micro-batch's term is weighted
        by, so that the terms add up to the loss of one large batch (shares counted per micro-batch would
        weigh each one's probabilities by its own)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        wanted = self.training.balance_weight > 0 and len(batches) > 1 and self._core().num_experts > 0
        self._balance = self.balance_shares(batches) if wanted else None
        return batches, num_items

    @torch.no_grad()
    def balance_shares(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 shares [E] of the routing decisions of ``batches`` (every sequence, or every real token under
        per-token routing) and their number, on the device: a routing pass per micro-batch (the frozen prefix
        up to ``route_layer``, or the frozen backbone with ``route_layer=None``), without the experts; the gate
        does not change until the step ends, so it routes them as their training forwards will."""
        core = self._core()
        with self.accelerator.autocast():  # the precision the training forwards route in
            counts, rows = self._count_decisions(core, batches)
        return counts.float() / rows, rows

    @staticmethod
    def _count_decisions(core, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        counts, rows = None, None
        for batch in batches:
            ids, mask = batch["input_ids"].to(core.device), batch["attention_mask"].to(core.device)
            labels = batch["labels"].to(core.device) if "labels" in batch else None
            logits = core.routing.route(ids, mask, core.pool_mask(mask, labels)).logits
            part = top1_counts(logits, decisions(logits, mask))
            counts = part if counts is None else counts + part
            rows = part.sum() if rows is None else rows + part.sum()
        return counts, rows

    # ---------------------------------------------------------------- KL to the frozen model (distill.py)
    def anchor_index(self) -> int:
        """Which batch of anchor (and retained) prompts this training micro-batch takes: every micro-batch of
        every process its own (micro-batch k of process r takes batch k * processes + r), so gradient
        accumulation and data parallelism cover the anchors as one large batch would, rather than repeating
        one batch per optimizer step. Without either it is the optimizer step."""
        if self._step_start[0] != self.state.global_step:  # the first micro-batch of an optimizer step
            self._step_start = (self.state.global_step, self._micro_batches)
            self._positions = {}
        index = self._micro_batches * self.args.world_size + self.args.process_index
        self._micro_batches += 1
        return index

    def step_positions(self, anchors: Anchors) -> int:
        """The positions of ``anchors`` that the current optimizer step covers: those of the batches of its every
        micro-batch on every process (``anchor_index``), counted on the host once per step. A KL term divided by
        them adds up over the micro-batches to the mean over the whole accumulated batch, as one large batch
        would weigh its tokens, whatever the lengths of the prompts each micro-batch takes."""
        if id(anchors) not in self._positions:
            first, steps = self._step_start[1], getattr(self, "current_gradient_accumulation_steps", 1)
            world, size = self.args.world_size, self.args.per_device_train_batch_size
            self._positions[id(anchors)] = sum(anchors.positions(k * world + r, size)
                                               for k in range(first, first + steps) for r in range(world))
        return self._positions[id(anchors)]

    def kl_scale(self) -> int:
        """Data parallelism averages the processes' gradients, while ``step_positions`` counts every process's
        positions: each process's KL is multiplied by their number, as the task loss is."""
        return self.args.world_size

    def frozen_kl(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KL(frozen || trained expert) on anchor batch ``index``, summed over its positions and divided by the
        optimizer step's (``step_positions``): the expert is forced (the gate is not asked), the frozen logits
        come from the same backbone with no expert, without gradient. Also the expert's logits [B, T, V] and the
        batch's mask [B, T]."""
        core = self._core()
        ids, mask = self.anchors.batch(index, self.args.per_device_train_batch_size, core.device)
        # the unwrapped model: a second forward through DDP in one step would mark its gradients ready twice;
        # the anchor gradients join the task's in the same backward and are reduced with them
        kl, logits = kl_on_anchors(core, ids, mask, self.anchors.expert_id, self.step_positions(self.anchors))
        return kl * self.kl_scale(), logits, mask

    def retained_kl(self, index: int) -> torch.Tensor:
        """KL(the expert as the step started || the expert) on batch ``index`` of the retained prompts, the
        expert forced, divided by the optimizer step's positions as ``frozen_kl``; the teacher is the same expert
        with its copied weights swapped in (and the output head's, when it trains), without gradient."""
        core, expert = self._core(), self.retained.expert_id
        ids, mask = self.retained.batch(index, self.args.per_device_train_batch_size, core.device)
        with torch.no_grad(), self.retained_teacher(), core.force_expert(expert):
            before = core(input_ids=ids, attention_mask=mask).logits
        with core.force_expert(expert):
            logits = core(input_ids=ids, attention_mask=mask).logits
        return kl_to_frozen(logits, before, mask, self.step_positions(self.retained)) * self.kl_scale()

    @contextlib.contextmanager
    def retained_teacher(self) -> Iterator[None]:
        """The retained expert's weights and the trained output head's as the step started, swapped in."""
        core = self._core()
        head = swapped(trained_head(core), self._head_before)
        with core.experts.weights(self.retained.expert_id, self._before), head:
            yield

    def _note(self, name: str, value: torch.Tensor, share: float) -> None:
        """Accumulate this micro-batch's part of an optimizer step's loss term; kept on the device (a host read
        per micro-batch would stall an accelerator) until ``log``."""
        part = value.detach().float() * share
        self._extra[name] = part if name not in self._extra else self._extra[name] + part

    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation; its metrics are logged without the training terms, which stay for the next
        training log."""
        self._evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = False

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if not self._evaluating:
            steps = max(self.state.global_step - self._logged_step, 1)
            for name, total in self._extra.items():
                logs[name] = float(total) / steps
            self._extra = {}
            self._logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)


def trained_head(core) -> list[nn.Parameter]:
    """The output head's weights that train with the experts (``trainable_lm_head``); none when it is frozen."""
    return [p for p in core.backbone.get_output_embeddings().parameters() if p.requires_grad]


def decisions(router_logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which gate logits are routing decisions: ``None`` (all: [B, E], one per sequence) or, under per-token
    routing ([B, T, E]), the attention mask [B, T] (padding makes no decision)."""
    if router_logits.dim() == 3 and attention_mask is not None:
        return attention_mask
    return None
