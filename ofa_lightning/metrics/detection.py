"""Object detection scores for a seq2seq detector: mAP@0.5, precision and recall at IoU 0.5.

OFA's detection task is a pretraining task without an official evaluation, so this module
follows the usual definitions and says where it had to choose:

- **Matching** (per image, per class): predictions are visited from the highest score down;
  each takes the still-unmatched ground truth of the same label with the highest IoU, if
  that IoU is ``>= 0.5``; it is then a true positive, otherwise a false positive. A ground
  truth is matched at most once, so a duplicate detection is a false positive. (The VOC
  devkit compares against the best-IoU ground truth *whether or not* it is taken; the two
  differ only when two boxes of one class overlap by more than 0.5 IoU, rare and
  arguably a devkit quirk; COCO matches as we do.)
- **AP** (per class, over all images): VOC's all-point interpolation. Sort the class's
  predictions by score, take the precision/recall curve, replace each precision by the
  best precision at any higher recall, and sum precision over the recall steps. Tied
  scores are one threshold (the curve is only evaluated after the whole tie), so the
  result never depends on the order of tied predictions, which after a DDP gather
  depends on how the data was sharded.
- **mAP@0.5**: the mean AP over the classes that have at least one ground-truth object.
  A class that is only ever predicted has no AP (COCO and torchmetrics do the same); its
  predictions still lower ``precision``.
- **precision / recall**: over all classes and images, true positives over all
  predictions / over all ground-truth objects, with the matching above. Precision with
  no prediction at all is 0 (nothing was found).
- **Scores**: a seq2seq detector emits no confidences. Give ``scores`` from generation
  (``DetectionTask`` uses the mean token log-probability of each object); without them
  the order of emission is the ranking, :func:`emission_order_scores`.

IoU is :func:`ofa_lightning.location.box_iou` (plain ``w * h`` areas, no ``+1`` pixel): a
predicted box with ``x1 < x0`` or ``y1 < y0`` is empty and matches nothing.

DDP: matching needs one image's predictions and ground truth together, and an image is
never split across processes, so it happens in ``update``. What crosses processes is one
row per prediction (label, score, true-positive flag) and one per ground truth (label),
concatenated; AP is computed once over the gathered rows. Labels may be strings: they
travel as a stable 64-bit hash (BLAKE2b, never Python's per-process salted ``hash``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from ofa_lightning.location import box_iou

__all__ = ["DetectionMetrics", "average_precision", "emission_order_scores", "label_key",
           "match_detections", "IOU_THRESHOLD"]

IOU_THRESHOLD = 0.5
Label = str | int


def emission_order_scores(count: int) -> torch.Tensor:
    """Scores ``1, 1/2, 1/3, ...`` for ``count`` objects in the order they were emitted.

    The ranking when generation gives no confidence: earlier objects rank higher within an
    image, and the k-th objects of all images tie (a tie is one threshold for AP).
    """
    return 1.0 / torch.arange(1, count + 1, dtype=torch.float64)


def label_key(label: Label) -> int:
    """A label as an int64 that is the same on every process: ints as they are, strings
    as their BLAKE2b-64 hash (a collision between two label strings has probability
    ~n^2 / 2^64, i.e. none in practice)."""
    if isinstance(label, bool):
        raise TypeError(f"a label must be a string or an int, got {label!r}")
    if isinstance(label, int):
        return label
    if isinstance(label, str):
        digest = hashlib.blake2b(label.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)
    raise TypeError(f"a label must be a string or an int, got {type(label).__name__}: {label!r}")


def match_detections(pred_boxes: torch.Tensor, pred_labels: torch.Tensor,
                     pred_scores: torch.Tensor, gt_boxes: torch.Tensor,
                     gt_labels: torch.Tensor, iou_threshold: float = IOU_THRESHOLD
                     ) -> torch.Tensor:
    """True-positive flags (N,) bool of one image's predictions, in their given order.

    Greedy by descending score (ties keep the given order): each prediction takes the free
    ground truth of its label with the highest IoU, if it reaches ``iou_threshold``.
    Labels are int64 keys (:func:`label_key`).
    """
    tp = torch.zeros(pred_boxes.shape[0], dtype=torch.bool)
    if pred_boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return tp
    iou = box_iou(pred_boxes[:, None, :], gt_boxes[None, :, :])  # (N, M)
    candidates = (pred_labels[:, None] == gt_labels[None, :]) & (iou >= iou_threshold)  # (N, M)
    free = torch.ones(gt_boxes.shape[0], dtype=torch.bool)  # (M,)
    for i in torch.argsort(pred_scores, descending=True, stable=True).tolist():
        allowed = candidates[i] & free
        if not bool(allowed.any()):
            continue
        j = int(torch.where(allowed, iou[i], torch.full_like(iou[i], -1.0)).argmax())
        free[j] = False
        tp[i] = True
    return tp


def average_precision(scores: torch.Tensor, tp: torch.Tensor, num_gt: int) -> float:
    """VOC all-point interpolated AP of one class, ties in ``scores`` as one threshold.

    ``scores`` (N,) and ``tp`` (N,) describe the class's predictions over all images;
    ``num_gt`` > 0 is its number of ground-truth objects.
    """
    if num_gt <= 0:
        raise ValueError(f"average_precision needs num_gt > 0, got {num_gt}")
    if scores.numel() == 0:
        return 0.0
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order].to(torch.float64)
    hits = tp[order].to(torch.float64)
    cum_tp = hits.cumsum(0)  # (N,)
    cum_all = torch.arange(1, hits.numel() + 1, dtype=torch.float64)
    # the last index of each run of equal scores: the curve is read only there
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = counts.cumsum(0) - 1
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), cum_tp[ends] / num_gt])
    precision = torch.cat([torch.zeros(1, dtype=torch.float64), cum_tp[ends] / cum_all[ends]])
    # the precision envelope: the best precision at this recall or any higher one
    envelope = precision.flip(0).cummax(0).values.flip(0)
    return float(((recall[1:] - recall[:-1]) * envelope[1:]).sum())


def _boxes(name: str, value: Any, index: int, allow_inverted: bool) -> torch.Tensor:
    boxes = torch.as_tensor(value, dtype=torch.float64).cpu()
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}[{index}]['boxes'] must have shape (N, 4) as x0, y0, x1, y1; "
                         f"got {tuple(boxes.shape)}")
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{name}[{index}]['boxes'] holds a non-finite coordinate: "
                         f"{boxes.tolist()}")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if not allow_inverted and bool(inverted.any()):
        k = int(inverted.nonzero()[0])
        raise ValueError(f"{name}[{index}]['boxes'][{k}] = {boxes[k].tolist()} has x1 < x0 or "
                         f"y1 < y0; ground-truth boxes are (x0, y0, x1, y1), top-left first")
    return boxes


def _labels(name: str, entry: Mapping[str, Any], index: int, count: int) -> torch.Tensor:
    labels = entry.get("labels")
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    if labels is None or isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"{name}[{index}]['labels'] must be a sequence of labels (strings or "
                         f"ints), one per box; got {labels!r}")
    if len(labels) != count:
        raise ValueError(f"{name}[{index}] has {count} boxes but {len(labels)} labels")
    try:
        return torch.tensor([label_key(label) for label in labels], dtype=torch.int64)
    except TypeError as error:
        raise ValueError(f"{name}[{index}]['labels']: {error}") from None


def _scores(entry: Mapping[str, Any], index: int, count: int) -> torch.Tensor:
    if entry.get("scores") is None:
        return emission_order_scores(count)
    scores = torch.as_tensor(entry["scores"], dtype=torch.float64).cpu().reshape(-1)
    if scores.numel() != count:
        raise ValueError(f"preds[{index}] has {count} boxes but {scores.numel()} scores")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"preds[{index}]['scores'] holds a non-finite score: {scores.tolist()}")
    return scores


def _entry(name: str, entry: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping) or "boxes" not in entry:
        raise ValueError(f"{name}[{index}] must be a mapping with 'boxes' and 'labels' (and, "
                         f"for preds, optional 'scores'); got {entry!r}")
    return entry


class DetectionMetrics(Metric):
    """mAP@0.5, precision and recall at IoU 0.5 over all images seen on all processes.

    ``update(preds, targets)``: one entry per image, as torchmetrics' detection metrics
    take them, except that labels may be strings:

    - ``preds[i] = {"boxes": (N, 4), "labels": N labels, "scores": (N,) or absent}``
    - ``targets[i] = {"boxes": (M, 4), "labels": M labels}``

    Boxes are ``x0, y0, x1, y1`` in one pixel frame for both (the original image's). A
    predicted box may be inverted (a malformed output; it matches nothing); a ground-truth
    box may not. ``compute()`` -> ``{"map50", "precision", "recall"}`` as float64 tensors;
    raises if no ground-truth object was seen anywhere. See the module docstring for the
    matching, the AP interpolation and the ranking without scores.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pred_labels: list[torch.Tensor] | torch.Tensor
    pred_scores: list[torch.Tensor] | torch.Tensor
    pred_tp: list[torch.Tensor] | torch.Tensor
    gt_labels: list[torch.Tensor] | torch.Tensor

    _STATES = ("pred_labels", "pred_scores", "pred_tp", "gt_labels")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[Mapping[str, Any]],
               targets: Sequence[Mapping[str, Any]]) -> None:
        """Match one batch of images; an empty batch changes nothing."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} preds but {len(targets)} targets; they pair up "
                             f"one image to one image")
        for i, (pred, target) in enumerate(zip(preds, targets)):
            pred, target = _entry("preds", pred, i), _entry("targets", target, i)
            pred_boxes = _boxes("preds", pred["boxes"], i, allow_inverted=True)
            gt_boxes = _boxes("targets", target["boxes"], i, allow_inverted=False)
            pred_labels = _labels("preds", pred, i, pred_boxes.shape[0])
            gt_labels = _labels("targets", target, i, gt_boxes.shape[0])
            scores = _scores(pred, i, pred_boxes.shape[0])
            # int64, not bool: every process-group backend can gather it
            tp = match_detections(pred_boxes, pred_labels, scores, gt_boxes, gt_labels).long()
            for name, value in (("pred_labels", pred_labels), ("pred_scores", scores),
                                ("pred_tp", tp), ("gt_labels", gt_labels)):
                getattr(self, name).append(value.to(self.device))

    def _gathered(self) -> dict[str, torch.Tensor]:
        """The concatenated rows (lists before a sync, one tensor after it)."""
        empty = {"pred_labels": torch.zeros(0, dtype=torch.int64),
                 "pred_scores": torch.zeros(0, dtype=torch.float64),
                 "pred_tp": torch.zeros(0, dtype=torch.int64),
                 "gt_labels": torch.zeros(0, dtype=torch.int64)}
        out = {}
        for name in self._STATES:
            value = getattr(self, name)
            out[name] = (empty[name] if isinstance(value, list) and not value
                         else dim_zero_cat(value).cpu())
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        rows = self._gathered()
        gt_labels, tp = rows["gt_labels"], rows["pred_tp"].bool()
        if gt_labels.numel() == 0:
            raise ValueError("DetectionMetrics.compute() has no ground-truth objects: call "
                             "update(preds, targets) with at least one object first (on some "
                             "process)")
        classes, gt_counts = torch.unique(gt_labels, return_counts=True)
        aps = [average_precision(rows["pred_scores"][rows["pred_labels"] == c],
                                 tp[rows["pred_labels"] == c], int(n))
               for c, n in zip(classes.tolist(), gt_counts.tolist())]
        true_positives = int(tp.sum())
        predictions = tp.numel()
        return {
            "map50": torch.tensor(sum(aps) / len(aps), dtype=torch.float64, device=self.device),
            "precision": torch.tensor(true_positives / predictions if predictions else 0.0,
                                      dtype=torch.float64, device=self.device),
            "recall": torch.tensor(true_positives / gt_labels.numel(), dtype=torch.float64,
                                   device=self.device),
        }

    def set_dtype(self, dst_type: str | torch.dtype) -> "DetectionMetrics":
        """Keep the states as they are: label hashes, flags and float64 scores (a lower
        precision would create ties in the ranking)."""
        return self
