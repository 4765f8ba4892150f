"""Per-row token choice: greedy rows take the argmax, sampled rows draw from their own temperature and top-p."""

from __future__ import annotations

import torch

from dylora_moe.serving.decoding import choose, sample
from dylora_moe.serving.requests import GenerationRequest


def test_top_p_keeps_the_smallest_set_reaching_p_per_row():
    torch.manual_seed(0)
    scores = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])).repeat(200, 1)  # [400, 3]
    top_p = torch.tensor([[0.5], [0.8]]).repeat(200, 1)
    drawn = sample(scores, torch.ones(400, 1), top_p)
    assert set(drawn[0::2].tolist()) == {0}  # 0.6 alone reaches 0.5
    assert set(drawn[1::2].tolist()) == {0, 1}  # 0.6 + 0.3 reach 0.8; 0.1 is never drawn


def test_greedy_and_sampled_rows_of_one_batch_keep_their_own_settings():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.9, 0.0]]).repeat(300, 1)
    requests = [GenerationRequest("a", 1, temperature=t) for t in (0.0, 5.0)] * 150
    tokens = choose(logits, requests, None, [])
    assert set(tokens[0::2].tolist()) == {0}
    assert set(tokens[1::2].tolist()) == {0, 1, 2}
