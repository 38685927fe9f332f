"""VQA accuracy as OFA scores it: the soft score of the predicted answer, averaged.

OFA's evaluation (``utils/eval_utils.py::eval_vqa_gen``) looks the predicted answer up in
the sample's ``ref_dict`` (answer -> confidence, the VQAv2 soft score already in the data
file, e.g. ``0.6|!+no``) and counts 0 when the answer is absent. No answer normalisation
happens at evaluation: the answers in the data are normalised beforehand, and the
predicted string is looked up verbatim after trimming surrounding whitespace (the beam
search path's ``.strip()``).

A sum and a count (per answer type for :class:`VQAAccuracyByType`) are the only state, so
DDP needs nothing but a sum over processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

# VQAv2's answer types, the split its evaluation reports beside the overall accuracy
ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")


def vqa_soft_scores(predictions: Sequence[str], answer_scores: Sequence[Mapping[str, float]]) -> list[float]:
    """Per-sample soft score: ``answer_scores[i].get(predictions[i].strip(), 0.0)``."""
    if isinstance(predictions, str):
        raise TypeError("predictions must be a list of str (one answer per sample), got a str")
    if len(predictions) != len(answer_scores):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(answer_scores)} answer-score dicts; "
            "they must pair up one to one"
        )
    scores = []
    for i, (pred, ref) in enumerate(zip(predictions, answer_scores)):
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{i}] must be a str (a decoded answer), got {type(pred).__name__}")
        if not isinstance(ref, Mapping):
            raise TypeError(
                f"answer_scores[{i}] must be a dict answer -> soft score (e.g. {{'no': 0.6}}), "
                f"got {type(ref).__name__}"
            )
        scores.append(float(ref.get(pred.strip(), 0.0)))
    return scores


class _SoftScoreTotals(Metric):
    """Soft-score sums and sample counts in ``bins`` bins, summed over processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score_sum: torch.Tensor
    total: torch.Tensor

    def __init__(self, bins: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # float64: a float32 sum drifts once it runs over ~10^5 answers
        self.add_state("score_sum", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(bins, dtype=torch.int64), dist_reduce_fx="sum")


class VQAAccuracy(_SoftScoreTotals):
    """Mean VQA soft score of the predicted answers over all samples on all processes.

    ``update(predictions, answer_scores)``: decoded answers and, per sample, its
    ``{answer: confidence}`` dict. ``compute()`` -> scalar tensor in [0, 1] (OFA prints it
    x100). Raises if no sample was seen anywhere: an accuracy of nothing is not 0.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(1, **kwargs)

    def update(self, predictions: Sequence[str], answer_scores: Sequence[Mapping[str, float]]) -> None:
        """Add one batch; an empty batch changes nothing."""
        scores = vqa_soft_scores(predictions, answer_scores)
        self.score_sum += sum(scores)
        self.total += len(scores)

    def compute(self) -> torch.Tensor:
        if self.total.item() == 0:
            raise ValueError("VQAAccuracy.compute() has no samples: call update(...) with at least "
                             "one answer first")
        return (self.score_sum / self.total)[0]


class VQAAccuracyByType(_SoftScoreTotals):
    """VQA accuracy per answer type (VQAv2's ``yes/no``, ``number``, ``other``), as the
    official VQAv2 evaluation reports it: a model that answers "yes" to every yes/no
    question can hide behind a fair overall score, and this split shows it.

    ``update(predictions, answer_scores, answer_types)``; ``compute()`` ->
    ``{"accuracy_yes_no": ..., "accuracy_number": ..., "accuracy_other": ...}`` with only the
    types that had samples (an accuracy of nothing is not 0).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(len(ANSWER_TYPES), **kwargs)

    def update(self, predictions: Sequence[str], answer_scores: Sequence[Mapping[str, float]],
               answer_types: Sequence[str]) -> None:
        scores = vqa_soft_scores(predictions, answer_scores)
        if len(answer_types) != len(scores):
            raise ValueError(f"got {len(scores)} predictions but {len(answer_types)} answer types")
        for i, (score, kind) in enumerate(zip(scores, answer_types)):
            if kind not in ANSWER_TYPES:
                raise ValueError(f"answer_types[{i}] is {kind!r}; expected one of {ANSWER_TYPES}")
            index = ANSWER_TYPES.index(kind)
            self.score_sum[index] += score
            self.total[index] += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {f"accuracy_{kind.replace('/', '_')}": self.score_sum[i] / self.total[i]
                for i, kind in enumerate(ANSWER_TYPES) if self.total[i] > 0}
