"""Tokenisation: loss only on response tokens, truncation, packing that never crosses examples' labels."""

from __future__ import annotations

import pytest
from tokenizers import processors

from dylora_moe.data.preprocess import IGNORE, bos_prefix, build_dataset, encode_example, pack
from dylora_moe.data.sources import Example
from tests.conftest import char_tokenizer


def test_loss_only_on_response_tokens():
    tok = char_tokenizer()
    row = encode_example(tok, Example("ab=", "cd"), chat=False, max_length=64)
    assert row["input_ids"] == tok("ab=cd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["labels"] == [IGNORE] * 3 + row["input_ids"][3:]


def test_truncation_and_fully_truncated_examples():
    tok = char_tokenizer()
    row = encode_example(tok, Example("abcd", "efgh"), chat=False, max_length=6)
    assert len(row["input_ids"]) == 6 and row["labels"][4:] == row["input_ids"][4:]
    assert encode_example(tok, Example("abcdefgh", "xy"), chat=False, max_length=5) is None


def test_packing_never_crosses_examples():
    tok = char_tokenizer()
    examples = [Example(f"p{i}:", f"r{i}" * (i + 1)) for i in range(12)]
    rows = [encode_example(tok, e, chat=False, max_length=24) for e in examples]
    blocks = pack(rows, max_length=24)
    assert all(len(b["input_ids"]) <= 24 for b in blocks)
    flat_ids = [t for b in blocks for t in b["input_ids"]]
    assert flat_ids == [t for r in rows for t in r["input_ids"]]  # every example whole, in order
    starts, pos = set(), 0
    for r in rows:
        starts.add(pos)
        pos += len(r["input_ids"])
    flat_labels = [lab for b in blocks for lab in b["labels"]]
    for i, (tok_id, lab) in enumerate(zip(flat_ids, flat_labels, strict=True)):
        assert lab in (IGNORE, tok_id)  # a label is always the token at its own position
        if i in starts:
            assert lab == IGNORE  # the first token of an example is never predicted from the one before


def test_build_dataset_columns_and_errors():
    tok = char_tokenizer()
    ds = build_dataset(tok, [Example("a=", "b"), Example("c=", "d")], max_length=16, chat=False)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "labels"} and len(ds) == 2
    packed = build_dataset(tok, [Example("a=", "b"), Example("c=", "d")], max_length=16, chat=False, packing=True)
    assert len(packed) == 1
    with pytest.raises(ValueError, match="empty"):
        build_dataset(tok, [], max_length=16)
    with pytest.raises(ValueError, match="raise max_length"):
        build_dataset(tok, [Example("abcdefgh", "x")], max_length=4, chat=False)


@pytest.mark.parametrize("chat", [False, True])
def test_an_example_without_a_prompt_is_plain_text_with_no_prompt_position(chat):
    """A .txt source's lines: no chat turn around them, every position a label, so the gate routes the whole
    text (routing.control.prompt_mask) instead of an empty prompt shared by every example."""
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    row = encode_example(tok, Example("  ", "cd"), chat=chat, max_length=64)
    assert row["input_ids"] == tok("cd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["labels"] == row["input_ids"]


def test_examples_whose_prompt_fills_max_length_are_left_out_with_a_warning(caplog):
    tok = char_tokenizer()
    examples = [Example("ab=", "cd"), Example("abcdefghij=", "cd")]
    with caplog.at_level("WARNING", logger="dylora_moe.data.preprocess"):
        built = build_dataset(tok, examples, max_length=8, chat=False)
    assert len(built) == 1
    assert "1 of 2 examples are left out" in caplog.text and "max_length=8" in caplog.text


def bos_tokenizer():
    """A tokenizer that puts <s> before every text with its special tokens, as Gemma's does, while its
    add_bos_token reads False."""
    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                         special_tokens=[("<s>", 1)])
    return tok


def test_raw_prompts_start_with_the_start_token_a_post_processor_adds():
    """Gemma's tokenizer puts <bos> before every text through its post-processor while its add_bos_token reads
    False; generation tokenises a raw prompt with the special tokens, so training must start it with <bos> too."""
    tok = bos_tokenizer()
    assert not getattr(tok, "add_bos_token", False) and tok("ab=")["input_ids"][0] == tok.bos_token_id
    assert bos_prefix(tok) == [tok.bos_token_id]
    row = encode_example(tok, Example("ab=", "cd"), chat=False, max_length=64)
    assert row["input_ids"][:4] == tok("ab=")["input_ids"]  # the prompt as generation feeds it
    assert row["labels"][:4] == [IGNORE] * 4
    assert bos_prefix(char_tokenizer()) == []  # a tokenizer that adds nothing gets nothing


def test_a_chat_prompt_without_a_chat_template_is_raw_text_with_the_start_token():
    """A base model's tokenizer has no chat template: generation feeds a chat=True prompt as raw text with the
    special tokens (generation.prompt_batch), so a chat-format example trains on those ids, <s> first."""
    tok = bos_tokenizer()
    assert not tok.chat_template
    row = encode_example(tok, Example("ab=", "cd"), chat=True, max_length=64)
    assert row == encode_example(tok, Example("ab=", "cd"), chat=False, max_length=64)
    assert row["input_ids"][:4] == tok("ab=")["input_ids"] and row["labels"][:4] == [IGNORE] * 4
