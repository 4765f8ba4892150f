"""Per-example skill embeddings for the novelty decision (spec 3.1.3), computed with the frozen backbone.

Each example is embedded as the mean of its unit-normalised hidden states at ``NoveltyConfig.layer`` (the
final ones by default; ``0`` reads the token embeddings without a decoder pass), on the part of the example
``embed_on`` names. Beside it the sample keeps what the router's gate reads for the whole example (its
pooled input features), which the ``mahalanobis`` and ``entropy`` decisions use. At most ``max_examples``
examples are used, chosen by a hash of their content, so the result does not depend on their order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..data.sources import Example
from ..routing.control import pool
from .library import SkillSample, _first_of_each, content_key

if TYPE_CHECKING:
    from ..model import DyLoRAMoE


@torch.no_grad()
def embed_sample(model: DyLoRAMoE, data: Sequence[str | Example] | Tensor | dict, *, gate: bool = True,
                 limit: int | None = None) -> SkillSample:
    """Features [n, H], gate features [n, H] (with ``gate``) and content keys [n] of skill data, in key order;
    at most ``limit`` examples (default ``novelty.max_examples``)."""
    cfg = model.config.novelty
    features, gates, keys = [], [], []
    for input_ids, mask, gate_ids, gate_mask, key in _batches(model, data, limit or cfg.max_examples):
        hidden = detector_states(model, input_ids, mask)
        unit = nn.functional.normalize(hidden.float(), dim=-1)  # [B, T, H]
        m = mask[..., None].to(unit.dtype)
        features.append((unit * m).sum(1) / m.sum(1).clamp(min=1))  # [B, H]
        if gate:
            gates.append(pool(model.routing.hidden(gate_ids, gate_mask), gate_mask).float())  # [B, H]
        keys.append(key)
    if not features:
        raise ValueError("skill data is empty: give at least one example with a non-empty "
                         f"{cfg.embed_on if cfg.embed_on == 'response' else 'text'}")
    keys = torch.cat(keys)
    order = torch.argsort(keys)  # content-key order, whatever order the batches ran in
    return SkillSample(torch.cat(features).cpu()[order], torch.cat(gates).cpu()[order] if gate else None,
                       keys[order])


def detector_states(model: DyLoRAMoE, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Hidden states [B, T, H] of the frozen backbone (no expert) at the novelty detector's layer
    (``novelty.layer``: 0 the token embeddings, -1 the final states)."""
    layer = model.config.novelty.layer
    if layer == 0:  # the token embeddings: no pass through the decoder needed
        return model.backbone.get_input_embeddings()(input_ids)
    with model.routing.plain():
        out = model.backbone.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False,
                                        output_hidden_states=layer != -1)
    if layer == -1:
        return out.last_hidden_state
    if layer >= len(out.hidden_states):
        raise ValueError(f"novelty.layer={layer} but the model has {len(out.hidden_states) - 1} decoder layers")
    return out.hidden_states[layer]


def _batches(model: DyLoRAMoE, data, limit: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """(ids, mask) to embed, (ids, mask) the gate reads, and content keys [B], ``batch_size`` at a time."""
    cfg, device = model.config.novelty, model.device
    if isinstance(data, Tensor):
        data = {"input_ids": data}
    if isinstance(data, dict):
        ids = data["input_ids"]
        mask = data.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        # keyed on the tokens alone: the same example padded to another length is the same row
        keys = torch.tensor([content_key(" ".join(map(str, row[m.bool()].tolist())))
                             for row, m in zip(ids, mask, strict=True)], dtype=torch.long)
        order = _first_of_each(keys)[1][:limit]  # one row per distinct example in key order, as text data has
        for i in range(0, order.numel(), cfg.batch_size):
            rows = order[i : i + cfg.batch_size]
            pair = tuple(t.to(device) for t in right_padded(ids[rows], mask[rows]))
            yield (*pair, *pair, keys[rows])
        return
    if model.tokenizer is None:
        raise ValueError("text data needs a tokenizer; pass token ids or build the model with a tokenizer")
    on_response = cfg.embed_on == "response"
    items = []
    for d in data:
        embedded = (d.response if on_response else d.text) if isinstance(d, Example) else d
        if isinstance(embedded, str) and embedded.strip():
            whole = d.text if isinstance(d, Example) else d
            items.append((content_key(whole), (embedded, whole)))
    items = sorted(dict(items).items())[:limit]  # [(key, (embedded, whole))], deduplicated
    items.sort(key=lambda item: len(item[1][0]))  # batches of similar length pad less; rows are re-keyed
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i : i + cfg.batch_size]
        # padded on the right whatever the tokenizer's own side (shared state): every text's tokens are then
        # numbered from 0, as when it is embedded alone, also under absolute position embeddings
        enc = model.tokenizer([t for _, (t, _) in chunk], return_tensors="pt", padding=True, truncation=True,
                              max_length=cfg.max_length, padding_side="right")
        whole = model.tokenizer([w for _, (_, w) in chunk], return_tensors="pt", padding=True, truncation=True,
                                max_length=cfg.max_length, add_special_tokens=False, padding_side="right")
        yield (enc["input_ids"].to(device), enc["attention_mask"].to(device), whole["input_ids"].to(device),
               whole["attention_mask"].to(device), torch.tensor([k for k, _ in chunk], dtype=torch.long))


def right_padded(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``ids`` [B, T] with each row's tokens (``mask`` 1) moved to its front in their order, and the matching mask:
    a batch padded on the left (or with gaps) is embedded as the same rows padded on the right, so every row's
    tokens are numbered from 0, as when it is embedded alone, also under absolute position embeddings."""
    real = mask.bool()
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real tokens first, each side in order
    lengths = real.sum(1, keepdim=True)
    return ids.gather(1, order), (torch.arange(ids.shape[1], device=ids.device) < lengths).to(mask.dtype)
