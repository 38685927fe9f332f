"""OFA's label-smoothed cross-entropy (the official ``adjust_label_smoothed_cross_entropy``).

Two details matter for parity: per-sample weights multiply the log-probabilities (not the
loss), and when a constraint mask is given, smoothing spreads only over the allowed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor  # summed over the kept target tokens
    nll_loss: torch.Tensor  # summed plain negative log-likelihood of the same tokens
    num_tokens: int  # tokens the sums run over; divide by it for a per-token loss


def label_smoothed_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    pad_id: int,
    weights: torch.Tensor | None = None,
    constraint_masks: torch.Tensor | None = None,
    drop_worst_ratio: float = 0.0,
) -> LossOutput:
    """Summed label-smoothed loss over non-pad targets.

    logits (B, T, V); target (B, T); weights (B,) per-sample confidence (VQA answer scores,
    the 2.0 of pretraining's unimodal samples), or (B, T) per token; constraint_masks (B, T, V) bool, True =
    allowed, which also removes disallowed tokens from the softmax. ``drop_worst_ratio``
    keeps only the lowest-loss (1 - ratio) tokens, as the official caption recipe does late
    in training.
    """
    if logits.shape[:2] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                         f"disagree on (batch, length)")
    logits = logits.float()
    if constraint_masks is not None:
        logits = logits.masked_fill(~constraint_masks, float("-inf"))
    lprobs = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    if weights is not None:
        per_token = weights if weights.dim() == 2 else weights[:, None]
        lprobs = lprobs * per_token.to(lprobs.dtype)[..., None]
    keep = target.ne(pad_id)  # (B, T)
    lprobs, target = lprobs[keep], target[keep]  # (N, V), (N,)
    nll = -lprobs.gather(-1, target[:, None]).squeeze(-1)  # (N,)
    if constraint_masks is not None:
        allowed = constraint_masks[keep]  # (N, V)
        smooth = -lprobs.masked_fill(~allowed, 0.0).sum(-1)
        eps_i = epsilon / (allowed.sum(-1).to(lprobs.dtype) - 1 + 1e-6)
    else:
        smooth = -lprobs.sum(-1)
        eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth  # (N,)
    if drop_worst_ratio > 0.0 and loss.numel() > 1:
        kept = max(1, int(loss.numel() * (1.0 - drop_worst_ratio)))
        loss, order = torch.topk(loss, k=kept, largest=False)
        nll = nll[order]
    return LossOutput(loss.sum(), nll.sum(), loss.numel())
