"""KL to the frozen model: zero for equal distributions, positive otherwise, masked positions ignored, and the
trainer's term is zero before the expert has changed anything."""

from __future__ import annotations

import pytest
import torch

from dylora_moe.training.distill import kl_to_frozen


def test_kl_zero_for_equal_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    mask = torch.ones(2, 5)
    assert float(kl_to_frozen(logits, logits, mask)) == 0.0
    assert float(kl_to_frozen(logits + torch.randn(2, 5, 11, generator=g), logits, mask)) > 0.0


def test_kl_matches_torch_and_ignores_masked_positions():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(1, 4, 7, generator=g), torch.randn(1, 4, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 0]])
    expected = torch.nn.functional.kl_div(torch.log_softmax(p[:, :2], -1), torch.log_softmax(q[:, :2], -1),
                                          log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(kl_to_frozen(p, q, mask), expected)
    changed = p.clone()
    changed[:, 2:] += 5.0  # masked positions do not count
    torch.testing.assert_close(kl_to_frozen(changed, q, mask), expected)


def test_first_paragraph_drops_the_code_the_answer_continues():
    from dylora_moe.training.distill import first_paragraph

    verilog = "// Build an AND gate.\n\nmodule top_module(input a, input b, output out);\n"
    assert first_paragraph(verilog) == "// Build an AND gate."
    assert first_paragraph("Sort a list.\n") == "Sort a list."
    assert first_paragraph("\n\n") == ""


def test_anchor_texts_and_batches():
    from dylora_moe.training.distill import Anchors, anchor_texts
    from tests.conftest import char_tokenizer

    tok = char_tokenizer()
    texts = anchor_texts(tok, ["ab\n\ncd", "efg"], earlier=["x+y="])
    assert texts == ["ab", "ab\n", "efg", "efg\n", "x+y="]  # no chat template on this tokenizer
    # with prose: a comment prompt is also anchored as its bare text; a prose prompt is not repeated
    assert anchor_texts(tok, ["# find files\n", "efg"], with_prose=True) == [
        "# find files", "# find files\n", "find files", "find files\n", "efg", "efg\n"]
    anchors = Anchors(tok, texts, expert_id=3, max_length=2)
    ids, mask = anchors.batch(0, 3)
    assert ids.shape == mask.shape == (3, 2) and anchors.expert_id == 3
    assert mask.tolist() == [[1, 1], [1, 1], [1, 1]]  # "ab", "ab\n" cut to its last 2, "efg" to "fg"
    ids, mask = anchors.batch(1, 3)  # cycles: "efg\n", "x+y=", then "ab" again
    assert ids[2].tolist() == tok("ab", add_special_tokens=False)["input_ids"]


def test_anchors_of_empty_prompts_are_none():
    """Plain text has no prompt: a KL has nothing to anchor on, and training goes on without one."""
    from dylora_moe.training.distill import Anchors, build_anchors
    from tests.conftest import char_tokenizer

    tok = char_tokenizer()
    assert build_anchors(tok, ["", ""], expert_id=0) is None
    with pytest.raises(ValueError, match="every one is empty"):
        Anchors(tok, [""], expert_id=0)
    assert len(build_anchors(tok, ["", "ab"], expert_id=0)) == 1


def test_first_token_unlikelihood_reads_each_rows_last_real_position():
    from dylora_moe.training.distill import first_token_unlikelihood

    logits = torch.zeros(2, 3, 4)  # [B, T, V]
    logits[0, 1, 2] = 3.0  # row 0 ends at position 1 (one pad after it): p(2) = e^3 / (e^3 + 3)
    logits[1, 2, 2] = -3.0  # row 1 ends at position 2
    logits[0, 2, 2] = 50.0  # a pad position: never read
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    p0 = torch.exp(torch.tensor(3.0)) / (torch.exp(torch.tensor(3.0)) + 3)
    p1 = torch.exp(torch.tensor(-3.0)) / (torch.exp(torch.tensor(-3.0)) + 3)
    expected = -(torch.log1p(-p0) + torch.log1p(-p1)) / 2
    torch.testing.assert_close(first_token_unlikelihood(logits, mask, 2), expected)
    sure = torch.full((1, 1, 4), -1e4)
    sure[0, 0, 2] = 1e4  # p = 1: finite, not inf
    assert torch.isfinite(first_token_unlikelihood(sure, torch.ones(1, 1, dtype=torch.long), 2))


def greedy_by_hand(model, ids, steps, eos, expert=None):
    """Greedy continuation of one token list by the frozen model (or ``expert`` alone), a forward per token."""
    out = []
    with torch.no_grad(), model.force_expert(expert):
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + out])).logits
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_anchors_are_followed_by_the_frozen_models_greedy_answers():
    """``answer_with_frozen`` appends the frozen model's own greedy answer (batched, left-padded, stopped before
    its end of sequence, the expert not consulted): the KL then covers the positions a free-form answer is
    decoded on. The request ends stay where the prompts end (the unlikelihood term reads them)."""
    from dylora_moe.training.distill import Anchors
    from tests.conftest import build, randomise_experts

    model = build()
    model.create_expert()
    randomise_experts(model)  # the expert changes every answer: only the frozen model's may be appended
    texts = ["ab", "hello wor", "x+y=", "a longer prompt than the others"]
    anchors = Anchors(model.tokenizer, texts, expert_id=0, max_length=36)
    prompts = [list(ids) for ids in anchors.ids]
    anchors.answer_with_frozen(model, 6, batch_size=3)
    eos = model.tokenizer.eos_token_id
    for prompt, row in zip(prompts, anchors.ids, strict=True):
        assert row == (prompt + greedy_by_hand(model, prompt, 6, eos))[:36]
    assert [len(p) for p in prompts] == anchors.prompt_lengths
    assert len(anchors.ids[-1]) == 36  # 31 prompt tokens + 6 answer tokens, cut to max_length
    assert anchors.request_ends(1, 3).tolist() == [30, 1, 8]  # rows 3, 0, 1 of the cycle
    # the expert answers differently, so appending its answers (or the routed system's) would fail the test
    assert any(greedy_by_hand(model, p, 6, eos, expert=0) != greedy_by_hand(model, p, 6, eos) for p in prompts)


