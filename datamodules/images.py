"""ImageDataModule: images alone from any record source, for training image tokenizers.

Every record only needs an ``image`` (``ShapesWorldSource(kind="image")``, a ``JsonlSource``
whose lines hold ``{"image": "a.png"}``, a ``MemorySource``...). Images are centre-cropped to
a square, resized to ``image_size`` and scaled to [-1, 1] as OFA's tokenizer expects.

The training stream follows the rules of ``datamodules.multitask``, without the task mixture:
global sample ``g`` is record ``g`` of an endless train split, or record ``permute(g mod N)``
(a fresh permutation each pass) of a finite one; rank ``r`` of ``W`` takes the ``r``-th block
of ``batch_size`` of every global batch, and DataLoader workers split the rank's batches, so the
stream does not depend on ``num_workers``. Its position travels in the checkpoint, so a resumed
run continues it.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from datamodules.multitask import StreamLoader, permute
from datamodules.sources import locate
from ofa_lightning.task import RecordError, RecordSource, image_to_tensor, open_image

__all__ = ["ImageDataModule", "ImageStream", "EvalImages", "record_image"]


def record_image(source: RecordSource, split: str, index: int, size: int) -> torch.Tensor:
    """Record ``index`` of ``split`` as a (3, size, size) tensor in [-1, 1]."""
    where = locate(source, split, index)
    record = source.record(split, index)
    if record.get("image") is None:
        raise RecordError(f"{where}: record {record.get('id', index)!r} has no 'image' field "
                          f"(fields present: {sorted(record)}); an image datamodule needs one")
    image = open_image(record["image"], where, str(record.get("id", index)))
    return image_to_tensor(_centre_square(image), size)[0]


def _centre_square(image: Image.Image) -> Image.Image:
    """The central square, so resizing keeps the aspect ratio (codes index a square grid)."""
    width, height = image.size
    side = min(width, height)
    if width == height:
        return image
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


class ImageStream(IterableDataset):
    """One rank's endless stream of training batches (B, 3, size, size); ``start`` (a global
    sample index) is set by the datamodule each time iteration begins."""

    def __init__(self, source: RecordSource, size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.source, self.size, self.batch_size = source, size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start = 0
        self.train_size = source.size("train")
        if self.train_size == 0:
            raise ValueError(f"{source.describe()}: the train split has no records")

    def record_index(self, g: int) -> int:
        if self.train_size is None:
            return g
        epoch, position = divmod(g, self.train_size)
        key = random.Random(f"{self.seed}/images/{epoch}").getrandbits(64)
        return permute(position, self.train_size, key)

    def batch(self, local_batch: int) -> torch.Tensor:
        first = self.start + (local_batch * self.world_size + self.rank) * self.batch_size
        return torch.stack([record_image(self.source, "train", self.record_index(g), self.size)
                            for g in range(first, first + self.batch_size)])

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        return map(self.batch, itertools.count(first, step))


class EvalImages(Dataset):
    """The first ``max_samples`` images of a finite split."""

    def __init__(self, source: RecordSource, split: str, size: int,
                 max_samples: int | None = None) -> None:
        total = source.size(split)
        if total is None:
            raise ValueError(f"{source.describe()}: the {split} split is endless; evaluation "
                             f"needs a finite split")
        self.source, self.split, self.size = source, split, size
        self.length = total if max_samples is None else min(total, max_samples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.length:
            raise IndexError(f"{self.split}: index {index} outside [0, {self.length})")
        return record_image(self.source, self.split, index, self.size)


class ImageDataModule(pl.LightningDataModule):
    """Batches of images (B, 3, image_size, image_size) in [-1, 1]: an endless training
    stream, and the first ``max_eval_samples`` images of val / test.

    Args:
        source: a record source whose records have an ``image``.
        image_size: side of the square images; a multiple of the tokenizer's factor.
        batch_size: training images per process and step.
        eval_batch_size: images per evaluation batch (default: batch_size).
        max_eval_samples: evaluate on at most this many images per split.
        num_workers, pin_memory: DataLoader settings (the stream is the same for any
            num_workers).
        seed: orders the passes over a finite train split.
    """

    def __init__(self, source: RecordSource, image_size: int = 64, batch_size: int = 32,
                 eval_batch_size: int | None = None, max_eval_samples: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False, seed: int = 0) -> None:
        super().__init__()
        for name, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                 ("eval_batch_size", eval_batch_size, 1),
                                 ("max_eval_samples", max_eval_samples, 1),
                                 ("num_workers", num_workers, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise ValueError(f"ImageDataModule: {name} must be an int >= {low}, "
                                 f"got {value!r}")
        self.source = source
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_eval_samples = max_eval_samples
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._resume_at: int | None = None  # a checkpoint's stream position, used once

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer \
            else (0, 1)
        stream = ImageStream(self.source, self.image_size, self.batch_size, self.seed, rank, world)
        return StreamLoader(stream, self._start_position, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def _eval_dataloader(self, split: str) -> DataLoader:
        dataset = EvalImages(self.source, split, self.image_size, self.max_eval_samples)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    # --- the stream position ------------------------------------------------------------------
    def samples_seen(self) -> int:
        """Global sample index reached after the trainer's optimizer steps so far."""
        trainer = self.trainer
        if trainer is None:
            return 0
        per_step = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        return trainer.global_step * per_step

    def _start_position(self) -> int:
        if self._resume_at is not None:
            start, self._resume_at = self._resume_at, None
            return start
        return self.samples_seen()

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples_seen(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_at = int(state["samples"])
