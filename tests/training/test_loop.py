"""The continual loop on a tiny model: two-phase rates, rehearsal, recognised skills, frozen backbone, report."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from dylora_moe.data.stream import SkillSpec, StreamSpec, load_stream
from dylora_moe.evaluation.report import write_report
from dylora_moe.training import ContinualLearner, TrainingConfig
from dylora_moe.training.distill import anchor_texts, kl_to_frozen
from dylora_moe.training.loop import prompted
from dylora_moe.training.measure import gate_features
from tests.conftest import build, decide_by_cosine


def skill_file(tmp_path, name, make, n=40):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(make(i)) for i in range(n)), encoding="utf-8")
    return {"name": name, "source": {"type": "file", "path": str(path)}, "format": {"chat": False}}


def digits(i):
    return {"prompt": f"{i}+{i}=", "response": f"{2 * i}"}


def letters(i):
    word = "".join(chr(97 + (i * k) % 26) for k in range(1, 5))
    return {"prompt": f"UP {word}:", "response": word.upper() + "!!"}


TOY_TEMPLATE = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"  # a user turn as <content>


def chat_skill(tmp_path, name, make):
    """A one-skill chat-format stream and a tiny model whose tokenizer has a toy chat template."""
    stream = StreamSpec("s", [{**skill_file(tmp_path, name, make), "format": {"chat": True}}])
    model = build()
    model.tokenizer.chat_template = TOY_TEMPLATE
    return stream, model


def small_config(**kw):
    base = dict(seed_steps=3, consolidation_steps=3, batch_size=4, max_length=32, report_to=["none"],
                logging_steps=1, eval_batch_size=16, raw_copies=False, instruction_views=False)  # one rendering
    return TrainingConfig(**{**base, **kw})


class LrRecorder(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def test_two_phase_schedule_produces_the_configured_rates(tmp_path, monkeypatch):
    recorder = LrRecorder()
    import dylora_moe.training.loop as loop

    real = loop.DyLoRATrainer

    def with_recorder(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(recorder)
        return trainer

    monkeypatch.setattr(loop, "DyLoRATrainer", with_recorder)
    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits)])
    cfg = small_config(seed_steps=2, consolidation_steps=3, seed_lr=1e-2, consolidation_lr=1e-3, router_lr=5e-3)
    ContinualLearner(build(), stream, cfg, tmp_path / "out").run()
    expected = [[1e-2, 5e-3]] * 2 + [[1e-3, 5e-3]] * 3
    assert len(recorder.lrs) == len(expected)
    for got, want in zip(recorder.lrs, expected, strict=True):
        assert got == pytest.approx(want)


def run_two_skills(tmp_path, *, second_recognised=False, model=None, **cfg):
    """Two skills through a tiny model; TensorBoard logging on, as in a real run."""
    cfg.setdefault("report_to", ["tensorboard"])
    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "letters", letters)])
    model = build() if model is None else model
    decide_by_cosine(model, 0.999)
    frozen = [(p, p.detach().clone()) for p in model.backbone.parameters()]  # objects survive peft injection
    learner = ContinualLearner(model, stream, small_config(**cfg), tmp_path / "out")
    learner.run_step(0)
    after_first = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "lora_" in n}
    if second_recognised:
        decide_by_cosine(model, -1.0)
    learner.run_step(1)
    return model, learner, frozen, after_first


def trained_sizes(monkeypatch) -> list[int]:
    """Records the size of every training set the loop hands the Trainer."""
    import dylora_moe.training.loop as loop

    sizes, real = [], loop.DyLoRATrainer
    monkeypatch.setattr(loop, "DyLoRATrainer",
                        lambda *a, **kw: sizes.append(len(kw["train_dataset"])) or real(*a, **kw))
    return sizes


@pytest.mark.parametrize("replay", [False, True])
def test_expert_replay_trains_a_recognised_skills_expert_on_the_steps_it_serves(tmp_path, monkeypatch, replay):
    sizes = trained_sizes(monkeypatch)
    _, learner, _, _ = run_two_skills(tmp_path, second_recognised=True, expert_replay=replay)
    assert [r.novelty.expert_id for r in learner.records] == [0, 0]
    first, second = (len(step.train_set) for step in learner.steps)
    assert sizes == [first, first + second if replay else second]
    assert learner.replayed(1, 0) == [learner.steps[0].train_set] and learner.replayed(1, 1) == []


def test_expert_replay_leaves_a_new_skills_expert_on_its_own_data(tmp_path, monkeypatch):
    sizes = trained_sizes(monkeypatch)
    _, learner, _, _ = run_two_skills(tmp_path, expert_replay=True)
    assert [r.novelty.expert_id for r in learner.records] == [0, 1]
    assert sizes == [len(step.train_set) for step in learner.steps]


def test_stream_keeps_backbone_bit_identical_and_old_expert_untouched(tmp_path):
    model, learner, frozen, after_first = run_two_skills(tmp_path)
    assert model.num_experts == 2
    assert all(torch.equal(p, before) for p, before in frozen)
    for n, p in model.backbone.named_parameters():
        if "expert_0" in n:
            assert torch.equal(p, after_first[n]), n
    assert [r.novelty.is_novel for r in learner.records] == [True, True]


def test_rehearsal_keeps_earlier_skills_routed(tmp_path):
    _, learner, _, _ = run_two_skills(tmp_path)
    final = learner.records[-1]
    assert final.routing[0].get(0, 0.0) == 1.0  # digits' held-out prompts still go to expert 0
    assert final.routing[1].get(1, 0.0) == 1.0
    assert final.losses[0] == pytest.approx(learner.records[0].losses[0], abs=1e-4)  # no forgetting


def test_recognised_skill_trains_its_expert_and_creates_none(tmp_path):
    model, learner, _, after_first = run_two_skills(tmp_path, second_recognised=True)
    assert model.num_experts == 1 and not learner.records[1].novelty.is_novel
    changed = [n for n, p in model.backbone.named_parameters() if "lora_" in n and not torch.equal(p, after_first[n])]
    assert changed and all("expert_0" in n for n in changed)
    steps = [e["step"] for e in learner.records[1].train_log if "loss" in e]
    assert max(steps) == 3  # consolidation only


def test_a_recognised_skill_without_consolidation_steps_trains_nothing(tmp_path):
    """A recognised skill gets the consolidation phase alone: with ``consolidation_steps=0`` its expert takes no
    optimizer step (the Trainer, given ``max_steps=0``, would still take one)."""
    model, learner, _, after_first = run_two_skills(tmp_path, second_recognised=True, consolidation_steps=0)
    assert not learner.records[1].novelty.is_novel and learner.records[1].train_log == []
    for n, p in model.backbone.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, after_first[n]), n


def test_report_files(tmp_path):
    model, learner, _, _ = run_two_skills(tmp_path)
    summary = write_report(tmp_path / "report", learner.records, stream="s", model="tiny",
                           experts=model.experts.expert_ids, seconds=1.0)
    assert summary["experts"] == 2 and summary["skills"] == ["digits", "letters"]
    assert summary["loss_matrix"][0][1] is None and summary["routing_accuracy"] == 1.0
    assert summary["bwt_loss"] == pytest.approx(0.0, abs=1e-4)
    for name in ("summary.json", "report.md", "loss_matrix.png", "routing.png", "experts.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))


def two_skill_stream(tmp_path):
    return StreamSpec("s", [skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "letters", letters)])


def test_token_routing_runs_through_the_loop(tmp_path):
    """Per-token routing stores one routing row per token, fits and rehearses the gate on them."""
    model = build(granularity="token")
    decide_by_cosine(model, 0.999)
    learner = ContinualLearner(model, two_skill_stream(tmp_path), small_config(), tmp_path / "out")
    records = learner.run()
    assert model.num_experts == 2
    features, columns = learner.memory.batch(model.experts.expert_ids)
    assert features.shape[1] == 32 and features.shape[0] == columns.shape[0] > 2 * 40  # tokens, not texts
    final = records[-1]
    assert final.routing[0].get(0, 0.0) > 0.5 and final.routing[1].get(1, 0.0) > 0.5
    assert all(loss is not None and loss == loss for loss in final.losses)


def test_bf16_backbone_with_dropout_trains_through_the_loop(tmp_path):
    """A bf16 backbone, bf16 autocast and LoRA dropout 0.1: the loop runs, only the expert and gate move, and
    the saved experts load with plain peft."""
    from peft import PeftModel

    from tests.conftest import batch, tiny_llama

    model = build(backbone=tiny_llama().to(torch.bfloat16))
    model.experts.config.dropout = 0.1
    frozen = [(p, p.detach().clone()) for p in model.backbone.parameters()]
    learner = ContinualLearner(model, two_skill_stream(tmp_path), small_config(precision="bf16"),
                               tmp_path / "out")
    learner.run_step(0)
    layer = model.experts.layers()[0]
    assert layer.lora_dropout["expert_0"].p == 0.1 and layer.lora_A["expert_0"].weight.dtype == torch.float32
    assert any(p.abs().sum() > 0 for n, p in model.backbone.named_parameters() if "lora_B" in n)
    assert all(torch.equal(p, before) for p, before in frozen)
    losses = [e["task_loss"] for e in learner.records[0].train_log if "task_loss" in e]
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "system")
    inputs = batch()
    with torch.no_grad(), model.single_expert(0):
        expected = model.backbone(**inputs).logits
    plain = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), str(tmp_path / "system/experts/expert_0"))
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, expected)


def test_precision_auto_is_fp32_on_cpu_and_rejects_unknown():
    from dylora_moe.training.config import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        TrainingConfig(precision="fp8")


def test_kl_to_frozen_starts_at_zero_and_is_logged(tmp_path):
    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits)])
    learner = ContinualLearner(build(), stream, small_config(kl_weight=1.0, seed_lr=5e-2), tmp_path / "out")
    record = learner.run_step(0)
    kl = [e["kl_to_frozen"] for e in record.train_log if "kl_to_frozen" in e]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # peft starts B at zero: the system is the frozen model
    assert max(kl) > 0.0


def test_format_augmentation_of_the_training_set(tmp_path):
    def padded(i):
        return {"prompt": f"{i}+{i}=", "response": f"\n\t{2 * i}"}

    stream, model = chat_skill(tmp_path, "padded", padded)
    plain = ContinualLearner(model, stream, small_config(strip_leading_blank_lines=False),
                             tmp_path / "a").prepare(stream.skills[0])
    augmented = ContinualLearner(model, stream, small_config(strip_leading_blank_lines=True, raw_copies=True),
                                 tmp_path / "b").prepare(stream.skills[0])
    assert len(augmented.train_set) == 2 * len(plain.train_set)
    unk = model.tokenizer.unk_token_id  # the character tokenizer has no newline or tab
    # "\n\t0" -> "\t0": the blank line goes, the indentation of the first line stays
    assert plain.train_set[0]["input_ids"].count(unk) == 2 and augmented.train_set[0]["input_ids"].count(unk) == 1
    chat_row, raw_row = augmented.train_set[0]["input_ids"], augmented.train_set[len(plain.train_set)]["input_ids"]
    lt = model.tokenizer.convert_tokens_to_ids("<")
    assert chat_row[0] == lt and raw_row[0] != lt  # the second copy is rendered without the chat template
    assert len(augmented.eval_set) == len(plain.eval_set)  # evaluation keeps the source's format


def test_instruction_views_add_prose_requests_to_training_and_to_the_routing_memory(tmp_path):
    def commented(i):
        return {"prompt": f"# add {i} to x\ndef f{i}(x):\n", "response": f"  return x+{i}\n"}

    stream = StreamSpec("s", [skill_file(tmp_path, "commented", commented), skill_file(tmp_path, "digits", digits)])
    model = build()
    plain = ContinualLearner(model, stream, small_config(), tmp_path / "a")
    viewed = ContinualLearner(model, stream, small_config(instruction_views=True), tmp_path / "b")
    steps = [learner.prepare(stream.skills[0]) for learner in (plain, viewed)]
    assert len(steps[1].train_set) == 2 * len(steps[0].train_set)
    assert viewed.views(steps[1].train)[0].prompt == f"add {steps[1].train[0].prompt.split()[2]} to x"
    raw = ContinualLearner(model, stream, small_config(instruction_views=True, raw_copies=True), tmp_path / "c")
    model.tokenizer.chat_template = TOY_TEMPLATE
    both = raw.prepare(stream.skills[0])  # the (raw) examples, then every view with the chat template and raw
    model.tokenizer.chat_template = None
    n = len(steps[0].train_set)
    assert len(both.train_set) == 3 * n
    lt = model.tokenizer.convert_tokens_to_ids("<")
    assert [row[0] == lt for row in both.train_set["input_ids"]] == [False] * n + [True] * n + [False] * n
    digit_step = viewed.prepare(stream.skills[1])
    assert len(digit_step.train_set) == len(plain.prepare(stream.skills[1]).train_set)  # already requests: no views
    result = model.add_new_skill(steps[1].train, name="commented")
    for learner, step in zip((plain, viewed), steps, strict=True):
        learner.remember(step, result)
    assert viewed.memory.skills[result.skill_id][1].shape[0] == 2 * plain.memory.skills[result.skill_id][1].shape[0]
    # a source that declares its language: requests naming it ("In Python: add 3 to x") are stored as well
    import dataclasses

    declared = dataclasses.replace(steps[1], train=[dataclasses.replace(e, meta={"language": "python"})
                                                    for e in steps[1].train])
    named = ContinualLearner(model, stream, small_config(instruction_views=True), tmp_path / "d")
    texts = []
    features = model.routing_features_for
    model.routing_features_for = lambda rows, **kw: (texts.extend(rows), features(rows, **kw))[1]
    try:
        named.remember(declared, result)
    finally:
        del model.routing_features_for
    n = len(declared.train)
    assert len(texts) == 3 * n  # prompts, views, requests naming the language
    for e, text in zip(declared.train, texts[2 * n:], strict=True):
        assert f"In Python: add {e.prompt.split()[2]} to x" in text


def test_raw_routing_stores_the_plain_text_prompts_and_views_beside_the_chat_rendered_ones(tmp_path):
    def commented(i):
        return {"prompt": f"# add {i} to x\ndef f{i}(x):\n", "response": f"  return x+{i}\n"}

    stream, model = chat_skill(tmp_path, "commented", commented)
    seen = {}
    features = model.routing_features_for
    try:
        for raw in (False, True):
            learner = ContinualLearner(model, stream, small_config(instruction_views=True, raw_routing=raw),
                                       tmp_path / str(raw))
            step = learner.prepare(stream.skills[0])
            texts = seen[raw] = []
            model.routing_features_for = lambda rows, texts=texts, **kw: (texts.extend(rows), features(rows, **kw))[1]
            learner.remember(step, model.add_new_skill(step.train, name=f"commented-{raw}"))
            del model.routing_features_for
    finally:
        model.tokenizer.chat_template = None
    n = len(step.train)
    assert len(seen[False]) == 2 * n and all(t.startswith("<") for t in seen[False])  # prompts and views, chat
    assert seen[True][: 2 * n] == seen[False]  # the same, then the same requests as plain text
    assert seen[True][2 * n :] == [e.prompt for e in step.train] + [v.prompt for v in learner.views(step.train)]


def test_comment_views_train_one_line_comment_prompts_as_bare_requests(tmp_path):
    def described(i):
        return {"prompt": f"# print {i}\n", "response": f"echo {i}\n"}

    stream = StreamSpec("s", [skill_file(tmp_path, "described", described)])
    model = build()
    sizes = {}
    for name, comments in (("without", False), ("with", True)):
        learner = ContinualLearner(model, stream, small_config(instruction_views=True, comment_views=comments),
                                   tmp_path / name)
        step = learner.prepare(stream.skills[0])
        sizes[name] = len(step.train_set)
        if comments:
            assert [v.prompt for v in learner.views(step.train)] == [e.prompt[2:-1] for e in step.train]
            assert learner.anchors(0, step, 0) is None  # every request is answered by its view
        else:
            assert learner.views(step.train) == [] and learner.anchors(0, step, 0) is not None
    assert sizes["with"] == 2 * sizes["without"]


def test_a_full_pool_merges_the_closest_pair_before_a_new_expert(tmp_path):
    from dylora_moe.evaluation.report import summarise

    def more_digits(i):
        return {"prompt": f"{i + 50}+{i + 50}=", "response": f"{2 * i + 100}"}

    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "letters", letters),
                              skill_file(tmp_path, "more-digits", more_digits)])
    model = build()
    decide_by_cosine(model, 1.0)  # every step is a new skill: three experts wanted
    model.config.max_experts = 2
    learner = ContinualLearner(model, stream, small_config(), tmp_path / "run")
    learner.run()
    assert model.num_experts == 2 and [r.novelty.expert_id for r in learner.records] == [0, 1, 2]
    merged = learner.merges[0]
    assert learner.merges == {0: merged, 1: merged} and model.experts.expert_ids == [2, merged]
    summary = summarise(learner.records, stream="s", model="tiny", experts=model.experts.expert_ids,
                        merges=learner.merges)
    assert summary["expert_of_skill"] == [merged, merged, 2]
    assert {s.expert_id for s in model.library.skills.values()} == {2, merged}
    assert {e for e, _ in learner.memory.skills.values()} == {2, merged}
    # digits returns and trains the merged expert: its own and letters' prompts are what it retains, not what
    # the KL pulls back to the frozen model (more-digits, served by another expert, is)
    assert [learner.served_by(j) for j in range(3)] == [merged, merged, 2]
    step, per = learner.prepare(stream.skills[0]), learner.training.anchors_per_skill
    earlier = [learner.prompts(s, prompted(s.train[:per])) for s in learner.steps]
    texts = anchor_texts(model.tokenizer, [e.prompt for e in step.train], earlier[2],
                         with_prose=learner.training.prose_anchors)
    assert len(learner.anchors(3, step, merged)) == len(texts)
    assert len(learner.retained(3, merged)) == len(earlier[0]) + len(earlier[1])


def test_a_bound_lowered_below_the_pool_is_reached_at_the_next_new_skill(tmp_path):
    def more_digits(i):
        return {"prompt": f"{i + 50}+{i + 50}=", "response": f"{2 * i + 100}"}

    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "letters", letters),
                              skill_file(tmp_path, "more-digits", more_digits),
                              skill_file(tmp_path, "words", lambda i: {"prompt": f"say {i}", "response": "ok"})])
    model = build()
    decide_by_cosine(model, 1.0)  # every step is a new skill
    learner = ContinualLearner(model, stream, small_config(seed_steps=1, consolidation_steps=0), tmp_path / "run")
    for i in range(3):
        learner.run_step(i)
    model.config.max_experts = 2  # a system loaded with a smaller bound than it holds
    learner.run_step(3)
    assert model.num_experts == 2 and len(learner.merges) == 4  # two merges: 3 + 1 new -> 2


def test_pool_prune_folds_an_unused_expert_into_the_one_its_prompts_reach(tmp_path):
    from dylora_moe.experts.pool import prune, routing_shares

    model, learner, _, _ = run_two_skills(tmp_path)
    with torch.no_grad():  # make the gate ignore expert 1: every stored prompt goes to expert 0
        model.router.gate.bias[1] = -1e4
    shares = routing_shares(model, learner.memory)
    assert shares == {0: 1.0, 1: 0.0}
    assert prune(model, learner.memory, 0.05, fit_steps=0) == [(1, 0)]
    assert model.experts.expert_ids == [0] and {s.expert_id for s in model.library.skills.values()} == {0}
    assert len(model.library.skills) == 2  # the pruned expert's skill is still known, now served by expert 0


def test_pool_prune_without_stored_prompts_prunes_nothing(tmp_path):
    """No routing-memory row of the pool's experts: no expert's traffic is known, so none is taken for unused (it
    would otherwise go with its skills, every expert but the last)."""
    from dylora_moe.experts.pool import prune, routing_shares
    from dylora_moe.training.rehearsal import RoutingMemory

    model, learner, _, _ = run_two_skills(tmp_path)
    skills = dict(model.library.skills)
    learner.memory.add(9, 7, torch.randn(4, model.backbone.config.hidden_size))  # rows of an expert since deleted
    for expert_id in (0, 1):
        learner.memory.drop_expert(expert_id)
    for memory in (RoutingMemory(), learner.memory):
        assert routing_shares(model, memory) == {}
        assert prune(model, memory, 0.5, fit_steps=0) == []
        assert model.experts.expert_ids == [0, 1] and model.library.skills.keys() == skills.keys()


@pytest.mark.parametrize("below", [float("nan"), -0.1, 1.5])
def test_pool_prune_refuses_a_share_outside_0_1_and_keeps_the_pool(tmp_path, below):
    """NaN compares as nothing: every expert but one would go with its skills; a share is never above 1."""
    from dylora_moe.experts.pool import prune

    model, learner, _, _ = run_two_skills(tmp_path)
    skills = dict(model.library.skills)
    with pytest.raises(ValueError, match=r"routing share in \[0, 1\]"):
        prune(model, learner.memory, below, fit_steps=0)
    assert model.experts.expert_ids == [0, 1] and model.library.skills.keys() == skills.keys()


def test_requests_the_instruction_views_answer_are_no_kl_anchors(tmp_path):
    def commented(i):
        return {"prompt": f"# add {i} to x\ndef f{i}(x):\n", "response": f"  return x+{i}\n"}

    stream = StreamSpec("s", [skill_file(tmp_path, "commented", commented)])
    model = build()
    plain = ContinualLearner(model, stream, small_config(), tmp_path / "a")
    viewed = ContinualLearner(model, stream, small_config(instruction_views=True), tmp_path / "b")
    step = plain.prepare(stream.skills[0])
    assert len(plain.anchors(0, step, 0)) == 2 * len(step.train)  # each request with the template and raw
    assert viewed.anchors(0, step, 0) is None  # every request is answered by its view: nothing left to anchor


def test_the_gate_fits_of_the_loop_are_penalised(tmp_path, monkeypatch):
    import dylora_moe.training.loop as loop

    decays = []
    real = loop.fit_gate
    monkeypatch.setattr(loop, "fit_gate", lambda *a, **kw: decays.append(kw["weight_decay"]) or real(*a, **kw))
    run_two_skills(tmp_path, router_weight_decay=0.03)
    assert decays == [0.03] * 4  # before and after each of the two skills
    assert TrainingConfig().router_weight_decay == 1e-2
    with pytest.raises(ValueError, match="router_weight_decay"):
        TrainingConfig(router_weight_decay=-1.0)


@pytest.mark.parametrize("mixing", ["fused", "reference"])
@pytest.mark.parametrize("recognised", [False, True])
def test_evaluation_runs_only_examples_whose_expert_changed(tmp_path, recognised, mixing, monkeypatch):
    import dylora_moe.training.loop as loop
    from dylora_moe.training.measure import eval_loss

    reference = mixing == "reference"  # the spec's baseline: one pass per expert, gate on the frozen final states
    model = build(route_layer=None) if reference else build()
    model.config.mixing = mixing
    reads = []  # the gate's inputs are read once per step's held-out set, however often it is evaluated
    monkeypatch.setattr(loop, "gate_features", lambda m, d, b: reads.append(len(d)) or gate_features(m, d, b))
    model, learner, _, _ = run_two_skills(tmp_path, second_recognised=recognised, model=model)
    assert reads == [len(step.eval_set) for step in learner.steps]
    n0, n1 = (len(step.eval_set) for step in learner.steps)
    assert learner.records[-1].routing[0] == {0: 1.0}  # digits' prompts stay with expert 0
    # after step 1, digits is scored again only when step 1 trained expert 0 (a recognised skill)
    assert learner.examples_evaluated == n0 + (n0 if recognised else 0) + n1
    for j, step in enumerate(learner.steps):  # the reused scores are the scores a full evaluation gives
        assert learner.records[-1].losses[j] == pytest.approx(eval_loss(model, step.eval_set), abs=1e-5)
    if not recognised:
        assert learner.records[-1].losses[0] == learner.records[0].losses[0]


def test_a_trained_output_head_scores_every_skill_again(tmp_path):
    """``trainable_lm_head`` trains the shared head at every step: the loss of an example routed to an untrained
    expert changes too, and a reused score would be stale."""
    from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
    from dylora_moe.training.measure import eval_loss
    from tests.conftest import char_tokenizer, tiny_llama

    config = DyLoRAConfig(model="tiny", expert=ExpertConfig(rank=4, alpha=8, dropout=0.0), trainable_lm_head=True)
    model = DyLoRAMoE(tiny_llama(), char_tokenizer(), config)
    model, learner, _, _ = run_two_skills(tmp_path, model=model, seed_lr=5e-2)
    assert [r.novelty.is_novel for r in learner.records] == [True, True]
    for j, step in enumerate(learner.steps):
        assert learner.records[-1].losses[j] == pytest.approx(eval_loss(model, step.eval_set), abs=1e-5)
    assert learner.records[-1].losses[0] != learner.records[0].losses[0]  # the head moved under skill 0


def drift_on_frozen_answers(tmp_path, answer_tokens):
    """KL(frozen || trained expert) on the tokens of the frozen model's greedy answers to the anchor prompts
    (the positions after each prompt's first answer token), after one skill trained with a strong KL."""
    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits)])
    model = build()
    cfg = small_config(kl_weight=50.0, anchor_answers=answer_tokens, seed_lr=5e-2, consolidation_lr=2e-2,
                       consolidation_steps=12)
    learner = ContinualLearner(model, stream, cfg, tmp_path / f"out{answer_tokens}")
    learner.run_step(0)
    anchors = learner.anchors(0, learner.steps[0], 0)
    anchors.answer_with_frozen(model, 8)
    ids, mask = anchors.batch(0, len(anchors))
    answers = mask.clone()
    for k, n in enumerate(anchors.prompt_lengths):
        answers[k, :n] = 0  # the prompt-only KL covers positions up to the first answer token
    assert answers.sum() > 0
    with torch.no_grad():
        with model.force_expert(None):
            frozen = model(input_ids=ids, attention_mask=mask).logits
        with model.force_expert(0):
            trained = model(input_ids=ids, attention_mask=mask).logits
    return float(kl_to_frozen(trained, frozen, answers))