def test_frozen_answers_are_cached_across_anchor_sets():
    """A learner keeps the frozen model's answers across its steps: rows already answered are read from the cache
    (the model does not run for them) and give the rows a fresh generation gives."""
    from dylora_moe.training.distill import Anchors
    from tests.conftest import build

    model = build()
    calls = []
    handle = model.backbone.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    cache: dict = {}
    first = Anchors(model.tokenizer, ["ab", "hello wor"], expert_id=0, max_length=36)
    first.answer_with_frozen(model, 5, batch_size=4, cache=cache)
    assert calls and len(cache) == 2
    calls.clear()
    again = Anchors(model.tokenizer, ["hello wor", "ab", "hello wor"], expert_id=0, max_length=36)
    again.answer_with_frozen(model, 5, batch_size=4, cache=cache)
    assert not calls  # every row was answered before
    assert again.ids == [first.ids[1], first.ids[0], first.ids[1]]
    more = Anchors(model.tokenizer, ["ab", "x+y="], expert_id=0, max_length=36)
    more.answer_with_frozen(model, 5, batch_size=4, cache=cache)
    fresh = Anchors(model.tokenizer, ["ab", "x+y="], expert_id=0, max_length=36)
    fresh.answer_with_frozen(model, 5, batch_size=4)
    assert calls and more.ids == fresh.ids and len(cache) == 3
    shorter = Anchors(model.tokenizer, ["ab"], expert_id=0, max_length=36)
    shorter.answer_with_frozen(model, 2, batch_size=4, cache=cache)  # another answer length is another entry
    assert len(cache) == 4 and shorter.ids[0] == first.ids[0][: len(shorter.ids[0])]
    handle.remove()


