"""Callbacks for ``ofa-lightning`` runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, WeightAveraging


class JsonlPredictionWriter(BasePredictionWriter):
    """Write ``predict`` results, one JSON object per sample, to ``<output_dir>/predictions.jsonl``
    (``predictions.rank<r>.jsonl`` per process under DDP)."""

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule,
                           predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.jsonl" if trainer.world_size == 1 else \
            f"predictions.rank{trainer.global_rank}.jsonl"
        # one list of batches per dataloader when there are several, a flat list otherwise
        loaders = predictions if predictions and isinstance(predictions[0], list) and \
            predictions[0] and isinstance(predictions[0][0], list) else [predictions]
        with open(self.output_dir / name, "w") as out:
            for batches in loaders:
                for batch in batches:
                    for record in batch:
                        out.write(json.dumps(record) + "\n")


class EMAWeights(WeightAveraging):
    """An exponential moving average of the weights (OFA's ``--ema-alpha``), used for
    validation, written into checkpoints as their weights (the training weights travel
    beside them, so a resumed run continues both) and kept at the end of training.

    ``decay`` sets the horizon, about ``1 / (1 - decay)`` steps: the official 0.9999 suits
    runs of 10^5 steps; a 2,000-step CPU run needs about 0.99. Averaging starts after
    ``start_step`` optimizer steps, so the random initial weights never enter the average.
    """

    def __init__(self, decay: float = 0.9999, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMAWeights: decay must be in (0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"EMAWeights: start_step must be >= 0, got {start_step}")
        super().__init__(multi_avg_fn=_ema_update(decay))
        self.start_step = start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step


def _ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """In place, per group of one dtype: floats move ``1 - decay`` of the way to the model;
    integer buffers (position-bucket tables, BatchNorm's batch count) are copied, never
    blended: a blend rounded back to an integer could change an index."""
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _: Any) -> None:
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            torch._foreach_copy_(averaged, current)
    return update
