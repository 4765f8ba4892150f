"""``DyLoRATrainer``: gradient accumulation adds up to one large batch, for the task and the router losses."""

from __future__ import annotations

import datasets
import pytest
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


def one_step(tmp_path, batch_size, grad_accum, anchors=False, texts=("abcd", "efgh", "ijkl", "mnop"), kl_weight=1.0,
             retained=False, balance_weight=0.0, granularity="sequence", split_gate=False):
    model = build(granularity=granularity)
    model.create_expert()
    model.create_expert()
    randomise_experts(model)
    if split_gate:  # a gate that splits the rows between the experts, differently in each micro-batch
        with torch.no_grad():
            model.router.gate.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(6))
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
    kl = Anchors(model.tokenizer, list(texts), 1) if anchors or retained else None
    training = TrainingConfig(kl_weight=kl_weight if anchors else 0.0, retain_kl_weight=kl_weight if retained else 0.0,
                              balance_weight=balance_weight)
    trainer = DyLoRATrainer(model=model, args=args, train_dataset=examples(), data_collator=collator(model),
                            training=training, seed_steps=1, memory=memory, anchors=kl if anchors else None,
                            retained=kl if retained else None, callbacks=[recorder])
    if trainer._before is not None:
        # a teacher other than the expert itself, so that the KL to it has a gradient at the first step
        g = torch.Generator().manual_seed(2)
        trainer._before = [p + 0.05 * torch.randn(p.shape, generator=g) for p in trainer._before]
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


@pytest.mark.parametrize("term", ["kl_to_frozen", "kl_to_before"])
def test_grad_accumulation_weighs_every_anchor_token_as_one_large_batch_does(tmp_path, term):
    """Anchor prompts of 3 tokens in the first micro-batch and 55 in the second: the KL's gradient is still the
    large batch's, every position weighed 1/58 (a mean of the two micro-batches' means would weigh each of the
    first three 1/6)."""
    texts = ("a", "bc", "defghijklmnopqrstuvwxyz0123", "ghijklmnopqrstuvwxyz01234567")
    retained = term == "kl_to_before"
    grads = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        with_kl, log = one_step(tmp_path, batch_size, grad_accum, anchors=not retained, texts=texts,
                                retained=retained)
        task, _ = one_step(tmp_path, batch_size, grad_accum, anchors=not retained, texts=texts, retained=retained,
                           kl_weight=0.0)
        grads[grad_accum] = ([a - b for a, b in zip(with_kl, task, strict=True)], log[term])  # the KL's part
    (big, big_kl), (small, small_kl) = grads[1], grads[2]
    assert any(g.abs().sum() > 0 for g in big)
    for a, b in zip(small, big, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)
    assert abs(small_kl - big_kl) < 1e-5


def test_the_task_loss_of_plain_text_rows_is_the_mean_over_the_tokens_they_predict(tmp_path):
    """Plain text has no prompt: every label is a target, the first one included, which no position predicts.
    The loss the Trainer optimises is still the mean over the predicted tokens (the model's own loss), not a sum
    divided by one more token per row."""
    model = build()
    model.create_expert()
    randomise_experts(model)
    model.set_trainable([0], router=False)
    model.train()
    rows = [[1, 5, 6, 7, 2], [1, 8, 9, 2], [1, 10, 11, 12, 13, 2]]
    data = datasets.Dataset.from_list([{"input_ids": r, "attention_mask": [1] * len(r), "labels": list(r)}
                                       for r in rows])
    with torch.no_grad():
        expected = float(model(**collator(model)(list(data))).loss)  # 12 predicted tokens
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3,
                             learning_rate=1e-2, report_to=[], logging_steps=1, save_strategy="no",
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    trainer = DyLoRATrainer(model=model, args=args, train_dataset=data, data_collator=collator(model),
                            training=TrainingConfig(kl_weight=0.0, rehearsal_weight=0.0), seed_steps=1)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert abs(log["task_loss"] - expected) < 1e-4, (log["task_loss"], expected)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_grad_accumulation_gives_the_balance_loss_of_one_large_batch(tmp_path, granularity):
    """The balance loss weighs each expert's mean probability by its top-1 share: the shares are the whole
    accumulated batch's (shares per micro-batch gave the two halves' rows other weights than one batch gives
    them); padding tokens make no routing decision."""
    grads = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        with_balance, log = one_step(tmp_path, batch_size, grad_accum, balance_weight=1.0, granularity=granularity,
                                     split_gate=True)
        without, _ = one_step(tmp_path, batch_size, grad_accum, granularity=granularity, split_gate=True)
        grads[grad_accum] = ([a - b for a, b in zip(with_balance, without, strict=True)], log["balance_loss"])
    (big, big_loss), (small, small_loss) = grads[1], grads[2]
    assert any(g.abs().sum() > 0 for g in big)
    for a, b in zip(small, big, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)
    assert abs(small_loss - big_loss) < 1e-5


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_the_trainers_own_evaluation_keeps_its_losses_out_of_the_training_logs(tmp_path, logging_steps):
    """The Trainer's evaluation loop calls ``compute_loss`` too, and logs its metrics: its passes must not be
    counted in the logged training terms, nor the training terms logged so far be logged as its metrics (and
    so be missing from the next training log, when it evaluates between two)."""

    def logs(evaluate: bool) -> list[dict]:
        model = build()
        model.create_expert()
        randomise_experts(model)
        model.set_trainable([0], router=True)
        model.train()
        memory = RoutingMemory()
        memory.add(0, 0, torch.randn(6, 32, generator=torch.Generator().manual_seed(0)))
        args = TrainingArguments(output_dir=str(tmp_path / str(evaluate)), max_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-2, report_to=[], logging_steps=logging_steps, save_strategy="no",
                                 eval_strategy="steps" if evaluate else "no", eval_steps=1,
                                 per_device_eval_batch_size=2, remove_unused_columns=False, use_cpu=True,
                                 seed=0, data_seed=0, disable_tqdm=True)
        trainer = DyLoRATrainer(model=model, args=args, train_dataset=examples(), data_collator=collator(model),
                                eval_dataset=examples() if evaluate else None,
                                training=TrainingConfig(kl_weight=0.0), seed_steps=1, memory=memory)
        trainer.train()
        return trainer.state.log_history

    plain, evaluated = logs(False), logs(True)
    train = [e for e in evaluated if "loss" in e]
    assert [e["step"] for e in train] == list(range(logging_steps, 3, logging_steps))
    for a, b in zip((e for e in plain if "loss" in e), train, strict=True):
        for name in ("task_loss", "rehearsal_loss"):
            assert abs(a[name] - b[name]) < 1e-6, (name, a[name], b[name])
    evals = [e for e in evaluated if "eval_loss" in e]
    assert len(evals) == 2 and not any("task_loss" in e or "rehearsal_loss" in e for e in evals)