def test_first_token_unlikelihood_reads_given_request_ends():
    from dylora_moe.training.distill import first_token_unlikelihood

    logits = torch.zeros(2, 4, 5)  # [B, T, V]; both rows are 4 real tokens (a request and its answer)
    logits[0, 1, 2] = 2.0  # row 0's request ends at 1
    logits[1, 0, 2] = -2.0  # row 1's at 0
    logits[:, 3, 2] = 40.0  # the answers' last positions: never read when the ends are given
    mask = torch.ones(2, 4, dtype=torch.long)
    p = torch.softmax(torch.tensor([[0.0, 0, 2, 0, 0], [0, 0, -2, 0, 0]]), -1)[:, 2]
    expected = -torch.log1p(-p).mean()
    torch.testing.assert_close(first_token_unlikelihood(logits, mask, 2, torch.tensor([1, 0])), expected)


def batch_by_hand(anchors, step: int, size: int):
    rows = [anchors.ids[(step * size + k) % len(anchors.ids)] for k in range(size)]
    width = max(len(r) for r in rows)
    ids = [r + [anchors.pad] * (width - len(r)) for r in rows]
    return ids, [[1] * len(r) + [0] * (width - len(r)) for r in rows]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_anchor_batches_are_slices_of_one_copy_on_the_device(size, monkeypatch):
    """Every batch (wrapping round the rows, or wider than them all) equals one padded by hand, and after the
    first no batch builds a tensor on the host or copies one over: the rows were copied to the device once."""
    from dylora_moe.training.distill import Anchors
    from tests.conftest import HostReads, char_tokenizer

    tok = char_tokenizer()
    anchors = Anchors(tok, ["ab", "hello wor", "x+y=", "a longer prompt"], expert_id=0, max_length=12)
    for step in range(6):
        ids, mask = anchors.batch(step, size)
        assert (ids.tolist(), mask.tolist()) == batch_by_hand(anchors, step, size)
        ends = [anchors.prompt_lengths[(step * size + k) % 4] - 1 for k in range(size)]
        assert anchors.request_ends(step, size).tolist() == ends
    built = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **kw: built.append(a) or real(*a, **kw))
    copies = HostReads("dylora_moe/training/distill.py", calls={torch.Tensor.to})
    with copies:
        for step in range(6):
            anchors.batch(step, size)
            anchors.request_ends(step, size)
    assert built == [] and copies.count == 0


def test_with_a_trained_output_head_the_frozen_teacher_keeps_the_backbones_head():
    """With ``trainable_lm_head`` the head trains with the experts; the KL's teacher and the anchors' frozen
    answers are still the frozen model's, its own head included (the trained head would make the KL pull the
    expert towards a target that moves with it)."""
    from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
    from dylora_moe.training.distill import Anchors, kl_on_anchors
    from tests.conftest import char_tokenizer, randomise_experts, tiny_llama

    config = DyLoRAConfig(model="tiny", expert=ExpertConfig(rank=4, alpha=8, dropout=0.0), trainable_lm_head=True)
    model = DyLoRAMoE(tiny_llama(), char_tokenizer(), config)
    model.create_expert()
    randomise_experts(model)
    head = model.backbone.get_output_embeddings()
    with torch.no_grad():  # as training moves it
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
    frozen = tiny_llama()
    anchors = Anchors(model.tokenizer, ["ab", "hello wor", "x+y="], expert_id=0, max_length=36)
    ids, mask = anchors.batch(0, 3)
    with torch.no_grad():
        teacher = frozen(input_ids=ids, attention_mask=mask).logits
    kl, logits = kl_on_anchors(model, ids, mask, 0)
    torch.testing.assert_close(kl, kl_to_frozen(logits, teacher, mask))
    prompts = [list(r) for r in anchors.ids]
    anchors.answer_with_frozen(model, 6, batch_size=2)
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        for prompt, row in zip(prompts, anchors.ids, strict=True):
            out = []
            for _ in range(6):
                token = int(frozen(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax())
                if token == eos:
                    break
                out.append(token)
            assert row == prompt + out
    # outside the teacher's passes the trained head is the one that counts
    with torch.no_grad(), model.force_expert(None):
        trained = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(trained, teacher)
    assert head.weight.requires_grad
