"""Visual grounding accuracy (RefCOCO/+/g Acc@0.5) exactly as OFA's ``eval_refcoco``.

The official ``_calculate_ap_score`` works on ``x0, y0, x1, y1`` boxes in original-image
pixels (predicted bins are mapped back through the resize ratios first) and:

- takes the intersection as ``[max x0, max y0, min x1, min y1]`` and its width/height as
  plain differences (no ``+1`` pixel convention anywhere, areas are ``w * h``);
- divides by ``area_pred + area_target - area_inter + 1e-6`` (the ``1e-6`` is only there
  against a zero union, but it also nudges a borderline IoU just below 0.5);
- counts a hit when ``IoU >= 0.5`` *and* the intersection width and height are both > 0,
  because two boxes that miss each other on both axes give a positive ``w * h`` product.

We compute the same quantity with the intersection clamped at 0, which is identical when
width and height are positive and 0 otherwise, so ``hit == (iou >= 0.5)`` exactly matches
the official test. ``miou`` is the mean of that IoU (not reported by OFA, useful to watch).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

ACC_THRESHOLD = 0.5


def _check_boxes(name: str, boxes: torch.Tensor) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (N, 4), got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) as x0, y0, x1, y1; got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    finite = torch.isfinite(boxes).all(dim=1)
    if not finite.all():
        i = int((~finite).nonzero()[0])
        raise ValueError(f"{name}[{i}] = {boxes[i].tolist()} is not finite")
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        i = int(flipped.nonzero()[0])
        raise ValueError(
            f"{name}[{i}] = {boxes[i].tolist()} has x1 < x0 or y1 < y0; boxes must be "
            "x0, y0, x1, y1 (top-left, bottom-right) in pixels"
        )


def grounding_iou(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """Per-pair IoU (N,) with OFA's formula, 0 where the boxes do not overlap on both axes.

    Always computed in float32, as the official tensors are, so borderline cases round the
    same way: a 10x10 box inside a 10x20 one has IoU 100 / (200 + 1e-6), below 0.5 in exact
    arithmetic but exactly 0.5 in float32, a hit in OFA and here.
    """
    _check_boxes("pred_boxes", pred_boxes)
    _check_boxes("target_boxes", target_boxes)
    if pred_boxes.shape[0] != target_boxes.shape[0]:
        raise ValueError(
            f"got {pred_boxes.shape[0]} pred_boxes but {target_boxes.shape[0]} target_boxes; "
            "they must pair up one to one"
        )
    pred = pred_boxes.to(torch.float32)
    target = target_boxes.to(device=pred_boxes.device, dtype=torch.float32)
    top_left = torch.maximum(pred[:, :2], target[:, :2])  # (N, 2)
    bottom_right = torch.minimum(pred[:, 2:], target[:, 2:])  # (N, 2)
    inter_wh = (bottom_right - top_left).clamp(min=0)  # (N, 2)
    inter = inter_wh[:, 0] * inter_wh[:, 1]  # (N,)
    area_pred = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_target = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    return inter / (area_pred + area_target - inter + 1e-6)


class GroundingAccuracy(Metric):
    """Acc@0.5 and mean IoU of predicted boxes, in original-image pixels, over all processes.

    ``update(pred_boxes, target_boxes)``: (N, 4) tensors of ``x0, y0, x1, y1``. Map the
    predicted bins back to pixels of the *original* image first (OFA divides by the resize
    ratios); the score in the resized frame is not the reported one. ``compute()`` ->
    ``{"acc@0.5": ..., "miou": ...}``. Raises if no box was seen anywhere.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: torch.Tensor
    iou_sum: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> None:
        """Add one batch of box pairs; N = 0 changes nothing."""
        iou = grounding_iou(pred_boxes, target_boxes).to(self.iou_sum.device)  # (N,)
        self.hits += (iou >= ACC_THRESHOLD).sum()
        self.iou_sum += iou.sum(dtype=torch.float64)
        self.total += iou.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        if self.total.item() == 0:
            raise ValueError("GroundingAccuracy.compute() has no boxes: call update(...) with at least "
                             "one pair first")
        return {
            "acc@0.5": self.hits.to(torch.float64) / self.total,
            "miou": self.iou_sum / self.total,
        }
