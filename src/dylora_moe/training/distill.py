"""Keeping what the frozen model could do: a KL term from the frozen model to the routed system.

An expert trained on a few dozen examples in one format learns that format and, with it, habits that break
ordinary requests of its domain (an expert fitted to VerilogEval, whose answers start with a newline and
tabs, answers "Write a Verilog module for an AND gate" with newlines). The term below pulls the trained
expert's next-token distribution towards the frozen model's on *anchor prompts*: requests the expert will
see that are not its training format. They are, per training example, the prompt's first paragraph (the task
statement without the code the answer continues, e.g. a VerilogEval description without its module header),
with the chat template and raw, and the stored prompts of the skills learned before; every position counts,
the first answer token included. Its weight is ``TrainingConfig.kl_weight``. With
``TrainingConfig.prose_anchors`` each prompt's prose without comment markers is an anchor too (NL2Bash's
``# find all .txt files`` -> ``find all .txt files``, the request as a user types it).

An expert whose training answers are all one line and an end of sequence (NL2Bash's commands) learns to end
after any line that is not its prompt's comment, and answers a raw request ("How do I ... in bash?") with
nothing, whatever the KL: on the same anchor prompts ``TrainingConfig.empty_unlikelihood`` adds
-log(1 - p(end of sequence)) at the first answer token (unlikelihood training, Welleck et al. 2020, on the one
token that makes an answer empty).

An expert that a recognised skill trains further (a returning skill, or a new task the detector recognised as
an earlier one) already answers the earlier skills it serves, and the frozen model is the wrong target there:
those earlier skills' stored prompts are anchored instead to the expert as it was before the step (its weights
copied when the step starts; learning without forgetting, Li & Hoiem 2016, on the stored prompts), with weight
``TrainingConfig.retain_kl_weight`` (off by default: measured without effect on SuperNI, README). The term
averages over every position of the prompt, so the first answer token, which decides a classification task's
answer, is one position of a few hundred on SuperNI's long prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..data.augment import prose_and_code
from ..data.preprocess import render_prompt


def kl_to_frozen(logits: Tensor, frozen_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over positions where ``mask`` is 1 of KL(frozen || system) between next-token distributions (any
    fixed teacher in place of the frozen model: the expert before the step for the retained anchors).

    logits, frozen_logits: [B, T, V]; mask: [B, T] (1 = a position whose prediction counts).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    log_q = torch.log_softmax(frozen_logits.float(), dim=-1)  # [B, T, V]
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)  # [B, T]
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def first_token_unlikelihood(logits: Tensor, mask: Tensor, token_id: int) -> Tensor:
    """Mean over rows of -log(1 - p(``token_id``)) at each row's last real position: the prediction of the
    first answer token after a request, where an end of sequence is never right (unlikelihood training, Welleck
    et al. 2020, on one token: an expert must not answer a request with nothing).

    logits: [B, T, V]; mask: [B, T] right-padded (1 = a real token).
    """
    last = (mask.sum(1) - 1).clamp_min(0)  # [B]
    rows = logits[torch.arange(logits.shape[0], device=logits.device), last].float()  # [B, V]
    p = torch.softmax(rows, dim=-1)[:, token_id]  # [B]
    return -torch.log1p(-p.clamp(max=1.0 - 1e-6)).mean()


def first_paragraph(prompt: str) -> str:
    """The prompt up to its first blank line (all of it when it has none), without surrounding whitespace."""
    text = prompt.strip()
    for sep in ("\n\n", "\n\t\n", "\n \n"):
        text = text.split(sep, 1)[0]
    return text.strip()


def prose(prompt: str) -> str:
    """The prompt's prose without comment markers or code, on one line (``data/augment.prose_and_code``):
    NL2Bash's ``# Find all .txt files`` -> ``Find all .txt files``; empty when the prompt holds none."""
    return " ".join(prose_and_code(prompt)[0]).strip()


def anchor_texts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], earlier: Sequence[str] = (), *,
                 with_prose: bool = False) -> list[str]:
    """Anchor prompts of one skill: each prompt's first paragraph with the chat template and raw (and, with
    ``with_prose``, its prose without comment markers, when that differs: the request as a user types it),
    then the (already rendered) prompts of earlier skills."""
    texts = []
    for prompt in prompts:
        requests = [first_paragraph(prompt)]
        if with_prose:
            requests.append(prose(prompt))
        for request in dict.fromkeys(r for r in requests if r):
            texts += [render_prompt(tokenizer, request, True), request + "\n"]
    return texts + list(earlier)


class Anchors:
    """Tokenised anchor prompts served in fixed-size, right-padded batches, cycling in order.

    Args:
        tokenizer: pads and tokenises (no special tokens: chat-rendered text carries its own).
        texts: the anchor prompts. expert_id: the expert they constrain. max_length: tokens kept per prompt.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], expert_id: int, *,
                 max_length: int = 256) -> None:
        if not texts:
            raise ValueError("no anchor prompts")
        self.ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
        self.ids = [ids for ids in self.ids if ids]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self.expert_id = expert_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, step: int, size: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask [size, T] of the ``step``-th batch."""
        rows = [self.ids[(step * size + k) % len(self.ids)] for k in range(size)]
        width = max(len(r) for r in rows)
        ids = torch.full((size, width), self.pad, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = 1
        return ids.to(device), mask.to(device)
