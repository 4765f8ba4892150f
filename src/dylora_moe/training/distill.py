"""Keeping what the frozen model could do: a KL term from the frozen model to the routed system.

An expert trained on a few dozen examples in one format learns that format and, with it, habits that break
ordinary requests of its domain (an expert fitted to VerilogEval, whose answers start with a newline and
tabs, answers "Write a Verilog module for an AND gate" with newlines). The term below pulls the trained
expert's next-token distribution towards the frozen model's on *anchor prompts*: requests the expert will
see that are not its training format. They are, per training example, the prompt's first paragraph (the task
statement without the code the answer continues, e.g. a VerilogEval description without its module header),
with the chat template and raw, and the stored prompts of the skills learned before; every position counts,
the first answer token included. Its weight is ``TrainingConfig.kl_weight``. A prompt fixes only where an
answer starts; the habits that break free-form answers (a raw request answered by a loop of one line) show on
the tokens after it. With ``TrainingConfig.anchor_answers`` each anchor prompt is followed by that many tokens
of the frozen model's own greedy answer (generated once, before the step trains) and the KL covers them too:
the expert is taught the frozen model's next-token distribution along the frozen model's answers (word-level
distillation on the teacher's outputs, Kim & Rush 2016), not just at their first token. With
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
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..data.augment import prose_and_code
from ..data.preprocess import render_prompt
from ..generation import generate, left_pad

if TYPE_CHECKING:
    from ..model import DyLoRAMoE


def kl_to_frozen(logits: Tensor, frozen_logits: Tensor, mask: Tensor, positions: int | None = None) -> Tensor:
    """Mean over positions where ``mask`` is 1 of KL(frozen || system) between next-token distributions (any
    fixed teacher in place of the frozen model: the expert before the step for the retained anchors). With
    ``positions``, the sum over them divided by ``positions`` instead: the positions of a whole accumulated
    batch this one is a part of, so that the parts add up to its mean whatever their lengths.

    logits, frozen_logits: [B, T, V]; mask: [B, T] (1 = a position whose prediction counts).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    log_q = torch.log_softmax(frozen_logits.float(), dim=-1)  # [B, T, V]
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)  # [B, T]
    weights = mask.to(per_position.dtype)
    total = weights.sum().clamp_min(1.0) if positions is None else max(positions, 1)
    return (per_position * weights).sum() / total


def kl_on_anchors(model: DyLoRAMoE, ids: Tensor, mask: Tensor, expert_id: int,
                  positions: int | None = None) -> tuple[Tensor, Tensor]:
    """KL(frozen || ``model`` with ``expert_id`` forced) on anchor prompts ids, mask [B, T], and the expert's
    logits [B, T, V]. The frozen logits come from the same backbone with no expert (and, with
    ``trainable_lm_head``, the backbone's own head: ``frozen_head``), without gradient; the expert
    is forced (the gate is not asked), so the anchors cost one pass of the frozen model and one of the expert
    whatever the pool's size. ``positions``: as in ``kl_to_frozen``."""
    with torch.no_grad(), model.force_expert(None), model.frozen_head():
        frozen = model(input_ids=ids, attention_mask=mask).logits
    with model.force_expert(expert_id):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return kl_to_frozen(logits, frozen, mask, positions), logits


def first_token_unlikelihood(logits: Tensor, mask: Tensor, token_id: int, last: Tensor | None = None) -> Tensor:
    """Mean over rows of -log(1 - p(``token_id``)) at each row's request end (``last``; by default its last real
    position): the prediction of the first answer token after a request, where an end of sequence is never
    right (unlikelihood training, Welleck et al. 2020, on one token: an expert must not answer a request with
    nothing).

    logits: [B, T, V]; mask: [B, T] right-padded (1 = a real token); last: [B] positions, or None.
    """
    if last is None:
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


def build_anchors(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], expert_id: int, *,
                  max_length: int = 256) -> Anchors | None:
    """``Anchors`` of ``texts``, or ``None`` when none has a token (no prompts to anchor on: e.g. plain text
    data, whose examples are all response)."""
    try:
        return Anchors(tokenizer, texts, expert_id, max_length=max_length)
    except NoAnchors:
        return None


class NoAnchors(ValueError):
    """Every anchor prompt is empty: there is nothing to anchor a KL on."""


