"""``benchmarks/eval_order.py``: each batching is scored once untimed before the timed repeats, which
alternate between the two, and both score the same examples."""

from __future__ import annotations

import sys
from pathlib import Path

from dylora_moe.data.preprocess import build_dataset
from dylora_moe.data.sources import Example

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import eval_order


def test_a_warm_up_of_each_batching_precedes_the_alternating_timed_repeats(model, monkeypatch):
    examples = [Example("p" * n + "=", "r" * (n % 3 + 1)) for n in (9, 1, 5, 2, 8, 3)]
    data = build_dataset(model.tokenizer, examples, max_length=64, chat=False)
    calls, inside = [], []
    dataset_order, length_order = eval_order.in_dataset_order, eval_order.token_losses

    def record(name, fn):
        def run(*args):
            if not inside:  # in_dataset_order scores its batches with token_losses
                calls.append(name)
            inside.append(name)
            try:
                return fn(*args)
            finally:
                inside.pop()
        return run

    monkeypatch.setattr(eval_order, "in_dataset_order", record("dataset", dataset_order))
    monkeypatch.setattr(eval_order, "token_losses", record("length", length_order))
    seconds, before, after = eval_order.time_both(model, data, 2, 3)
    assert calls == ["dataset", "length"] * 4  # one untimed pair, then three timed ones
    assert len(seconds["dataset_order"]) == len(seconds["length_order"]) == 3
    assert len(before) == len(after) == len(data)
    assert all(a.shape == b.shape and (a - b).abs().max() < 1e-4 for a, b in zip(before, after, strict=True))
