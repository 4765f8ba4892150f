"""Training configuration of the continual loop: the two phases, the router, rehearsal, logging."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import check_types, from_dict

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainingConfig:
    """How each skill is learned (spec 4.3-4.5).

    Args:
        seed_steps, seed_lr: phase 1, few-shot high-rate seeding of a new expert.
        consolidation_steps, consolidation_lr: phase 2, low-rate consolidation; a recognised (not novel)
            skill gets only this phase, on the expert it was matched to. 40 steps: with ``raw_copies`` and
            ``instruction_views`` an expert sees each example in two to four renderings, and 16 steps left the
            training format's loss 3-20% above the chat-only recipe's; 40 was chosen on the VerilogEval tuning
            set and confirmed on the default and shared-code streams (README, "Free-form requests").
        router_lr: learning rate of the gate, trained in parallel with the expert in both phases.
        batch_size, grad_accum: optimizer batch = batch_size * grad_accum sequences (per process).
        max_length: tokens per training sequence. packing: pack whole examples into sequences.
        rehearsal_per_skill: routing features of this many training examples per skill are kept, and the
            gate rehearses all of them at every step so it does not forget where earlier skills go.
        rehearsal_weight: weight of that cross-entropy in the loss (0 turns rehearsal off).
        router_fit_steps: steps of a supervised gate fit on the stored features before the expert trains (so
            the new skill routes to its new expert from the first step and the expert gets the whole gradient)
            and after it (so every stored skill routes to its expert); 0 turns it off.
        router_weight_decay: L2 penalty of that fit (on the gate in standardised units). Unpenalised, the fit
            separates the stored rows perfectly with boundaries that move at every refit, so held-out prompts of
            old skills switch experts when a new skill arrives (transient forgetting); penalised, the problem has
            one optimum, which the repeated fits approach and which moves only as the memory does
            (``benchmarks/transient.py``).
        balance_weight: weight of the load-balancing auxiliary loss (Switch Transformer form), 0 = off.
        kl_weight: weight of KL(frozen model || trained expert) on anchor prompts, requests that are not in
            the training format (``training/distill.py``): keeps what the frozen model does outside the skill's
            format; 0 = off.
        retain_kl_weight: weight of KL(the expert before this step || the expert) on the stored prompts of the
            earlier steps whose skill the trained expert serves, when a recognised or returning skill trains it
            further (``training/distill.py``): what the expert answered them with is kept; 0 = off. Off by
            default: on SuperNI order 2 (2 + 4 optimizer steps per task) scores and losses were the same with 0.5
            as without (CommonsenseQA's loss rose 0.071 nats either way when Sentiment140 trained its expert), and
            on the default stream it held back a returning skill (HumanEval-a 0.619 against 0.603 nats) and made
            the recognised step's training 39% slower (README, "The SuperNI benchmark").
        expert_replay: when a step trains an expert that already serves earlier steps' skills (a recognised or
            returning skill), those steps' training examples join the step's: the expert trains on what it
            serves as joint training would, with the same optimizer steps. The label baselines never replay.
            Off by default: on SuperNI (2 + 4 steps per task) it removed score forgetting in both orders but
            left order 1's AP where it was (23.36 against 23.29) and lowered order 2's (24.86 against 26.53):
            a recognised task trained last gets half of its own step (README, "The SuperNI benchmark").
        anchors_per_skill: anchor prompts taken from each earlier skill (the skill's own: one per example).
        strip_leading_blank_lines: drop the blank lines a training response starts with (``data/augment.py``).
        raw_copies: also train on every example without the chat template (the prompt as plain text), so the
            expert learns the skill and not one rendering of it; with ``instruction_views`` the views too.
        instruction_views: also train on every completion-style example as a bare request (its prompt's
            prose as a chat request, its prompt's code and response as the answer: ``data/augment.py``) and
            store those requests' routing features, with requests naming the skill's language when its source
            declares one ("In Python: ..."), so the expert writes whole programs for requests phrased in prose
            and the gate routes them to it.
        raw_routing: also store, for the gate, the routing features of the skill's prompts (and views) as plain
            text, the rendering ``raw_copies`` trains the expert on: the gate otherwise sees only chat-rendered
            prompts and routes a raw request on features unlike any it was fitted on
            (``benchmarks/freeform_routing.py``).
        comment_views: with ``instruction_views``, a prompt that is one comment line (NL2Bash's "# description")
            is viewed as its text alone (``data/augment.py``). Off: on the NL2Bash tuning set
            (``benchmarks/freeform_ablation.py --skill nl2bash``) it made answers more often shell but looping
            (degenerate chat 5 of 16, raw 8 of 16, against 3 and 2 without; README, "Free-form requests").
        empty_unlikelihood: weight of -log(1 - p(end of sequence)) at the first answer token of every anchor
            prompt (with ``kl_weight`` > 0; ``training/distill.py``): an expert whose training answers all end
            after one line (NL2Bash's commands) learns to end right after any line, and answers a raw request
            with nothing; 0 = off.
        prose_anchors: the KL anchors also hold each training prompt's prose without comment markers or code,
            chat and raw (NL2Bash's "# find all .txt files" -> "find all .txt files"): a request as a user types
            it, on which the expert keeps the frozen model's continuation (``training/distill.py``).
        eval_batch_size: sequences per evaluation forward.
        report_to: Trainer loggers (tensorboard, wandb, mlflow when installed; "none" for none).
        precision: autocast of the training forwards: ``auto`` is bf16 on an accelerator that supports it and
            fp32 otherwise (on CPU); ``fp32``, ``bf16``, ``fp16`` force one. The weights keep their own dtypes
            (``DyLoRAConfig.dtype`` for the backbone; peft keeps adapters in fp32).
        seed: seeds expert initialisation and data order.
        logging_steps: Trainer logging interval.
    """

    seed_steps: int = field(default=8, metadata={"help": "phase-1 (seeding) optimizer steps"})
    seed_lr: float = field(default=2e-3, metadata={"help": "phase-1 learning rate"})
    consolidation_steps: int = field(default=40, metadata={"help": "phase-2 (consolidation) optimizer steps"})
    consolidation_lr: float = field(default=3e-4, metadata={"help": "phase-2 learning rate"})
    router_lr: float = field(default=1e-2, metadata={"help": "gate learning rate"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step and process"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    max_length: int = field(default=256, metadata={"help": "tokens per training sequence"})
    packing: bool = field(default=False, metadata={"help": "pack examples into full sequences"})
    rehearsal_per_skill: int = field(default=64, metadata={"help": "stored routing samples per skill"})
    rehearsal_weight: float = field(default=1.0, metadata={"help": "weight of router rehearsal loss"})
    router_fit_steps: int = field(default=200, metadata={"help": "gate fit steps before/after each skill"})
    router_weight_decay: float = field(default=1e-2, metadata={"help": "L2 penalty of the gate fit"})
    balance_weight: float = field(default=0.0, metadata={"help": "weight of load-balancing loss"})
    kl_weight: float = field(default=0.5, metadata={"help": "weight of KL to the frozen model on anchor prompts"})
    retain_kl_weight: float = field(default=0.0, metadata={"help": "weight of KL to the expert before the step "
                                                                    "on earlier prompts it serves"})
    expert_replay: bool = field(default=False, metadata={"help": "a trained expert also trains on the earlier "
                                                                  "steps' examples whose skills it serves"})
    anchors_per_skill: int = field(default=16, metadata={"help": "anchor prompts from each earlier skill"})
    strip_leading_blank_lines: bool = field(default=True, metadata={"help": "drop responses' leading blank lines"})
    raw_copies: bool = field(default=True, metadata={"help": "also train without the chat template"})
    instruction_views: bool = field(default=True, metadata={"help": "also train on prose requests of code prompts"})
    comment_views: bool = field(default=False, metadata={"help": "also view one-line comment prompts as requests"})
    raw_routing: bool = field(default=False, metadata={"help": "also store the routing features of the prompts "
                                                                "and views without the chat template"})
    empty_unlikelihood: float = field(default=0.0, metadata={"help": "weight of -log(1 - p(end of sequence)) as "
                                                                      "the first answer token of anchor prompts"})
    prose_anchors: bool = field(default=False, metadata={"help": "also anchor on prompts' prose without comment "
                                                                    "markers"})
    anchor_answers: int = field(default=0, metadata={"help": "tokens of the frozen model's greedy answer to each "
                                                              "anchor prompt the KL also covers (0: prompts only)"})
    eval_batch_size: int = field(default=8, metadata={"help": "sequences per eval forward"})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": "Trainer loggers"})
    precision: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16 (training autocast)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    logging_steps: int = field(default=4, metadata={"help": "Trainer logging interval"})

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        """Built from a stream's ``training:`` section, naming unknown keys instead of a TypeError."""
        return from_dict(cls, data)

    def __post_init__(self) -> None:
        check_types(self)
        if self.seed_steps < 0 or self.consolidation_steps < 0 or self.seed_steps + self.consolidation_steps == 0:
            raise ValueError("seed_steps and consolidation_steps must be >= 0 and not both 0")
        for name in ("seed_lr", "consolidation_lr", "router_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "logging_steps",
                     "rehearsal_per_skill"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
        if self.router_weight_decay < 0:
            raise ValueError(f"router_weight_decay must be >= 0, got {self.router_weight_decay}")
        for name in ("kl_weight", "retain_kl_weight", "empty_unlikelihood", "anchor_answers", "rehearsal_weight",
                     "balance_weight", "anchors_per_skill", "router_fit_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it (or MPS), else ``fp32``; others unchanged."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device.type == "mps":
        return "bf16"
    return "fp32"
