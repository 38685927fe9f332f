"""Boxes <-> location bins, with the one quantisation convention of the official OFA code.

A box is ``(x0, y0, x1, y1)`` in pixels of the image the model sees, origin at the top
left. Each coordinate is divided by ``max_image_size`` (512 for RefCOCO; *not* by the
image's own width or height) and mapped to one of ``num_bins`` bins::

    bin   = round(coord / max_image_size * (num_bins - 1))      (round half to even)
    coord = bin / (num_bins - 1) * max_image_size

so bin 0 is coordinate 0, bin ``num_bins - 1`` is ``max_image_size``, and a round trip
moves a coordinate by at most half a bin, ``max_image_size / (num_bins - 1) / 2``.

The official pipeline resizes the image (and the box) by ``(w_ratio, h_ratio)`` before
quantising and divides by them after decoding; :func:`resize_box` and
:func:`box_to_original` are those two steps.

Every function takes one box or a batch (a sequence of 4 numbers or a ``(..., 4)``
tensor) and returns a tensor with the same leading shape.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ofa_lightning.vocab import UnifiedVocab

__all__ = [
    "quantize_box", "dequantize_box", "box_to_tokens", "tokens_to_box", "resize_box",
    "box_to_original", "box_iou",
]

BoxLike = Sequence[float] | torch.Tensor
Ratio = float | torch.Tensor

DEFAULT_MAX_IMAGE_SIZE = 512.0
DEFAULT_NUM_BINS = 1000


def quantize_box(box: BoxLike, max_image_size: float = DEFAULT_MAX_IMAGE_SIZE,
                 num_bins: int = DEFAULT_NUM_BINS, *, clip: bool = True) -> torch.Tensor:
    """Bins of a box in model-image pixels, as an int64 ``(..., 4)`` tensor.

    A box that reaches outside ``[0, max_image_size]`` is clipped to it (``clip=True``,
    what augmentations that crop produce) or rejected (``clip=False``, to catch boxes in
    the wrong coordinate frame). The arithmetic is float32, as in the official pipeline,
    so a coordinate on a rounding boundary lands in the same bin.
    """
    _check_grid(max_image_size, num_bins)
    boxes = _validated_boxes(box)
    if clip:
        boxes = boxes.clamp(0.0, max_image_size)
    else:
        _check_inside(boxes, max_image_size)
    return torch.round(boxes / max_image_size * (num_bins - 1)).long()


def dequantize_box(bins: BoxLike, max_image_size: float = DEFAULT_MAX_IMAGE_SIZE,
                   num_bins: int = DEFAULT_NUM_BINS) -> torch.Tensor:
    """Pixel coordinates (float32, ``(..., 4)``) of the bin centres.

    Corners are not reordered or checked for order: a generated box may be malformed and
    must still be scored (it gets IoU 0), not rejected.
    """
    _check_grid(max_image_size, num_bins)
    bins = _as_int(bins, "bins")
    if bool(((bins < 0) | (bins >= num_bins)).any()):
        raise ValueError(f"bins must lie in [0, {num_bins}), got {bins.tolist()}")
    return bins.float() / (num_bins - 1) * max_image_size


def box_to_tokens(box: BoxLike, vocab: UnifiedVocab,
                  max_image_size: float = DEFAULT_MAX_IMAGE_SIZE, *,
                  clip: bool = True) -> torch.Tensor:
    """The ``<bin_x0> <bin_y0> <bin_x1> <bin_y1>`` token ids of a box (int64, ``(..., 4)``)."""
    return vocab.bin_id(quantize_box(box, max_image_size, vocab.num_bins, clip=clip))


def tokens_to_box(tokens: BoxLike, vocab: UnifiedVocab,
                  max_image_size: float = DEFAULT_MAX_IMAGE_SIZE) -> torch.Tensor:
    """The box (model-image pixels, float32) that four bin tokens stand for.

    A token that is not a bin raises ``ValueError``; decoding with the bins-only
    constraint (``vocab.bin_range``) guarantees four bins.
    """
    bins = vocab.bin_index(_as_int(tokens, "bin tokens"))
    return dequantize_box(bins, max_image_size, vocab.num_bins)


def resize_box(box: BoxLike, w_ratio: Ratio, h_ratio: Ratio) -> torch.Tensor:
    """Original-image pixels -> resized-image pixels (x times ``w_ratio``, y times ``h_ratio``).

    The ratios are ``resized_size / original_size``; a tensor of ratios holds one per box.
    """
    boxes = _as_float(box)
    return boxes * _xyxy_scale(w_ratio, h_ratio, boxes)


def box_to_original(box: BoxLike, w_ratio: Ratio, h_ratio: Ratio) -> torch.Tensor:
    """Resized-image pixels -> original-image pixels, the inverse of :func:`resize_box`.

    This is how the official RefCOCO evaluation compares a prediction with the ground
    truth: in the pixels of the original image.
    """
    boxes = _as_float(box)
    return boxes / _xyxy_scale(w_ratio, h_ratio, boxes)


def box_iou(boxes1: BoxLike, boxes2: BoxLike) -> torch.Tensor:
    """IoU of paired boxes: ``(..., 4)`` and ``(..., 4)`` give ``(...)``.

    Paired, unlike ``torchvision.ops.box_iou`` (all pairs), because grounding scores one
    prediction against its one target. A box with x1 < x0 or y1 < y0 (a malformed
    prediction) counts as empty, and two empty boxes have IoU 0, so ``iou >= 0.5`` is the
    official Acc@0.5 criterion (which also demands a positive intersection).
    """
    a, b = _as_float(boxes1), _as_float(boxes2)
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = _area(a) + _area(b) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(union))


# ---------------------------------------------------------------------- helpers
def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(dim=-1)


def _as_float(box: BoxLike) -> torch.Tensor:
    return _check_shape(torch.as_tensor(box, dtype=torch.float32))


def _as_int(values: BoxLike, what: str) -> torch.Tensor:
    """Integer ``(..., 4)`` tensor; floats are refused rather than silently truncated."""
    tensor = torch.as_tensor(values)
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(f"{what} must be integers, got dtype {tensor.dtype}: {tensor.tolist()}")
    return _check_shape(tensor.long())


def _check_shape(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim == 0 or tensor.shape[-1] != 4:
        raise ValueError(f"a box is 4 numbers (x0, y0, x1, y1); got shape {tuple(tensor.shape)}")
    return tensor


def _validated_boxes(box: BoxLike) -> torch.Tensor:
    boxes = _as_float(box)
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"box {_first(boxes, ~torch.isfinite(boxes).all(dim=-1))} has a "
                         f"non-finite coordinate")
    inverted = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    if bool(inverted.any()):
        raise ValueError(f"box {_first(boxes, inverted)} has x1 < x0 or y1 < y0; boxes are "
                         f"(x0, y0, x1, y1) with the top-left corner first")
    return boxes


def _check_inside(boxes: torch.Tensor, max_image_size: float) -> None:
    outside = ((boxes < 0) | (boxes > max_image_size)).any(dim=-1)
    if bool(outside.any()):
        raise ValueError(f"box {_first(boxes, outside)} reaches outside [0, {max_image_size}]; "
                         f"pass clip=True to clip it")


def _check_grid(max_image_size: float, num_bins: int) -> None:
    if not max_image_size > 0:
        raise ValueError(f"max_image_size must be > 0, got {max_image_size}")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")


def _first(boxes: torch.Tensor, where: torch.Tensor) -> list[float]:
    """The first box flagged by ``where``, for error messages."""
    return boxes.reshape(-1, 4)[where.reshape(-1)][0].tolist()


def _xyxy_scale(w_ratio: Ratio, h_ratio: Ratio, boxes: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w_ratio, dtype=boxes.dtype, device=boxes.device)
    h = torch.as_tensor(h_ratio, dtype=boxes.dtype, device=boxes.device)
    if not bool(((w > 0) & (h > 0)).all()):
        raise ValueError(f"resize ratios must be > 0, got w_ratio={w_ratio}, h_ratio={h_ratio}")
    w, h = torch.broadcast_tensors(w, h)
    return torch.stack([w, h, w, h], dim=-1)  # (..., 4), broadcasts against the boxes