def test_the_kl_on_the_frozen_models_answers_keeps_them(tmp_path):
    free = drift_on_frozen_answers(tmp_path, 0)  # the prompts alone anchored
    kept = drift_on_frozen_answers(tmp_path, 8)  # 0.011 -> 0.0028 when written (Adam: the weight sets directions)
    assert free > 0.0 and kept < 0.5 * free
    with pytest.raises(ValueError, match="anchor_answers"):
        TrainingConfig(anchor_answers=-1)


def drift_of_the_first_skill(tmp_path, retain_kl_weight):
    """Digits, then letters recognised as the digits skill (trained into its expert): the KL from
    the expert's next-token distributions on the digits prompts before the second step to those after it."""
    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "letters", letters)])
    model = build()
    decide_by_cosine(model, 0.999)
    cfg = small_config(kl_weight=0.0, retain_kl_weight=retain_kl_weight, consolidation_steps=4, consolidation_lr=1e-2,
                       report_to=["none"])
    learner = ContinualLearner(model, stream, cfg, tmp_path / f"out{retain_kl_weight}")
    learner.run_step(0)
    assert learner.retained(0, 0) is None  # a new expert serves nothing earlier
    anchors = learner.retained(1, 0)
    assert len(anchors) == cfg.anchors_per_skill and anchors.expert_id == 0
    ids, mask = anchors.batch(0, len(anchors))
    with torch.no_grad(), model.force_expert(0):
        before = model(input_ids=ids, attention_mask=mask).logits
    decide_by_cosine(model, -1.0)
    record = learner.run_step(1)
    assert record.novelty.expert_id == 0 and not record.novelty.is_novel
    with torch.no_grad(), model.force_expert(0):
        after = model(input_ids=ids, attention_mask=mask).logits
    return float(kl_to_frozen(after, before, mask)), record.train_log


