"""Callbacks for ``ofa-lightning`` runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


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
