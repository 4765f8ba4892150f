"""Examples -> token ids with ``datasets``: chat formatting, loss only on response tokens, optional packing.

Prompt and response are tokenised separately and concatenated, so the boundary is exact whatever the
tokenizer merges. Labels are ``-100`` on prompt tokens. With packing (spec 4.1) whole examples are
concatenated into blocks of at most ``max_length`` tokens; the first token of every packed example is
never a label, so no example is trained to follow the previous one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import datasets
from transformers import PreTrainedTokenizerBase

from .sources import Example

IGNORE = -100

logger = logging.getLogger(__name__)


def renders_chat(tokenizer: PreTrainedTokenizerBase, chat: bool) -> bool:
    """Whether a prompt becomes a chat turn: asked for, and the tokenizer has a chat template. A prompt that does
    not is raw text, which starts with the tokenizer's start token (``bos_prefix``), as in generation."""
    return bool(chat and getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> str:
    """The prompt as the model sees it: a user turn of the chat template when asked for and available."""
    if renders_chat(tokenizer, chat):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The start-of-sequence token a raw (not chat-rendered) text begins with for this tokenizer: ``[bos]`` when
    it adds one, else nothing. A chat-rendered text carries its own. A tokenizer adds one when its
    ``add_bos_token`` says so (Llama) or when its special tokens put it before a text (Gemma's post-processor
    does, while its ``add_bos_token`` reads False): generation tokenises raw prompts with the special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    if getattr(tokenizer, "add_bos_token", False) or adds_bos(tokenizer, bos):
        return [bos]
    return []


def adds_bos(tokenizer: PreTrainedTokenizerBase, bos: int) -> bool:
    """Whether tokenising a text with the special tokens puts ``bos`` before it."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and plain[:1] != [bos]


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, *, chat: bool,
                   max_length: int) -> dict[str, list[int]] | None:
    """input_ids / labels of one example, truncated to ``max_length``; ``None`` if no response token fits.

    An example without a prompt is plain text (a ``.txt`` source, language-model data): no chat turn around it,
    and no position marked as prompt, so it is routed on its whole text (``routing.control.prompt_mask``); the
    start token's label is never predicted (the loss shifts by one), so marking it changes no loss."""
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    if not example.prompt.strip():
        ids = [*bos_prefix(tokenizer), *response_ids][:max_length]
        return {"input_ids": ids, "labels": list(ids)} if ids else None
    prompt_ids = tokenizer(render_prompt(tokenizer, example.prompt, chat), add_special_tokens=False)["input_ids"]
    if not renders_chat(tokenizer, chat):  # raw text, also when chat is asked for but there is no template
        prompt_ids = [*bos_prefix(tokenizer), *prompt_ids]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def pack(rows: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy packing of whole examples into blocks of at most ``max_length`` tokens."""
    blocks: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        row_ids, row_labels = row["input_ids"][:max_length], row["labels"][:max_length]
        if ids and len(ids) + len(row_ids) > max_length:
            blocks.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids = ids + row_ids
        labels = [*labels, IGNORE, *row_labels[1:]]  # never predict an example from the one before
    if ids:
        blocks.append({"input_ids": ids, "labels": labels})
    return blocks


def build_dataset(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, max_length: int = 256,
                  chat: bool = True, packing: bool = False) -> datasets.Dataset:
    """A ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` columns."""
    if not examples:
        raise ValueError("no examples to tokenise: the skill's split is empty")
    raw = datasets.Dataset.from_list([{"prompt": e.prompt, "response": e.response} for e in examples])

    def encode(record):
        row = encode_example(tokenizer, Example(record["prompt"], record["response"]), chat=chat,
                             max_length=max_length)
        return row or {"input_ids": [], "labels": []}

    encoded = raw.map(encode, remove_columns=raw.column_names, desc="tokenising")
    encoded = encoded.filter(lambda r: len(r["input_ids"]) > 0)
    if len(encoded) == 0:
        raise ValueError(f"every example was truncated away at max_length={max_length}: raise max_length")
    if len(encoded) < len(raw):
        logger.warning("%d of %d examples are left out: their prompt fills max_length=%d, leaving no response token "
                       "to train or score; raise max_length to keep them", len(raw) - len(encoded), len(raw),
                       max_length)
    rows = pack(list(encoded), max_length) if packing else list(encoded)
    return datasets.Dataset.from_list([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
