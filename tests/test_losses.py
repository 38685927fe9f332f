"""Label-smoothed cross-entropy against the official criterion's value on the fixture."""

from __future__ import annotations

import torch

from ofa_lightning.losses import label_smoothed_cross_entropy


def test_matches_official_criterion(reference_inputs, reference_outputs):
    expected = reference_outputs["loss_label_smoothing_0.1"]
    out = label_smoothed_cross_entropy(reference_outputs["case_a"]["logits"], reference_inputs["target"],
                                       epsilon=0.1, pad_id=1)
    assert out.num_tokens == expected["sample_size"]
    torch.testing.assert_close(out.loss, expected["loss_sum"], atol=0, rtol=1e-4)
    torch.testing.assert_close(out.nll_loss, expected["nll_loss_sum"], atol=0, rtol=1e-4)


def hand_loss(logits, target, epsilon, allowed):
    """One token's loss written out: smoothing spreads over the allowed tokens only."""
    lprobs = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    eps_i = epsilon / (allowed.sum() - 1 + 1e-6)
    return (1 - epsilon - eps_i) * -lprobs[target] + eps_i * -lprobs[allowed].sum()


def test_constraint_mask_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10)
    target = torch.tensor([[4, 5, 1], [6, 7, 8]])  # one pad
    allowed = torch.zeros(2, 3, 10, dtype=torch.bool)
    allowed[..., 4:9] = True
    weights = torch.tensor([1.0, 0.5])
    out = label_smoothed_cross_entropy(logits, target, 0.1, pad_id=1, constraint_masks=allowed)
    expected = sum(hand_loss(logits[b, t], target[b, t], 0.1, allowed[b, t])
                   for b in range(2) for t in range(3) if target[b, t] != 1)
    torch.testing.assert_close(out.loss, expected)
    assert out.num_tokens == 5
    weighted = label_smoothed_cross_entropy(logits, target, 0.0, pad_id=1, weights=weights)
    plain = torch.log_softmax(logits, -1)
    manual = -sum(plain[b, t, target[b, t]] * weights[b] for b in range(2) for t in range(3) if target[b, t] != 1)
    torch.testing.assert_close(weighted.loss, manual)


def test_drop_worst_keeps_the_lowest_losses():
    torch.manual_seed(0)
    logits, target = torch.randn(1, 10, 20), torch.randint(4, 20, (1, 10))
    full = label_smoothed_cross_entropy(logits, target, 0.0, pad_id=1)
    dropped = label_smoothed_cross_entropy(logits, target, 0.0, pad_id=1, drop_worst_ratio=0.2)
    per_token = -torch.log_softmax(logits, -1)[0].gather(-1, target[0, :, None]).squeeze(-1)
    assert dropped.num_tokens == 8
    torch.testing.assert_close(dropped.loss, per_token.sort().values[:8].sum())
    assert dropped.loss < full.loss
