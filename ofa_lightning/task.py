"""The Task contract every plugin in ``tasks/`` implements.

A task is data plus a little code: its instruction template (the official string), how a raw
record becomes a Sample, how generated tokens become a prediction, how it decodes
(beam/greedy settings and constraints) and which metrics judge it. Plugins are found by
class path (``class_path: tasks.caption.CaptionTask``) or through the entry-point group
``ofa_lightning.tasks``; there is no registry to fill.
"""

from __future__ import annotations

import io
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchmetrics import Metric

from ofa_lightning.data import Batch, Sample
from ofa_lightning.generation import GenerationConfig, generate
from ofa_lightning.vocab import UnifiedVocab


class RecordError(ValueError):
    """A data record a task cannot use; the message names the source, the record and the field."""


class RecordSource(Protocol):
    """Where a task's records come from (a dataset file, ShapesWorld, ...).

    Sources are indexed, so training is deterministic, shardable and resumable: the
    datamodule asks for record ``index`` of a split and never relies on iteration order.
    ``size("train")`` may be None (endless, e.g. ShapesWorld); evaluation splits are finite.
    Each record is a mapping with the fields the task's ``required_fields`` lists, plus an
    ``id``. ``texts(limit)`` gives every string of the first ``limit`` training records (a
    tokenizer is trained on them). ``records(split)`` iterates ``record(split, 0), ...``.

    Optional: ``locate(split, index) -> str`` says where a record lives
    (``"data/val.jsonl:17"``); the datamodule prefixes a record's errors with it.

    The CLI (jsonargparse) checks a source given by class path against these signatures
    exactly, annotations included: a plugin source copies them as they are written here.
    Implementations: ``datamodules.sources``.
    """

    def record(self, split: str, index: int) -> Mapping[str, Any]: ...

    def size(self, split: str) -> int | None: ...

    def texts(self, limit: int) -> Iterable[str]: ...

    def records(self, split: str) -> Iterable[Mapping[str, Any]]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class SampleContext:
    """What building a sample needs besides the record: shared by all tasks of a datamodule."""

    vocab: UnifiedVocab
    image_size: int  # images are resized to image_size x image_size (bicubic), as OFA does


def record_id(record: Mapping[str, Any]) -> str:
    return str(record.get("id", "<no id>"))


def require_fields(record: Mapping[str, Any], fields: Sequence[str], task: str,
                   where: str) -> None:
    missing = [f for f in fields if f not in record or record[f] is None]
    if missing:
        raise RecordError(f"{where}: record {record_id(record)!r} lacks field(s) {missing} "
                          f"that task {task!r} needs (fields present: {sorted(record)})")


def open_image(value: Any, where: str, rid: str) -> Image.Image:
    """A record's image as RGB: a PIL image, a path, or encoded bytes."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (str, Path)):
            image = Image.open(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            raise RecordError(f"{where}: record {rid!r} field 'image' is a {type(value).__name__}; "
                              f"expected a PIL image, a file path or encoded bytes")
        return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise RecordError(f"{where}: record {rid!r} image does not decode ({error})") from error


def image_to_tensor(image: Image.Image, size: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """Bicubic resize to a size x size square, then normalise with mean = std = 0.5 (OFA's
    default). Returns the tensor and the (w, h) resize ratios that map boxes back."""
    width, height = image.size
    resized = image.resize((size, size), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
    tensor = pixels.view(size, size, 3).permute(2, 0, 1).float().div_(255.0)
    return (tensor - 0.5) / 0.5, (size / width, size / height)


class Task(ABC):
    """Base class of task plugins. Subclasses set the class attributes and implement the
    abstract methods; everything else has a working default."""

    name: ClassVar[str]
    instruction: ClassVar[str]  # the official template; ``{}`` is filled from the record
    required_fields: ClassVar[tuple[str, ...]] = ()
    default_generation: ClassVar[dict[str, Any]] = {}
    # the record field a user's free text fills at predict time ("question", "text"), if any
    query_field: ClassVar[str | None] = None

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None) -> None:
        """``weight``: sampling weight in a multitask mixture. ``generation``: overrides of
        the task's decoding settings (GenerationConfig fields)."""
        if weight <= 0:
            raise ValueError(f"{type(self).__name__}: weight must be positive, got {weight}")
        self.source = source
        self.weight = weight
        self.generation = GenerationConfig().replace(**{**self.default_generation,
                                                        **(generation or {})})

    # --- what a plugin must provide -------------------------------------------------------
    @abstractmethod
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        """Record -> a Sample with source, image and meta but no target: what inference
        needs, so ``predict`` works on a bare image and text."""

    @abstractmethod
    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        """Record -> Sample. Raise RecordError naming the record and field when it is unusable."""


    @abstractmethod
    def metrics(self) -> dict[str, Metric]:
        """Fresh metric objects; keys are prefixes of the logged names."""

    @abstractmethod
    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        """Feed one batch of predictions and their samples' meta into ``metrics``."""

    # --- defaults -----------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor, vocab: UnifiedVocab, meta: Mapping[str, Any]) -> Any:
        """Generated tokens (1-D, ending in eos) -> the task's prediction (text, box, ...);
        by default the text they spell, without the leading space of OFA's targets."""
        return vocab.decode(tokens).strip()

    def visualize(self, image: Image.Image, prediction: Any) -> Image.Image | None:
        """The prediction drawn on the record's original image (a box, objects, an infilled
        region), or None when there is nothing to draw; ``ofa-lightning predict`` saves it."""
        return None

    def fill_instruction(self, *values: str) -> str:
        return self.instruction.format(*values)

    def query_fields(self, text: str | None) -> dict[str, Any]:
        """The record fields a user's text supplies at predict time."""
        if self.query_field is None:
            return {}
        if not text:
            raise ValueError(f"task {self.name!r} needs --text (its {self.query_field!r})")
        return {self.query_field: text}

    def constraints(self, vocab: UnifiedVocab) -> dict[str, Any]:
        """Extra generation arguments, e.g. ``{"trie": Trie(...)}``; none by default."""
        return {}

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: Batch, vocab: UnifiedVocab) -> list[Any]:
        """Decode one batch with this task's settings and return one prediction per sample."""
        hypotheses = generate(model, batch.src_tokens, batch.patch_images, batch.patch_masks,
                              config=self.generation, **self.constraints(vocab))
        return [self.decode(sample[0].tokens, vocab, meta)
                for sample, meta in zip(hypotheses, batch.meta)]

    def iter_samples(self, split: str, context: SampleContext, train: bool,
                     skip_bad_records: bool = False) -> Iterator[Sample]:
        """Samples from this task's source; bad records raise unless asked to skip (then
        they are reported through warnings, never dropped silently)."""
        if self.source is None:
            raise ValueError(f"task {self.name!r} has no source; give it one "
                             f"(init_args.source) to train or evaluate")
        for record in self.source.records(split):
            try:
                yield self.build_sample(record, context, train)
            except RecordError as error:
                if not skip_bad_records:
                    raise
                warnings.warn(f"skipped: {error}", stacklevel=2)

    def describe(self) -> dict[str, Any]:
        """For ``ofa-lightning tasks``: what this plugin is and does."""
        return {"name": self.name, "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "instruction": self.instruction, "metrics": sorted(self.metrics()),
                "fields": list(self.required_fields)}
