"""Record sources: where a task's raw records come from.

A source is indexed, so that training is deterministic, shardable and resumable: the
datamodule asks for record ``index`` of a split and never depends on iteration order.
Every source here implements this protocol (``ofa_lightning.task.RecordSource``)::

    record(split, index) -> Mapping   random access; IndexError past the end of a finite split
    size(split) -> int | None         number of records; None = endless (ShapesWorld train)
    texts(limit) -> Iterable[str]     every string of the first ``limit`` training records,
                                      to train a tokenizer on
    describe() -> str                 for messages: "ShapesWorld(seed=0, kind=vqa)", "data"
    records(split) -> Iterator        convenience: record(split, 0), record(split, 1), ...
    locate(split, index) -> str       optional: where a record lives, for error messages
                                      ("data/val.jsonl:17"); the datamodule prefixes every
                                      RecordError of a record with it

A record is a plain mapping with an ``id`` and the fields of its task's schema:

    caption            {id, image, captions: list[str], objects: list[str] (optional: the
                       object words a negative caption may swap, OFA's gt_objects)}
    vqa                {id, image, question, answers: {answer: score}}
    visual_grounding   {id, image, text, box: [x0, y0, x1, y1] in pixels of the original image}
    detection          {id, image, objects: [{box: [x0, y0, x1, y1], label: str}, ...]}
    grounded_vqa       {id, image, question, box, answers: {answer: score}} (a question about
                       the region the box marks: "what colour is the region?")
    text               {id, text}             (pure text: text infilling)
    image              {id, image}            (pure image: image infilling, tokenizers)

``image`` is anything :func:`ofa_lightning.task.open_image` reads: a PIL image, a file path
or encoded bytes. Sources only fetch and check what they own (the file, the line, the JSON,
the image path); the task checks its own fields when it builds the sample.

Sources here: :class:`ShapesWorldSource` (the built-in procedural world, nothing to
download), :class:`JsonlSource` (one JSON object per line, images in a folder) and
:class:`MemorySource` (records given in Python, for notebooks and tests).
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from array import array
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from datamodules.shapes_world import NUMBER_WORDS, SIZES, SPLITS, Scene, ShapesWorld, describe
from ofa_lightning.task import RecordError

__all__ = ["IndexedSource", "ShapesWorldSource", "JsonlSource", "MemorySource",
           "record_texts", "locate", "SHAPES_WORLD_KINDS", "REGION_QUESTIONS"]

SHAPES_WORLD_KINDS = ("caption", "vqa", "visual_grounding", "detection", "text", "image",
                      "grounded_vqa")
# the questions of a grounded_vqa record, and the object attribute each one asks for
REGION_QUESTIONS = {"what colour is the region?": "colour", "what shape is the region?": "shape",
                    "what size is the region?": "size"}
# fields that hold no text of the record (never fed to the tokenizer)
_NON_TEXT_FIELDS = frozenset({"id", "image", "box"})


def record_texts(record: Mapping[str, Any]) -> Iterator[str]:
    """Every string of a record but its id and image: strings, strings inside lists and
    nested mappings, and the keys that carry a number (the answers of ``{answer: score}``;
    a field name such as ``label`` of ``{box, label}`` is not text)."""
    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, (int, float)):
                    yield from walk(key)
                else:
                    yield from walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from walk(item)

    for name, value in record.items():
        if name not in _NON_TEXT_FIELDS:
            yield from walk(value)


def locate(source: Any, split: str, index: int) -> str:
    """Where record ``index`` of ``split`` lives, for messages; works for any source."""
    if hasattr(source, "locate"):
        return source.locate(split, index)
    return f"{source.describe()} {split} record {index}"


class IndexedSource(ABC):
    """Base class of the sources here: subclasses implement ``record``, ``size`` and
    ``describe``; ``records``, ``texts`` and ``locate`` follow from them."""

    @abstractmethod
    def record(self, split: str, index: int) -> Mapping[str, Any]:
        """Record ``index`` of ``split``; IndexError when a finite split has no such record."""

    @abstractmethod
    def size(self, split: str) -> int | None:
        """Number of records of ``split``; None when it is endless."""

    @abstractmethod
    def describe(self) -> str:
        """A short name for messages."""

    def records(self, split: str) -> Iterable[Mapping[str, Any]]:
        """Every record of ``split`` in index order (without end for an endless split)."""
        size = self.size(split)
        index = 0
        while size is None or index < size:
            yield self.record(split, index)
            index += 1

    def texts(self, limit: int) -> Iterable[str]:
        """Every string of the first ``limit`` training records (fewer if the split is shorter)."""
        size = self.size("train")
        for index in range(limit if size is None else min(limit, size)):
            yield from record_texts(self.record("train", index))

    def locate(self, split: str, index: int) -> str:
        return f"{self.describe()} {split} record {index}"

    def __repr__(self) -> str:
        return self.describe()


def _check_index(source: IndexedSource, split: str, index: int) -> None:
    size = source.size(split)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0 \
            or (size is not None and index >= size):
        bound = "an int >= 0" if size is None else f"an int in [0, {size})"
        raise IndexError(f"{source.describe()}: {split} record index must be {bound}, got {index!r}")


# ---------------------------------------------------------------------------- ShapesWorld
class ShapesWorldSource(IndexedSource):
    """Records of one task drawn from :class:`ShapesWorld` scenes; nothing to download.

    Record ``index`` of a split shows scene ``index // records_per_scene``. The scene's
    questions (vqa) or referring expressions (visual_grounding) are put in an order drawn
    from ``(seed, kind, split, scene)``, and the ``records_per_scene`` records of one scene
    take the first ones of that order (cycling when a scene has fewer), so they differ.
    Caption records carry all reference captions of their scene and its shape names (the
    words an image-text-matching negative swaps); detection records every object, left to
    right, labelled ``"large red circle"``; text records some of the scene's true sentences
    as one text; image records the image alone.

    The train split is endless; val and test hold ``val_size`` / ``test_size`` records,
    drawn from their own scene streams, so they never show a training scene.

    Args:
        kind: one of ``SHAPES_WORLD_KINDS``: the record schema (see the module docstring).
        seed: the world's seed; two sources with the same arguments give the same records.
        image_size: side of the rendered images in pixels (the task resizes them again).
        val_size, test_size: records in the held-out splits.
        min_objects, max_objects: objects per scene.
        records_per_scene: records drawn from each scene.
        pixel_noise: amplitude of per-pixel noise (0 = flat colours), see ShapesWorld.
        max_text_words: word budget of a text record (whole sentences, at least one).
    """

    def __init__(self, kind: str, seed: int = 0, image_size: int = 64, val_size: int = 200,
                 test_size: int = 200, min_objects: int = 1, max_objects: int = 4,
                 records_per_scene: int = 1, pixel_noise: int = 0,
                 max_text_words: int = 32) -> None:
        if kind not in SHAPES_WORLD_KINDS:
            raise ValueError(f"ShapesWorldSource: unknown kind {kind!r}; choose one of "
                             f"{', '.join(SHAPES_WORLD_KINDS)}")
        for name, value in (("val_size", val_size), ("test_size", test_size)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ShapesWorldSource: {name} must be an int >= 0, got {value!r}")
        if not isinstance(records_per_scene, int) or records_per_scene < 1:
            raise ValueError(f"ShapesWorldSource: records_per_scene must be an int >= 1, "
                             f"got {records_per_scene!r}")
        self.kind = kind
        self.seed = seed
        self.max_text_words = max_text_words
        self.records_per_scene = records_per_scene
        self.world = ShapesWorld(seed=seed, image_size=image_size, min_objects=min_objects,
                                 max_objects=max_objects, pixel_noise=pixel_noise)
        self._sizes = {"train": None, "val": val_size, "test": test_size}
        self._cache: tuple[tuple[str, int], Scene] | None = None  # the last scene drawn

    def describe(self) -> str:
        return f"ShapesWorld(seed={self.seed}, kind={self.kind})"

    def size(self, split: str) -> int | None:
        if split not in self._sizes:
            raise ValueError(f"{self.describe()}: unknown split {split!r}; "
                             f"splits: {', '.join(SPLITS)}")
        return self._sizes[split]

    def record(self, split: str, index: int) -> Mapping[str, Any]:
        _check_index(self, split, index)
        scene_index, slot = divmod(index, self.records_per_scene)
        scene = self._scene(split, scene_index)
        record: dict[str, Any] = {"id": f"shapes-{self.kind}-{split}-{index}", "image": scene.image}
        if self.kind == "caption":
            record["captions"] = list(scene.captions)
            record["objects"] = list(dict.fromkeys(o.shape for o in scene.objects))
            return record
        if self.kind == "detection":
            record["objects"] = [{"box": list(o.box), "label": describe(o)} for o in scene.objects]
            return record
        if self.kind == "text":
            return {"id": record["id"], "text": self._text(scene, split, scene_index)}
        if self.kind == "image":
            return record
        items = {"vqa": scene.questions, "visual_grounding": scene.referring,
                 "grounded_vqa": _region_questions(scene)}[self.kind]
        order = random.Random(f"shapes-source/{self.seed}/{self.kind}/{split}/{scene_index}"
                              ).sample(range(len(items)), len(items))
        text, answer = items[order[slot % len(items)]]
        if self.kind == "vqa":
            record.update(question=text, answers={answer: 1.0})
        elif self.kind == "grounded_vqa":
            box, attribute = answer
            record.update(question=text, box=box, answers={attribute: 1.0})
        else:
            record.update(text=text, box=list(answer))
        return record

    def _text(self, scene: Scene, split: str, scene_index: int) -> str:
        """The scene's sentences in a seeded order, as many as fit in ``max_text_words``
        (at least one): short texts keep mixed batches from padding to a paragraph."""
        sentences = random.Random(f"shapes-source/{self.seed}/text/{split}/{scene_index}"
                                  ).sample(scene.sentences, len(scene.sentences))
        chosen, words = [], 0
        for sentence in sentences:
            words += len(sentence.split())
            if chosen and words > self.max_text_words:
                break
            chosen.append(sentence)
        return " ".join(chosen)

    def answer_candidates(self) -> list[str]:
        """Every answer a question of this world can have (the closed answer set of VQA)."""
        world = self.world
        answers = [*NUMBER_WORDS[:world.max_objects + 1], "yes", "no", *world.colours,
                   *world.shapes, *SIZES]
        return list(dict.fromkeys(answers))

    def _scene(self, split: str, scene_index: int) -> Scene:
        key = (split, scene_index)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.world.scene(scene_index, split))
        return self._cache[1]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers need no cached scene
        return {**self.__dict__, "_cache": None}


def _region_questions(scene: Scene) -> list[tuple[str, tuple[list[int], str]]]:
    """(question, (box, answer)) for every object of the scene and every region question."""
    return [(question, (list(obj.box), getattr(obj, attribute)))
            for obj in scene.objects for question, attribute in REGION_QUESTIONS.items()]


# ---------------------------------------------------------------------------- JSON lines
class JsonlSource(IndexedSource):
    """One JSON object per line, one file per split, images as files in a folder.

    ``path`` is a directory holding ``train.jsonl``, ``val.jsonl`` and ``test.jsonl``;
    ``splits`` names other files (``{"train": "coco_train.jsonl", "val": "/abs/val.jsonl"}``,
    relative to ``path``). Each line is an object with the task's fields; ``image`` is a
    path relative to ``image_root`` (default: ``path``) or absolute; ``id`` defaults to
    ``<file>:<line>``. Blank lines are skipped (line numbers still count them).

    Random access reads one line through a byte-offset index built on first use of a split.
    Errors name the file, the line and the field: ``data/val.jsonl:17: invalid JSON ...``,
    ``data/val.jsonl:18: field 'image': data/img/3.png does not exist ...``.
    """

    DEFAULT_SPLITS = ("train", "val", "test")

    def __init__(self, path: str, image_root: str | None = None,
                 splits: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        if self.path.is_file():
            raise ValueError(f"JsonlSource: path={str(path)!r} is a file; give the directory "
                             f"that holds the split files, and name the files with "
                             f"splits={{'train': {self.path.name!r}, ...}}")
        self.image_root = Path(image_root) if image_root is not None else self.path
        names = splits if splits is not None else {s: f"{s}.jsonl" for s in self.DEFAULT_SPLITS}
        self.files = {split: self.path / name for split, name in names.items()}
        self._index: dict[str, tuple[array, array]] = {}  # split -> (byte offsets, line numbers)

    def describe(self) -> str:
        return str(self.path)

    def file(self, split: str) -> Path:
        if split not in self.files:
            known = ", ".join(f"{s} -> {f}" for s, f in self.files.items())
            raise ValueError(f"JsonlSource({self.path}): no file for split {split!r}; it has "
                             f"{known or 'none'} (add it to splits=...)")
        return self.files[split]

    def size(self, split: str) -> int | None:
        return len(self._lines(split)[0])

    def locate(self, split: str, index: int) -> str:
        try:
            return f"{self.file(split)}:{self._lines(split)[1][index]}"
        except (IndexError, ValueError, FileNotFoundError):
            return f"{self.describe()} {split} record {index}"

    def record(self, split: str, index: int) -> Mapping[str, Any]:
        _check_index(self, split, index)
        offsets, line_numbers = self._lines(split)
        path, line = self.file(split), line_numbers[index]
        with path.open("rb") as handle:
            handle.seek(offsets[index])
            raw = handle.readline()
        where = f"{path}:{line}"
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as error:
            raise RecordError(f"{where}: not UTF-8 text ({error.reason} at byte "
                              f"{error.start})") from None
        except json.JSONDecodeError as error:
            raise RecordError(f"{where}: invalid JSON ({error.msg} at column {error.colno}); "
                              f"each line must hold one JSON object") from None
        if not isinstance(record, dict):
            raise RecordError(f"{where}: expected a JSON object, found a JSON "
                              f"{type(record).__name__}")
        record.setdefault("id", f"{path.name}:{line}")
        if "image" in record:
            record["image"] = str(self._image_path(record["image"], where))
        return record

    def _image_path(self, value: Any, where: str) -> Path:
        if not isinstance(value, str) or not value:
            raise RecordError(f"{where}: field 'image': expected a file path (a string, relative "
                              f"to image_root={str(self.image_root)!r}), found {value!r}")
        image = Path(value)
        image = image if image.is_absolute() else self.image_root / image
        if not image.is_file():
            raise RecordError(f"{where}: field 'image': {image} does not exist (relative paths "
                              f"are read from image_root={str(self.image_root)!r})")
        return image

    def _lines(self, split: str) -> tuple[array, array]:
        if split not in self._index:
            path = self.file(split)
            if not path.is_file():
                raise FileNotFoundError(f"JsonlSource({self.path}): split {split!r} needs "
                                        f"{path}, which does not exist")
            offsets, numbers = array("q"), array("q")
            offset = 0
            with path.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if raw.strip():
                        offsets.append(offset)
                        numbers.append(number)
                    offset += len(raw)
            self._index[split] = (offsets, numbers)
        return self._index[split]


# ---------------------------------------------------------------------------- in memory
class MemorySource(IndexedSource):
    """Records given in Python: ``MemorySource({"train": [...], "val": [...]})``.

    Records are returned as they are (no copy). ``name`` is used in messages.
    """

    def __init__(self, splits: Mapping[str, Sequence[Mapping[str, Any]]],
                 name: str = "memory") -> None:
        self.splits = {split: list(records) for split, records in splits.items()}
        self.name = name

    def describe(self) -> str:
        return f"MemorySource({self.name})"

    def size(self, split: str) -> int | None:
        if split not in self.splits:
            raise ValueError(f"{self.describe()}: no split {split!r}; it has "
                             f"{', '.join(self.splits) or 'none'}")
        return len(self.splits[split])

    def record(self, split: str, index: int) -> Mapping[str, Any]:
        _check_index(self, split, index)
        return self.splits[split][index]

    def texts(self, limit: int) -> Iterable[str]:
        if "train" not in self.splits:
            return iter(())
        return super().texts(limit)
