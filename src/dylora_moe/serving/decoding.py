"""Decoding pieces both batching schemes share: end-of-sequence ids, the cut of a finished choice, stop strings,
the text safe to stream, and the token choice of a decode step (greedy or sampled, per row)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from .config import ServerConfig
from .requests import Choice, GenerationRequest


def eos_ids(model) -> set[int]:
    ids = model.backbone.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


def finish_choice(tok, r: GenerationRequest, new: list[int], eos: set[int]) -> Choice:
    """Cut the new tokens at end-of-sequence, the request's ``max_tokens`` and its first stop string."""
    kept, reason = [], "length"
    for t in new:
        if t in eos:
            reason = "stop"
            break
        kept.append(t)
        if len(kept) >= r.max_tokens:
            break
    text = tok.decode(kept, skip_special_tokens=True)
    cut = first_stop(text, r.stop)
    if cut is not None:
        text, reason = text[:cut], "stop"
    return Choice(text, reason, len(kept))


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of ``text`` that is final: before any stop string, without a trailing partial stop string or
    an incomplete multi-byte character."""
    cut = first_stop(text, stops)
    if cut is not None:
        return text[:cut]
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]


def guard(config: ServerConfig) -> LogitsProcessorList:
    """The server's decoding guard as ``transformers`` logits processors (empty when it is off)."""
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    return processors


def choose(logits: Tensor, requests: list[GenerationRequest], histories: list[list[int]] | None,
           processors: LogitsProcessorList) -> Tensor:
    """The next token of every row: logits [B, V] -> [B]. Each row is decoded as it would be alone: the guard
    reads the row's own tokens (``histories``: prompt and new tokens), a greedy row takes the argmax, a sampled
    row draws from its own temperature and top-p (``transformers``' order: temperature, then top-p)."""
    scores = logits.float()
    if processors:
        rows = [processors(torch.tensor([h], device=scores.device), scores[i: i + 1])
                for i, h in enumerate(histories)]
        scores = torch.cat(rows)  # [B, V]
    tokens = scores.argmax(-1)  # [B]
    sampled = [i for i, r in enumerate(requests) if r.sampling is not None]
    if sampled:
        idx = torch.tensor(sampled, device=scores.device)
        settings = torch.tensor([requests[i].sampling for i in sampled], device=scores.device)  # [S, 2]
        tokens[idx] = sample(scores[idx], settings[:, :1], settings[:, 1:])
    return tokens


def sample(scores: Tensor, temperature: Tensor, top_p: Tensor) -> Tensor:
    """scores [S, V], temperature and top_p [S, 1] -> one drawn token per row [S]: the smallest set of tokens
    whose probability reaches ``top_p`` (the most likely one always) keeps its scores, the rest is dropped."""
    scores = scores / temperature
    ordered, order = scores.sort(-1)  # ascending [S, V]
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p  # [S, V]
    drop[:, -1] = False
    scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)  # [S]