def test_the_trainers_own_evaluation_loss_is_the_task_loss_alone(tmp_path):
    """An evaluation pass of the Trainer's eval loop reports the task's loss on the held-out rows: the gate's
    rehearsal term is a training term, not a loss of the evaluated data."""
    model = build()
    model.create_expert()
    model.create_expert()
    randomise_experts(model)
    model.set_trainable([1], router=True)
    memory = RoutingMemory()
    memory.add(0, 0, torch.randn(6, 32, generator=torch.Generator().manual_seed(0)))
    memory.add(1, 1, torch.randn(6, 32, generator=torch.Generator().manual_seed(1)))
    data = examples()
    model.eval()
    with torch.no_grad():
        expected = float(model(**collator(model)(list(data))).loss)  # one batch of all four rows
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=len(data), report_to=[],
                             save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    trainer = DyLoRATrainer(model=model, args=args, eval_dataset=data, data_collator=collator(model),
                            training=TrainingConfig(kl_weight=0.0, rehearsal_weight=1.0), seed_steps=1, memory=memory)
    metrics = trainer.evaluate()
    assert abs(metrics["eval_loss"] - expected) < 1e-5, (metrics["eval_loss"], expected)


def test_a_failed_frozen_answer_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    """The anchors' frozen answers are generated when the trainer is built, in eval mode, with no expert and the
    backbone's head: when generating them fails, the model is back in training mode, routed by its gate and with
    its trained head (the trainer is not built, but the caller may go on with the model)."""
    from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
    from dylora_moe.training import distill
    from tests.conftest import char_tokenizer, tiny_llama

    config = DyLoRAConfig(model="tiny", expert=ExpertConfig(rank=4, alpha=8, dropout=0.0), trainable_lm_head=True)
    model = DyLoRAMoE(tiny_llama(), char_tokenizer(), config)
    model.create_expert()
    model.set_trainable([0], router=True)
    model.train()

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(distill, "generate", fail)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", remove_unused_columns=False,
                             use_cpu=True, disable_tqdm=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        DyLoRATrainer(model=model, args=args, train_dataset=examples(), data_collator=collator(model),
                      training=TrainingConfig(kl_weight=1.0, anchor_answers=4), seed_steps=1,
                      anchors=Anchors(model.tokenizer, ["abcd", "efgh"], 0))
    assert model.training and all(m.training for m in model.modules())
    assert model.routing.forced is None and not model.backbone.get_output_embeddings().frozen


def test_with_a_trained_output_head_the_retained_teacher_keeps_the_head_of_the_steps_start(tmp_path):
    """With ``trainable_lm_head`` the head trains with the expert: the teacher of the retained prompts is the
    expert as the step started, its head included (the current head would let the head's drift go unchecked:
    the teacher would move with it), and the trained head is back in place after the teacher's pass."""
    from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
    from dylora_moe.training.distill import kl_to_frozen
    from tests.conftest import char_tokenizer, tiny_llama

    config = DyLoRAConfig(model="tiny", expert=ExpertConfig(rank=4, alpha=8, dropout=0.0), trainable_lm_head=True)
    model = DyLoRAMoE(tiny_llama(), char_tokenizer(), config)
    model.create_expert()
    randomise_experts(model)
    model.set_trainable([0], router=False)
    model.train()
    retained = Anchors(model.tokenizer, ["abcd", "efghij"], 0)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    trainer = DyLoRATrainer(model=model, args=args, train_dataset=examples(), data_collator=collator(model),
                            training=TrainingConfig(kl_weight=0.0, retain_kl_weight=1.0), seed_steps=1,
                            retained=retained)
    ids, mask = retained.batch(0, 2)
    with torch.no_grad(), model.force_expert(0):
        teacher = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V] as the step starts
    head = model.backbone.get_output_embeddings()
    with torch.no_grad():  # as the step's updates move it (the expert's have not moved yet)
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
    moved = head.weight.detach().clone()
    kl = trainer.retained_kl(trainer.anchor_index())
    with torch.no_grad(), model.force_expert(0):
        logits = model(input_ids=ids, attention_mask=mask).logits
    expected = kl_to_frozen(logits, teacher, mask, retained.positions(0, 2))
    assert float(expected) > 0.1
    torch.testing.assert_close(kl, expected)
    assert torch.equal(head.weight, moved) and kl.requires_grad