def test_a_recognised_skill_keeps_what_its_expert_answered_the_earlier_skill(tmp_path):
    free, _ = drift_of_the_first_skill(tmp_path, 0.0)
    kept, log = drift_of_the_first_skill(tmp_path, 20.0)  # drift 0.20-0.43 of free over steps 3-6, rates 1e-2-5e-2
    kl = [e["kl_to_before"] for e in log if "kl_to_before" in e]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # the teacher is the expert as the step starts
    assert free > 0.0 and kept < 0.5 * free


def test_empty_unlikelihood_is_trained_on_the_anchor_prompts_and_logged(tmp_path):
    """The term joins the loss only with a weight (its value is the unlikelihood of an end of sequence as the
    first answer token of the anchor prompts, ``distill.first_token_unlikelihood``; its effect on answers is
    measured by ``benchmarks/freeform_ablation.py``)."""
    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits)])
    for weight in (0.0, 5.0):
        cfg = small_config(kl_weight=0.1, empty_unlikelihood=weight)
        record = ContinualLearner(build(), stream, cfg, tmp_path / f"out{weight}").run_step(0)
        logged = [e["empty_unlikelihood"] for e in record.train_log if "empty_unlikelihood" in e]
        if weight == 0:
            assert not logged
        else:  # -log(1 - p), p about 1/V on a random tiny model: small, positive, finite
            assert logged and all(0 < v < 1 for v in logged)
    with pytest.raises(ValueError, match="empty_unlikelihood"):
        TrainingConfig(empty_unlikelihood=-1.0)


