"""Helpers shared by the pretraining task plugins (image-text matching, grounded captioning,
text infilling): randomness that is reproducible in training *and* evaluation, the official
negative-sample recipes, yes/no answering, regions as bin tokens.

Randomness. In training the datamodule seeds Python's ``random`` and torch's default
generator per sample (``datamodules.multitask._seeded_global_rngs``), so tasks draw from
those. Evaluation datasets are not seeded that way, and an evaluation set must be the same
on every run, so there a task draws from a generator seeded by the record's id:
:func:`record_rng` and :func:`record_generator` hide the difference.

Negatives follow ``data/pretrain_data/unify_dataset.py`` (``reference/ofa_spec.md`` §4.1):
a caption's negative swaps one of its objects for another object word (p = 0.4, when the
record names its objects) or is another record's caption; an answer's negative is another
answer of the same type ("how many": the count plus or minus one, half the time).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import torch
from torchmetrics import Metric

from ofa_lightning.data import Batch
from ofa_lightning.generation import Trie, score_candidates
from ofa_lightning.metrics.classification import LabelAccuracy
from ofa_lightning.task import RecordError, SampleContext, Task, require_fields
from ofa_lightning.vocab import UnifiedVocab
from tasks._text import box_bins, decoder_prompts, image_box, load_image, where

__all__ = [
    "RandomLike", "record_rng", "record_generator", "string_list", "check_window",
    "YES", "NO", "MATCH_LABELS", "draw_positive", "yes_no_tokens", "yes_no_trie",
    "predict_yes_no", "YesNoMatching",
    "object_pattern", "swap_object", "caption_list", "caption_from_source", "negative_caption",
    "answer_type_table", "shift_count", "negative_answer",
    "load_region", "parse_box",
]

YES, NO = "yes", "no"
MATCH_LABELS = (YES, NO)  # the answers of the matching tasks, " yes" / " no" as targets
# Official caption negatives: swap an object when random() > SWAP_THRESHOLD, else another caption.
SWAP_THRESHOLD = 0.6
# Tries at finding another record's caption that is not one of this record's captions.
NEGATIVE_TRIES = 16


class RandomLike(Protocol):
    """What the helpers draw from: the ``random`` module itself or a ``random.Random``."""

    def random(self) -> float: ...

    def choice(self, seq: Sequence[Any]) -> Any: ...

    def randrange(self, stop: int) -> int: ...


# ---------------------------------------------------------------------- randomness
def _record_key(task: Task, record: Mapping[str, Any], fallback: str) -> str:
    rid = record.get("id")
    return f"{task.name}/{rid if rid is not None else fallback}"


def record_rng(task: Task, record: Mapping[str, Any], train: bool,
               fallback: str = "") -> RandomLike:
    """Training: the (per-sample seeded) global ``random``. Evaluation: a generator seeded
    by task name and record id (``fallback``, e.g. the text, when the record has no id), so
    evaluation samples, and the positive/negative split, are the same on every run."""
    if train:
        return random
    return random.Random(_record_key(task, record, fallback))


def record_generator(task: Task, record: Mapping[str, Any], train: bool,
                     fallback: str = "") -> torch.Generator | None:
    """The torch counterpart of :func:`record_rng`: None (torch's seeded default generator)
    in training, a generator seeded from the record's id in evaluation."""
    if train:
        return None
    seed = random.Random(_record_key(task, record, fallback)).getrandbits(63)
    return torch.Generator().manual_seed(seed)


def string_list(owner: str, name: str, value: Sequence[str] | str | Path) -> list[str]:
    """An init arg that lists strings, given inline or as a UTF-8 file of one per line (the
    official ``object.txt`` / ``all_captions.txt``): stripped, blank lines dropped,
    de-duplicated in order."""
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{owner}: {name}={str(value)!r} is not a file; give a list of "
                             f"strings or a text file with one per line")
        value = path.read_text(encoding="utf-8").splitlines()
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{owner}: {name} must hold strings; found {bad[0]!r}")
    items = list(dict.fromkeys(v.strip() for v in value if v.strip()))
    if not items:
        raise ValueError(f"{owner}: {name} is empty")
    return items