class Anchors:
    """Tokenised anchor prompts served in fixed-size, right-padded batches, cycling in order.

    Args:
        tokenizer: pads and tokenises (no special tokens: chat-rendered text carries its own).
        texts: the anchor prompts. expert_id: the expert they constrain. max_length: tokens kept per prompt.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], expert_id: int, *,
                 max_length: int = 256) -> None:
        self.ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
        self.ids = [ids for ids in self.ids if ids]  # an empty prompt (data without prompts) anchors nothing
        if not self.ids:
            raise NoAnchors("no anchor prompts: every one is empty")
        self.prompt_lengths = [len(ids) for ids in self.ids]  # a row's request ends here, its answer starts
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self.expert_id = expert_id
        self.max_length = max_length
        self._table: tuple[str, Tensor, Tensor, Tensor] | None = None  # every row, padded, on one device

    def __len__(self) -> int:
        return len(self.ids)

    def _rows(self, step: int, size: int) -> list[int]:
        return [(step * size + k) % len(self.ids) for k in range(size)]

    def _on(self, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
        """Every row right-padded, its mask and its request end, on ``device``: copied there once (and again
        only when the rows change), so a batch is slices of it, with no host-to-device copy per micro-batch."""
        if self._table is None or self._table[0] != str(device):
            width = max(len(r) for r in self.ids)
            ids = torch.full((len(self.ids), width), self.pad, dtype=torch.long)  # [N, T]
            mask = torch.zeros((len(self.ids), width), dtype=torch.long)  # [N, T]
            for k, r in enumerate(self.ids):
                ids[k, : len(r)] = torch.tensor(r)
                mask[k, : len(r)] = 1
            ends = torch.tensor([n - 1 for n in self.prompt_lengths])  # [N]
            self._table = (str(device), ids.to(device), mask.to(device), ends.to(device))
        return self._table[1:]

    def _take(self, table: Tensor, step: int, size: int) -> Tensor:
        """Rows ``_rows(step, size)`` of ``table``: consecutive ones, wrapping to the start, taken as slices."""
        n, start, parts = len(self.ids), (step * size) % len(self.ids), []
        while size > 0:
            take = min(size, n - start)
            parts.append(table[start : start + take])
            size, start = size - take, 0
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def positions(self, step: int, size: int) -> int:
        """The real tokens (the mask's ones) of the ``step``-th batch, counted on the host."""
        return sum(len(self.ids[r]) for r in self._rows(step, size))

    def batch(self, step: int, size: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask [size, T] of the ``step``-th batch (T: its longest row)."""
        width = max(len(self.ids[r]) for r in self._rows(step, size))
        ids, mask, _ = self._on(device)
        return self._take(ids, step, size)[:, :width], self._take(mask, step, size)[:, :width]

    def request_ends(self, step: int, size: int, device: torch.device | str = "cpu") -> Tensor:
        """[size] position of each row's last request token in the ``step``-th batch (where its answer is
        predicted), whether or not the frozen model's answer follows it."""
        return self._take(self._on(device)[2], step, size)

    @torch.no_grad()
    def answer_with_frozen(self, model: DyLoRAMoE, max_new_tokens: int, *, batch_size: int = 16,
                           cache: dict[tuple[int, ...], list[int]] | None = None) -> None:
        """Append to every anchor prompt the frozen model's greedy answer (no expert; at most ``max_new_tokens``
        tokens, up to and without its end of sequence; the row is cut to ``max_length`` from its start, so the
        prompt keeps its place). Rows of similar length are batched together (less padding).

        ``cache`` maps ``(max_new_tokens, *prompt ids)`` to an answer: the frozen model does not change while
        the pool grows, so a learner keeps one across its steps and earlier skills' anchors are answered once;
        rows found there are not generated again, and the answers generated are added to it."""
        cache = {} if cache is None else cache
        keys = [(max_new_tokens, *ids) for ids in self.ids]
        missing = sorted({k: r for r, k in enumerate(keys) if k not in cache}.values(), key=lambda r: len(self.ids[r]))
        pad = self.pad if self.eos_id is None else self.eos_id
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            input_ids, mask = left_pad([self.ids[r] for r in chunk], pad)
            with model.force_expert(None), model.frozen_head():
                out = generate(model, input_ids.to(model.device), mask.to(model.device), do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=self.eos_id)
            for r, answer in zip(chunk, out[:, input_ids.shape[1]:].tolist(), strict=True):
                cache[keys[r]] = answer[: answer.index(self.eos_id)] if self.eos_id in answer else answer
        self.ids = [(ids + cache[k])[: self.max_length] for ids, k in zip(self.ids, keys, strict=True)]
        self._table = None