def test_several_gpus_in_one_process_are_refused_before_anything_trains(monkeypatch, tmp_path):
    """The Trainer would wrap the model in DataParallel, whose replicas share one routing scope."""
    model = build()
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    stream = StreamSpec("s", [SkillSpec("a", {"type": "builtin", "name": "humaneval"})])
    with pytest.raises(ValueError, match="2 GPUs are visible to one process"):
        ContinualLearner(model, stream, TrainingConfig(report_to=["none"]), tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched with one process per GPU: each trains on its own
    ContinualLearner(model, stream, TrainingConfig(report_to=["none"]), tmp_path)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ContinualLearner(model, stream, TrainingConfig(report_to=["none"]), tmp_path)


def test_the_routing_memory_reads_raw_prompts_with_the_start_token_training_gives_them(tmp_path):
    """With a tokenizer that starts raw text with <s> (Llama, Gemma), training and generation feed raw prompts
    as <s> + prompt: the memory the gate is fitted on must hold those features, not the prompt's without <s>."""
    from dylora_moe.data.preprocess import encode_example
    from dylora_moe.data.sources import Example

    model = build()
    model.tokenizer.add_bos_token = True
    example = Example("x+y=", "z")
    ids = encode_example(model.tokenizer, example, chat=False, max_length=32)["input_ids"][:4 + 1]  # <s> x + y =
    assert ids[0] == model.tokenizer.bos_token_id
    trained = model.routing_features(torch.tensor([ids]))
    torch.testing.assert_close(model.routing_features_for([example.prompt], raw=True), trained)
    assert not torch.allclose(model.routing_features_for([example.prompt]), trained)  # chat text: none added
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(4) for b in range(4)]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "s.yaml").write_text("name: s\nskills:\n  - {name: sums, source: {type: file, path: sums.jsonl}, "
                                     "format: {chat: false}}\n")
    training = TrainingConfig(report_to=["none"], instruction_views=False, raw_routing=False)
    learner = ContinualLearner(model, load_stream(tmp_path / "s.yaml"), training, tmp_path)
    data = learner.prepare(learner.skills[0])
    learner.remember(data, model.add_new_skill(data.train, name="sums"))
    first = encode_example(model.tokenizer, data.train[0], chat=False, max_length=32)
    prompt_ids = first["input_ids"][: first["labels"].index(next(t for t in first["labels"] if t != -100))]
    memory = learner.memory.skills[0][1]  # [rows, H], in the training examples' order
    torch.testing.assert_close(memory[0], model.routing_features(torch.tensor([prompt_ids]))[0])


