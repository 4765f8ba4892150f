"""In-loop measurement: eval loss on response tokens, where each skill's examples are routed, and the entropy
of that routing. It lives with the loop that needs it; ``evaluation`` builds on both."""

from __future__ import annotations

import math
from collections.abc import Sequence

import datasets
import torch
from transformers import DataCollatorForSeq2Seq

from ..model import DyLoRAMoE


def collator(model: DyLoRAMoE) -> DataCollatorForSeq2Seq:
    """Pads input_ids with the pad token, attention_mask with 0 and labels with -100."""
    return DataCollatorForSeq2Seq(model.tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


@torch.no_grad()
def eval_loss(model: DyLoRAMoE, dataset: datasets.Dataset, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy (nats) over the response tokens of ``dataset``."""
    rows = example_losses(model, dataset, batch_size)
    return sum(total for total, _ in rows) / max(sum(count for _, count in rows), 1)


@torch.no_grad()
def example_losses(model: DyLoRAMoE, dataset: datasets.Dataset, batch_size: int = 8) -> list[tuple[float, int]]:
    """Per example of ``dataset``: the summed cross-entropy (nats) over its response tokens, and their number."""
    return [(row.sum().item(), row.numel()) for row in token_losses(model, dataset, batch_size)]


@torch.no_grad()
def token_losses(model: DyLoRAMoE, dataset: datasets.Dataset, batch_size: int = 8) -> list[torch.Tensor]:
    """Per example of ``dataset``: the cross-entropy (nats) of each of its response tokens [n], on the host.
    Batches are formed in length order (``length_batches``) and the rows returned in the dataset's order."""
    collate = collator(model)
    rows: list[torch.Tensor | None] = [None] * len(dataset)
    was_training = model.training
    model.eval()
    try:
        for indices in length_batches(dataset, batch_size):
            batch = collate([dataset[k] for k in indices])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            # The labels mark the prompt, so each sequence is routed as generation routes it (on its prompt).
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).logits
            labels = batch["labels"][:, 1:]  # [B, T-1]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")  # [B, T-1]
            losses, keep = losses.cpu(), (labels != -100).cpu()  # one transfer per batch
            for k, row, kept in zip(indices, losses, keep, strict=True):
                rows[k] = row[kept]
    finally:  # a failed batch (out of memory, an interrupt) leaves the model in the mode it was in
        model.train(was_training)
    return rows


def length_batches(dataset: datasets.Dataset, batch_size: int) -> list[list[int]]:
    """Row indices of ``dataset`` in batches of similar length (stable sort by ``input_ids`` length), so a
    padded batch wastes little: an example's loss and routing do not depend on what it is batched with."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def gate_features(model: DyLoRAMoE, dataset: datasets.Dataset, batch_size: int = 8) -> torch.Tensor:
    """What the gate reads for each example of ``dataset`` in ``eval_loss`` [N, H]: its hidden states (a prefix
    pass up to ``route_layer``, or the frozen final states; no expert runs) pooled over the tokens it is routed
    on (its prompt, or its whole text with ``route_on="text"``). They come from the frozen backbone alone, so
    they stay valid while experts train and the pool grows: ``routed_experts`` routes them under the current
    gate. Sequence routing only."""
    collate = collator(model)
    rows, order = [], []
    for indices in length_batches(dataset, batch_size):
        batch = collate([dataset[k] for k in indices])
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        rows.append(model.routing.features(ids, mask, model.pool_mask(mask, batch["labels"].to(model.device))))
        order += indices
    features = torch.cat(rows)  # [N, H], in length order
    return features[torch.as_tensor(order, device=features.device).argsort()]  # [N, H], in the dataset's order


def routing_entropy(counts: Sequence[float]) -> float:
    """Entropy (nats) of a routing distribution given as counts or shares per expert."""
    total = float(sum(counts))
    if total <= 0:
        return 0.0
    return max(0.0, -sum((c / total) * math.log(c / total) for c in counts if c > 0))


@torch.no_grad()
def routed_experts(model: DyLoRAMoE, features: torch.Tensor) -> list[int]:
    """Top-1 expert id for each feature row [N, H] (a prompt, or a token under per-token routing) under the
    current routing strategy."""
    if model.num_experts == 0:
        return []
    columns = model.router(features.to(model.device)).weights.argmax(-1).tolist()
    return [model.experts.expert_ids[c] for c in columns]
