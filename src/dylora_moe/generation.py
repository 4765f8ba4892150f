"""Generation through the fused mixture: ``transformers``' ``generate`` with the routing of each prompt, and
greedy text completion.

Each sequence is routed on its prompt and, under sequence routing, the routing is pinned for every new token,
so generation with the KV cache equals generation without it. Beam search and several returns per prompt
expand the batch inside ``generate``; the routing is taken from the first backbone call, which sees the
expanded rows. Per-token routing routes every new token as it comes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import DyLoRAMoE
    from .routing.control import Scope


@torch.no_grad()
def generate(model: DyLoRAMoE, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """``model.backbone.generate`` with the experts routed on the prompt; the KV cache is used unless
    ``use_cache=False``. input_ids, attention_mask: [B, T] (left-padded for batched prompts)."""
    with routed(model):
        return model.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@contextlib.contextmanager
def routed(model: DyLoRAMoE) -> Iterator[Scope | None]:
    """The routing of one generation: backbone calls inside it route each row on the input of the first call
    (its prompt) and, under sequence routing, keep that routing for every new token. Yields the scope, whose
    ``routing`` the first call sets (``None`` without experts), so callers can report it without routing the
    prompt a second time."""
    if model.num_experts == 0:
        yield None
        return
    per_sequence = model.config.router.granularity == "sequence"
    with model.routing.scoped(None, pin=per_sequence, from_inputs=True) as scope:
        yield scope


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists -> left-padded input_ids and attention_mask [B, T], so every prompt ends where generation
    starts (built here rather than by flipping the tokenizer's ``padding_side``, which is shared state)."""
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return input_ids, mask


def prompt_positions(attention_mask: Tensor) -> Tensor:
    """position_ids [B, T] of left-padded prompts as ``generate`` numbers them: each row's first attended token is
    0 (padding gets 0 too; it is masked). Positions matter to the gate's input wherever they enter the hidden
    states before ``route_layer`` (absolute position embeddings)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def complete(model: DyLoRAMoE, prompts: Sequence[str], *, max_new_tokens: int = 64, chat: bool = True,
             batch_size: int | None = None, max_prompt_tokens: int | None = None) -> list[str]:
    """Greedy completions of text prompts, ``batch_size`` at a time (all at once by default), left-padded.
    The chat template is applied when ``chat`` and the tokenizer has one (and then it supplies the special
    tokens); prompts longer than ``max_prompt_tokens`` are truncated on the tokenizer's ``truncation_side``.
    Generation stops at the tokenizer's end-of-sequence token."""
    tok = model.tokenizer
    pad = pad_id(tok)
    size = batch_size or max(len(prompts), 1)
    texts: list[str] = []
    for i in range(0, len(prompts), size):
        input_ids, mask = prompt_batch(model, prompts[i : i + size], chat=chat, max_prompt_tokens=max_prompt_tokens)
        out = generate(model, input_ids.to(model.device), mask.to(model.device), max_new_tokens=max_new_tokens,
                       do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        texts += tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    return texts


def pad_id(tok) -> int:
    """The id prompts are left-padded with: the tokenizer's pad token, else its end of sequence, else 0 (a
    padded position is masked out, so any id does)."""
    for token_id in (tok.pad_token_id, tok.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def prompt_batch(model: DyLoRAMoE, prompts: Sequence[str], *, chat: bool = True,
                 max_prompt_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """Prompts as ``complete`` feeds them to the model: a user turn of the chat template when ``chat`` and the
    tokenizer has one (which then supplies the special tokens), else the tokenizer's own special tokens;
    truncated to ``max_prompt_tokens``; left-padded input_ids and attention_mask [B, T] on the host."""
    tok = model.tokenizer
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 (or None: no cut), got {max_prompt_tokens}")
    rendered = bool(chat and tok.chat_template)
    if rendered:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    rows = tok(list(prompts), add_special_tokens=not rendered, truncation=max_prompt_tokens is not None,
               max_length=max_prompt_tokens)["input_ids"]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"prompt(s) {empty} have no tokens (an empty prompt, and a tokenizer that adds no start "
                         "token): give each prompt some text to continue, or use chat=True with a chat template")
    return left_pad(rows, pad_id(tok))