@pytest.mark.parametrize("chat", [False, True])
def test_plain_text_skills_train_with_the_kl_on_and_are_routed_on_their_text(tmp_path, chat):
    """.txt sources have no prompts: nothing to anchor a KL on, and a gate that read the (empty) prompt would
    see one point for every skill. They train, and each skill's held-out text reaches its own expert."""
    files = []
    for name, line in (("words", lambda i: letters(i)["response"].lower() + " xyz"),
                       ("numbers", lambda i: f"{i * 7} {i * 3}")):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n".join(line(i) for i in range(40)), encoding="utf-8")
        files.append({"name": name, "source": {"type": "file", "path": str(path)}, "format": {"chat": chat}})
    model = build()
    model.tokenizer.chat_template = TOY_TEMPLATE
    decide_by_cosine(model, 0.999)
    learner = ContinualLearner(model, StreamSpec("s", files), small_config(kl_weight=0.5), tmp_path / "out")
    learner.run()
    assert model.num_experts == 2
    final = learner.records[-1]
    assert final.routing[0].get(0, 0.0) == 1.0 and final.routing[1].get(1, 0.0) == 1.0
    row = learner.steps[0].train_set[0]
    assert all(label != -100 for label in row["labels"])  # no chat turn, no prompt position


def test_chat_prompts_of_a_tokenizer_without_a_chat_template_are_routed_as_raw_text(tmp_path):
    """With no chat template a chat-format prompt is raw text: it trains and generates with the tokenizer's start
    token, so the routing memory must read it with that token too, for the skill's prompts and its views."""
    from dylora_moe.data.preprocess import encode_example

    model = build()
    model.tokenizer.add_bos_token = True  # starts raw text with <s>; the tiny tokenizer has no chat template
    rows = [{"prompt": f"# add {a} and {b}\nx = {a} + {b}\n", "response": str(a + b)}
            for a in range(4) for b in range(4)]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "s.yaml").write_text("name: s\nskills:\n  - {name: sums, source: {type: file, path: sums.jsonl}}\n")
    training = TrainingConfig(report_to=["none"], instruction_views=True, raw_routing=False)
    learner = ContinualLearner(model, load_stream(tmp_path / "s.yaml"), training, tmp_path)
    data = learner.prepare(learner.skills[0])
    assert learner.routed_texts(data, data.train[:2])[1] == [True, True]
    learner.remember(data, model.add_new_skill(data.train, name="sums"))
    first = encode_example(model.tokenizer, data.train[0], chat=True, max_length=64)
    prompt_ids = first["input_ids"][: first["labels"].index(next(t for t in first["labels"] if t != -100))]
    assert prompt_ids[0] == model.tokenizer.bos_token_id
    memory = learner.memory.skills[0][1]  # the sample's prompts, then their views
    torch.testing.assert_close(memory[0], model.routing_features(torch.tensor([prompt_ids]))[0])
    view = learner.view(data.train[0])
    view_ids = encode_example(model.tokenizer, view, chat=True, max_length=64)
    view_prompt = view_ids["input_ids"][: view_ids["labels"].index(next(t for t in view_ids["labels"] if t != -100))]
    sample = len(data.train[: training.rehearsal_per_skill])
    torch.testing.assert_close(memory[sample], model.routing_features(torch.tensor([view_prompt]))[0])