def check_window(owner: str, value: int) -> int:
    """Init-arg check for a window of record indices."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: negative_window must be a positive integer (a number of "
                         f"training records), got {value!r}")
    return value


# ---------------------------------------------------------------------- yes / no
def draw_positive(rng: RandomLike) -> bool:
    """The official pairing: a positive with p = 0.5, else a negative."""
    return rng.random() >= 0.5


def yes_no_tokens(vocab: UnifiedVocab) -> list[list[int]]:
    """Token ids of ``" yes"`` and ``" no"`` (the targets), in :data:`MATCH_LABELS` order."""
    return [vocab.encode(f" {label}") for label in MATCH_LABELS]


def yes_no_trie(vocab: UnifiedVocab) -> Trie:
    """Decoding constraint: the output is one of the two answers."""
    return Trie(yes_no_tokens(vocab), eos=vocab.eos)


@torch.no_grad()
def predict_yes_no(model: torch.nn.Module, batch: Batch, vocab: UnifiedVocab,
                   prompts: Sequence[torch.Tensor] | None = None) -> list[str]:
    """The likelier of " yes" and " no" per sample, each scored as the sum of its tokens'
    and eos' log-probabilities under the trie mask (after the decoder ``prompts``, if any):
    the all-candidate evaluation the official code runs for its yes/no/maybe task (SNLI-VE).
    For single-token answers it equals greedy decoding under the trie; for split ones it is
    exact where greedy is not."""
    scores = score_candidates(model, batch.src_tokens, yes_no_tokens(vocab), batch.patch_images,
                              batch.patch_masks, trie=yes_no_trie(vocab),
                              prefix_tokens=prompts)  # (B, 2)
    return [MATCH_LABELS[i] for i in scores.argmax(1).tolist()]


class YesNoMatching:
    """Decoding and scoring of the two image-text-matching tasks, whose answer is " yes" or
    " no" and whose sample meta holds the true ``label``: mixed into their Task classes,
    which set ``prompt_type`` (``"none"`` or ``"prev_output"``, as VQA's)."""

    prompt_type: str

    def constraints(self, vocab: UnifiedVocab) -> dict[str, Any]:
        return {"trie": yes_no_trie(vocab)}

    def predict(self, model: torch.nn.Module, batch: Batch, vocab: UnifiedVocab) -> list[str]:
        return predict_yes_no(model, batch, vocab,
                              decoder_prompts(self.prompt_type, batch, vocab.pad))

    def metrics(self) -> dict[str, Metric]:
        return {"accuracy": LabelAccuracy(MATCH_LABELS)}

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        metrics["accuracy"].update([str(p) for p in predictions], [m["label"] for m in metas])


# ---------------------------------------------------------------------- caption negatives
def object_pattern(word: str) -> re.Pattern[str]:
    """An object word as a whole word, its plural ("-s"/"-es") included, so "circle" also
    swaps inside "two circles". (The official code replaces the bare substring, which also
    hits "cat" inside "category".)"""
    return re.compile(rf"\b{re.escape(word)}(?=(?:e?s)?\b)")


def swap_object(caption: str, objects: Sequence[str], vocabulary: Sequence[str],
                rng: RandomLike) -> str | None:
    """``caption`` with every occurrence of one of its ``objects`` replaced by a word of
    ``vocabulary`` that is none of the record's objects (so the claim is false), or None
    when no object occurs in the caption or no other word exists."""
    present = [o for o in objects if object_pattern(o).search(caption)]
    own = set(objects)
    others = [w for w in vocabulary if w not in own]
    if not present or not others:
        return None
    return object_pattern(rng.choice(present)).sub(rng.choice(others), caption)


def caption_list(value: Any) -> list[str] | None:
    """A record's ``captions`` as a list of non-blank strings, or None when they are not."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Sequence) and value and all(
            isinstance(c, str) and c.strip() for c in value):
        return list(value)
    return None


def caption_from_source(task: Task, rng: RandomLike, window: int) -> str | None:
    """One caption of a random record among the first ``window`` of the source's training
    split (the whole split when it is shorter); None when that record has no usable caption.

    The window bounds the draw because a source may be endless (ShapesWorld's train split);
    it plays the part of the official ``all_captions.txt``, a fixed pool of captions.
    """
    source = task.source
    if source is None:
        raise ValueError(f"task {task.name!r} draws negative captions from its source's train "
                         f"split, but it has no source; give it one or pass negative_captions")
    try:
        size = source.size("train")
    except ValueError as error:
        raise ValueError(f"task {task.name!r} draws negative captions from the train split of "
                         f"{source.describe()}, which has none ({error}); pass "
                         f"negative_captions (a list or a file of captions)") from None
    limit = window if size is None else min(size, window)
    if limit == 0:
        raise ValueError(f"task {task.name!r}: the train split of {source.describe()} is "
                         f"empty, so it has no captions to draw negatives from; pass "
                         f"negative_captions")
    try:
        record = source.record("train", rng.randrange(limit))
    except RecordError:
        return None
    captions = caption_list(record.get("captions"))
    return rng.choice(captions) if captions else None


def negative_caption(caption: str, references: Collection[str], objects: Sequence[str],
                     vocabulary: Sequence[str], draw_caption: Callable[[RandomLike], str | None],
                     normalise: Callable[[str], str], rng: RandomLike) -> str | None:
    """A caption that does not describe the image: with p = 0.4, when the record names its
    objects, ``caption`` with one object swapped (:func:`swap_object`); otherwise (or when
    no swap applies) another caption from ``draw_caption``, redrawn while it normalises to
    one of ``references`` (the record's own captions, normalised). None when
    :data:`NEGATIVE_TRIES` draws all fail."""
    if objects and rng.random() > SWAP_THRESHOLD:
        swapped = swap_object(caption, objects, vocabulary, rng)
        if swapped is not None and normalise(swapped) not in references:
            return swapped
    for _ in range(NEGATIVE_TRIES):
        drawn = draw_caption(rng)
        if drawn is not None and normalise(drawn) and normalise(drawn) not in references:
            return drawn
    return None


# ---------------------------------------------------------------------- answer negatives
def answer_type_table(owner: str, answer_types: Mapping[str, Sequence[str]] | str | Path
                      ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``type -> answers`` (a mapping, or the official ``type2ans.json``) checked, and the
    inverse ``answer -> type`` (an answer listed under two types keeps the first)."""
    if isinstance(answer_types, (str, Path)):
        path = Path(answer_types)
        if not path.is_file():
            raise ValueError(f"{owner}: answer_types={str(answer_types)!r} is not a file; give "
                             f"a mapping type -> answers or a JSON file of one")
        try:
            answer_types = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{owner}: answer_types file {path} is not valid JSON "
                             f"({error})") from None
    if not isinstance(answer_types, Mapping) or not answer_types:
        raise ValueError(f"{owner}: answer_types must be a non-empty mapping type -> list of "
                         f"answers, got {answer_types!r}")
    table = {str(kind): string_list(owner, f"answer_types[{kind!r}]", answers)
             for kind, answers in answer_types.items()}
    inverse: dict[str, str] = {}
    for kind, answers in table.items():
        for answer in answers:
            inverse.setdefault(answer, kind)
    return table, inverse


def shift_count(answer: str, number_words: Sequence[str], rng: RandomLike) -> str | None:
    """A count answer plus or minus one (zero becomes one), written as it was: digits stay
    digits, number words stay words; None when ``answer`` is not a count."""
    if answer.isdigit():
        n = int(answer)
        return "1" if n == 0 else str(n + rng.choice((-1, 1)))
    if answer in number_words:
        i = list(number_words).index(answer)
        step = rng.choice((-1, 1))
        j = i + step if 0 <= i + step < len(number_words) else i - step
        return number_words[j] if 0 <= j < len(number_words) else None
    return None


def negative_answer(answer: str, confidence: float, references: Collection[str],
                    answer_types: Mapping[str, Sequence[str]], answer_type: Mapping[str, str],
                    number_words: Sequence[str], rng: RandomLike) -> str | None:
    """The official recipe: with ``p = random()``, when ``confidence > p + 0.1`` and the
    answer has a type, a count answer is shifted by one if ``p > 0.5``, else another answer
    of its type is drawn; otherwise another answer of type ``"other"`` (all answers of all
    types when there is no ``"other"``). Unlike the official code, no negative is one of
    ``references`` (the record's answers: with soft scores a second answer may be right
    too). None when no answer is left to draw."""
    p = rng.random()
    kind = answer_type.get(answer)
    if kind is not None and confidence > p + 0.1:
        if kind == "how many" and p > 0.5:
            shifted = shift_count(answer, number_words, rng)
            if shifted is not None and shifted not in references:
                return shifted
        pool = [a for a in answer_types[kind] if a not in references]
        if pool:
            return rng.choice(pool)
    fallback = answer_types.get("other") or [a for answers in answer_types.values()
                                             for a in answers]
    pool = [a for a in dict.fromkeys(fallback) if a not in references]
    return rng.choice(pool) if pool else None


# ---------------------------------------------------------------------- regions
def load_region(task: Task, record: Mapping[str, Any], context: SampleContext
                ) -> tuple[torch.Tensor, list[float], list[int], dict[str, Any]]:
    """A record's image and ``box`` as the model sees them: the image tensor, the box in
    original pixels, its four ``<bin>`` ids and the meta that maps bins back to pixels.

    The box is resized with the image and quantised with ``max_image_size =
    context.image_size``, exactly as ``VisualGroundingTask`` builds its targets, so a
    region named by the grounding task reads the same as a region given here. (Official
    pretraining crops 384 px around the object first, ObjectCenterCrop; that augmentation
    is not reproduced.)"""
    require_fields(record, ("image", "box"), task.name, where(task))
    image, ratios, (width, height) = load_image(task, record, context)
    box = image_box(task, record, "box", record["box"], (width, height))
    bins = box_bins(box, ratios, context)
    meta = {"id": record.get("id"), "box": box, "ratios": ratios, "image_size": (width, height),
            "max_image_size": context.image_size}
    return image, box, bins, meta


def parse_box(task_name: str, text: str | None) -> list[float]:
    """A box typed by a user (``--text "10,20,110,90"``, commas or spaces) as 4 floats."""
    parts = (text or "").replace(",", " ").split()
    try:
        box = [float(p) for p in parts]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(f"task {task_name!r} needs --text with the region as 'x0,y0,x1,y1' "
                         f"(pixels of the image), got {text!r}")
    return box
