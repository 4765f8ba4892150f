"""Routing control: pooling masks, the prompt mask, and maturity read without touching the device."""

from __future__ import annotations

import pytest
import torch

from dylora_moe.routing import DynamicHybridRouter
from dylora_moe.routing.control import pool, prompt_mask


def test_pool_is_the_masked_mean_and_rejects_a_mask_of_another_shape():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask), torch.stack([hidden[0, 1:].mean(0), hidden[1, 0]]))
    with pytest.raises(ValueError, match="does not match"):
        pool(hidden, torch.ones(4, 3))  # e.g. a [B] mask against [B * beams] rows: never silently dropped


def test_pool_accumulates_half_precision_states_in_float32():
    """2048 tokens of bfloat16 states: a bfloat16 sum stops growing long before (its 8-bit mantissa), the
    float32 one is the mean; in float16 the sum would overflow."""
    hidden = torch.full((1, 2048, 4), 1.0 + 2**-7, dtype=torch.bfloat16)
    pooled = pool(hidden, torch.ones(1, 2048, dtype=torch.long))
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.full((1, 4), 1.0 + 2**-7))
    torch.testing.assert_close(pool(torch.full((1, 4096, 2), 60.0, dtype=torch.float16), None),
                               torch.full((1, 2), 60.0))


def test_prompt_mask_marks_the_unlabelled_attended_tokens():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7], [3, 4, 5, 6]])
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert prompt_mask(attention, labels).tolist() == [[0, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]  # no prompt: all


def test_maturity_flag_follows_the_buffer_through_state_dicts():
    router = DynamicHybridRouter(8, 2)
    router.set_maturity(0)
    assert router.strategy == "dense"
    router.set_maturity(1)
    assert router.strategy == "sparse"
    other = DynamicHybridRouter(8, 0)
    other.load_state_dict(router.state_dict())
    assert other.strategy == "sparse" and other.expert_maturity.tolist() == [1, 1]
    other.add_expert()
    assert other.strategy == "dense"
    other.remove_expert(2)
    assert other.strategy == "sparse"
