"""Accuracy-style metrics for the pretraining tasks: closed-label accuracy (image-text
matching's yes/no) and text reconstruction (text infilling).

Both keep only integer sums as state, so under DDP torchmetrics' sum reduction gives every
process the score of the whole evaluated set; nothing else needs gathering.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

__all__ = ["LabelAccuracy", "TextReconstruction", "word_edit_distance"]


def _check_pairs(predictions: Sequence[str], targets: Sequence[str], what: str) -> None:
    if isinstance(predictions, str) or isinstance(targets, str):
        raise TypeError(f"predictions and {what} must be lists of str (one per sample), got a str")
    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} predictions but {len(targets)} {what}; they "
                         f"must pair up one to one")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{i}] must be a str, got {type(pred).__name__}")


class LabelAccuracy(Metric):
    """Accuracy over a closed label set, plus the accuracy within each true label.

    ``update(predictions, targets)``: decoded strings (compared after stripping surrounding
    whitespace) and the true labels, each one of ``labels``. A prediction outside the label
    set is simply wrong. ``compute()`` -> ``{"accuracy": ..., "recall_<label>": ...}``; the
    per-label values show a model that answers "yes" to everything, which the overall
    accuracy of a balanced set hides. A label never seen as a target has no recall key.
    Raises if no sample was seen anywhere.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, labels: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        labels = [labels] if isinstance(labels, str) else list(labels)
        if not labels or len(set(labels)) != len(labels) or not all(
                isinstance(label, str) and label.strip() == label and label for label in labels):
            raise ValueError(f"LabelAccuracy: labels must be distinct non-empty strings without "
                             f"surrounding spaces, got {labels!r}")
        self.labels = labels
        self._index = {label: i for i, label in enumerate(labels)}
        zeros = torch.zeros(len(labels), dtype=torch.int64)
        self.add_state("correct", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("total", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], targets: Sequence[str]) -> None:
        """Add one batch; an empty batch changes nothing."""
        _check_pairs(predictions, targets, "targets")
        for i, target in enumerate(targets):
            if target not in self._index:
                raise ValueError(f"targets[{i}] = {target!r} is not one of the labels "
                                 f"{self.labels}")
        for pred, target in zip(predictions, targets):
            k = self._index[target]
            self.total[k] += 1
            self.correct[k] += int(pred.strip() == target)

    def compute(self) -> dict[str, torch.Tensor]:
        total = int(self.total.sum())
        if total == 0:
            raise ValueError("LabelAccuracy.compute() has no samples: call update(...) with at "
                             "least one prediction first")
        out = {"accuracy": self.correct.sum().double() / total}
        for label, k in self._index.items():
            if int(self.total[k]) > 0:
                out[f"recall_{label}"] = self.correct[k].double() / self.total[k]
        return out


def word_edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (unit cost insert/delete/substitute)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, word in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


class TextReconstruction(Metric):
    """How well generated texts reproduce their references (text infilling).

    ``update(predictions, references)``: decoded texts and the original texts. Texts are
    compared as whitespace-separated words after lowercasing, so the score does not depend
    on the BPE (a trained and the official vocabulary score the same output alike).
    ``compute()`` ->

    - ``word_accuracy``: ``sum_i max(|ref_i| - d_i, 0) / sum_i |ref_i|`` where ``d_i`` is
      the word edit distance of sample ``i``: 1 minus the word error rate, floored at 0 per
      sample so that one runaway generation cannot cancel other samples' correct words.
      Edit distance rather than position-wise matching, because one missing word would
      otherwise count every later word as wrong.
    - ``exact_match``: the fraction of samples reproduced word for word.

    Raises if no sample was seen anywhere.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    matched_words: torch.Tensor
    reference_words: torch.Tensor
    exact: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("matched_words", "reference_words", "exact", "total"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        """Add one batch; an empty batch changes nothing."""
        _check_pairs(predictions, references, "references")
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            if not isinstance(ref, str):
                raise TypeError(f"references[{i}] must be a str, got {type(ref).__name__}")
            pred_words, ref_words = pred.lower().split(), ref.lower().split()
            distance = word_edit_distance(pred_words, ref_words)
            self.matched_words += max(len(ref_words) - distance, 0)
            self.reference_words += len(ref_words)
            self.exact += int(pred_words == ref_words)
            self.total += 1

    def compute(self) -> dict[str, torch.Tensor]:
        if int(self.total) == 0:
            raise ValueError("TextReconstruction.compute() has no samples: call update(...) "
                             "with at least one prediction first")
        words = max(int(self.reference_words), 1)  # only empty references: avoid 0 / 0
        return {"word_accuracy": self.matched_words.double() / words,
                "exact_match": self.exact.double() / self.total}
