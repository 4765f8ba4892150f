"""``benchmarks/train_cost.py`` on a tiny model: every mode at every pool size, with and without the KL term
the trainer adds by default, and the KL the benchmark times is the trainer's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dylora_moe.training.distill import kl_on_anchors
from tests.conftest import batch, build, char_tokenizer, randomise_experts, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_cost


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_every_mode_and_pool_size_is_timed_against_the_single_lora_step(tmp_path, kl_weight):
    tiny_llama().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "cost.json"
    result = train_cost.main(["--model", str(tmp_path / "model"), "--experts", "1,3", "--repeats", "1",
                              "--batch", "2", "--seq-len", "12", "--anchor-len", "8", "--dense-top-m", "1",
                              "--kl-weight", str(kl_weight), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["kl_weight"] == kl_weight and saved["anchor_len"] == (8 if kl_weight else None)
    assert [(r["experts"], r["mode"]) for r in saved["rows"]] == [(n, m) for n in (1, 3) for m in train_cost.MODES]
    assert all(r["seconds"] > 0 and r["ratio"] == pytest.approx(r["seconds"] / result["single_lora_step_s"])
               for r in saved["rows"])
    assert saved["repeats"] == 1 and len(saved["single_lora_step_times"]) == 1
    assert all(r["times"] == [r["seconds"]] for r in saved["rows"])  # the median of the repeats it records


def test_the_anchor_kl_is_zero_without_the_expert_and_trains_only_it():
    model = build()
    for _ in range(2):
        model.create_expert()
    inputs = batch()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    zero, _ = kl_on_anchors(model, ids, mask, 1)  # fresh experts: B = 0, the expert is the frozen model
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    randomise_experts(model)
    model.set_trainable([1], router=True)
    kl, logits = kl_on_anchors(model, ids, mask, 1)
    assert kl.item() > 0 and logits.shape[:2] == ids.shape
    kl.backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all("expert_1" in n for n in moved)  # the forced expert only: no gate, no other expert
