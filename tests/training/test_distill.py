"""KL to the frozen model: zero for equal distributions, positive otherwise, masked positions ignored, and the
trainer's term is zero before the expert has changed anything."""

from __future__ import annotations

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
