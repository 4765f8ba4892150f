"""In-loop measurement: routing entropy, and eval loss measured under the routing generation uses."""

from __future__ import annotations

import math

import pytest
import torch

from dylora_moe.data.preprocess import build_dataset
from dylora_moe.data.sources import Example
from dylora_moe.training.measure import example_losses, gate_features, length_batches, routing_entropy, token_losses


def test_routing_entropy():
    assert routing_entropy([10, 0, 0]) == 0.0
    assert routing_entropy([1, 1]) == pytest.approx(math.log(2))
    assert routing_entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert routing_entropy([]) == 0.0


def test_token_losses_are_each_examples_response_tokens(model):
    """One row per example, one loss per response token (padding and prompt excluded, whatever the batch), and
    ``example_losses`` is their sum and count; a row's mean is the model's own loss on that example alone."""
    examples = [Example("ab=", "cd"), Example("a much longer prompt=", "x"), Example("q=", "hello world")]
    data = build_dataset(model.tokenizer, examples, max_length=64, chat=False)
    rows = token_losses(model, data, batch_size=2)
    assert [row.numel() for row in rows] == [sum(t != -100 for t in r["labels"]) for r in data]
    assert all(row.device.type == "cpu" for row in rows)
    for (total, count), row in zip(example_losses(model, data, batch_size=3), rows, strict=True):
        assert count == row.numel() and total == pytest.approx(row.sum().item(), rel=1e-5)
    for k, row in enumerate(rows):
        alone = {key: torch.tensor([data[k][key]]) for key in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            loss = model(**alone).loss
        assert row.mean().item() == pytest.approx(loss.item(), rel=1e-4)


def test_length_batches_group_similar_lengths_and_cover_every_row_once(model):
    examples = [Example("p" * n + "=", "r") for n in (9, 1, 5, 2, 8, 3)]
    data = build_dataset(model.tokenizer, examples, max_length=64, chat=False)
    batches = length_batches(data, 2)
    lengths = [len(ids) for ids in data["input_ids"]]
    assert sorted(k for b in batches for k in b) == list(range(len(examples)))
    assert [lengths[k] for b in batches for k in b] == sorted(lengths)
    assert all(len(b) <= 2 for b in batches)


def test_gate_features_keep_the_datasets_order(model):
    """Batched in length order, returned in the dataset's: each row is what the gate reads of that example
    alone."""
    examples = [Example("a long prompt of many words=", "x"), Example("q=", "yz"), Example("mid prompt=", "w")]
    data = build_dataset(model.tokenizer, examples, max_length=64, chat=False)
    features = gate_features(model, data, batch_size=2)
    for k in range(len(examples)):
        alone = gate_features(model, data.select([k]), batch_size=1)
        torch.testing.assert_close(features[k], alone[0], rtol=1e-4, atol=1e-5)


def test_token_losses_give_back_training_mode_when_a_batch_fails(model, monkeypatch):
    """A failing forward (out of memory, an interrupt) leaves the model in the mode it was in: a learner that
    catches the error and trains on must not train with dropout off."""
    data = build_dataset(model.tokenizer, [Example("ab=", "cd")], max_length=64, chat=False)
    model.train()

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "forward", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        token_losses(model, data)
    assert model.training
