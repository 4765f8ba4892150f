"""``DyLoRATrainer``: gradient accumulation adds up to one large batch, for the task and the router losses."""

from __future__ import annotations

import datasets
import torch
from transformers import TrainerCallback, TrainingArguments

from dylora_moe.training import DyLoRATrainer, RoutingMemory, TrainingConfig
from dylora_moe.training.distill import Anchors
from dylora_moe.training.measure import collator
from tests.conftest import build, randomise_experts


class GradRecorder(TrainerCallback):
    """The gradients the optimizer is about to apply, per optimizer step."""

    def __init__(self, params):
        self.params = params
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append([p.grad.detach().clone() for p in self.params])


def examples():
    # responses of different lengths: a mean of per-micro-batch means would weight their tokens unequally
    rows = [([5, 6, 7, 8], [9, 10]), ([11, 12], [13, 14, 15, 16, 17, 18]), ([19, 20, 21], [22]),
            ([23, 24, 25, 26, 27], [28, 29, 30])]
    return datasets.Dataset.from_list([{"input_ids": p + r, "attention_mask": [1] * (len(p) + len(r)),
                                        "labels": [-100] * len(p) + r} for p, r in rows])


def one_step(tmp_path, batch_size, grad_accum, anchors=False):
    model = build()
    model.create_expert()
    model.create_expert()
    randomise_experts(model)
    model.set_trainable([1], router=True)
    model.train()
    memory = RoutingMemory()
    memory.add(0, 0, torch.randn(6, 32, generator=torch.Generator().manual_seed(0)))
    memory.add(1, 1, torch.randn(6, 32, generator=torch.Generator().manual_seed(1)))
    params = [p for p in model.parameters() if p.requires_grad]
    recorder = GradRecorder(params)
    args = TrainingArguments(output_dir=str(tmp_path / f"b{batch_size}"), max_steps=1,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                             learning_rate=1e-2, report_to=[], logging_steps=1,
                             save_strategy="no", remove_unused_columns=False, use_cpu=True, max_grad_norm=0.0,
                             seed=0, data_seed=0, disable_tqdm=True)
    # anchors of one length: a KL averaged over one batch's tokens then equals the mean of two half batches'
    kl = Anchors(model.tokenizer, ["abcd", "efgh", "ijkl", "mnop"], 1) if anchors else None
    trainer = DyLoRATrainer(model=model, args=args, train_dataset=examples(), data_collator=collator(model),
                            training=TrainingConfig(kl_weight=1.0 if anchors else 0.0), seed_steps=1,
                            memory=memory, anchors=kl, callbacks=[recorder])
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return recorder.grads[0], log


def test_grad_accumulation_gives_the_update_of_one_large_batch(tmp_path):
    big, big_log = one_step(tmp_path, batch_size=4, grad_accum=1)
    small, small_log = one_step(tmp_path, batch_size=2, grad_accum=2)
    assert any(g.abs().sum() > 0 for g in big)
    for a, b in zip(small, big, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert abs(small_log["loss"] - big_log["loss"]) < 1e-4
    for name in ("task_loss", "rehearsal_loss"):
        assert abs(small_log[name] - big_log[name]) < 1e-4, name


def test_grad_accumulation_takes_a_new_anchor_batch_per_micro_batch(tmp_path):
    """Two micro-batches of 2 take anchor rows 0-1 and 2-3, as one batch of 4 takes 0-3: the KL's gradient is
    the large batch's (one anchor batch per optimizer step would repeat rows 0-1 and never see 2-3)."""
    big, big_log = one_step(tmp_path, batch_size=4, grad_accum=1, anchors=True)
    small, small_log = one_step(tmp_path, batch_size=2, grad_accum=2, anchors=True)
    assert big_log["kl_to_frozen"] > 0
    for a, b in zip(small, big, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert abs(small_log["kl_to_frozen"] - big_log["kl_to_frozen"]) < 1e-5
