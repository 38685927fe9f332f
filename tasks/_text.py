"""Helpers shared by the task plugins: OFA's text normalisers and record checks.

Plugins share code through these functions, not through a chain of base classes. The two
normalisers are the official ``pre_caption`` / ``pre_question`` (``data/ofa_dataset.py``),
word for word: ``reference/ofa_spec.md`` §4.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Literal, Mapping, Sequence

import torch
from torchmetrics import Metric

from ofa_lightning.data import Batch
from ofa_lightning.location import box_to_tokens, resize_box
from ofa_lightning.metrics import CAPTION_METRICS, CaptionMetrics, java_available
from ofa_lightning.task import (RecordError, SampleContext, Task, image_to_tensor, open_image,
                                record_id)

__all__ = ["pre_caption", "pre_question", "truncate_words", "where", "load_image", "field_error",
           "text_field", "check_max_words", "finite_numbers", "image_box", "box_bins", "answer_scores", "TOKENIZERS", "check_scorers",
           "caption_metrics"]

_LEADING_PUNCTUATION = ",.!?*#:;~"
_RUNS_OF_WHITESPACE = re.compile(r"\s{2,}")


def truncate_words(text: str, max_words: int) -> str:
    """The first ``max_words`` space-separated words of ``text``."""
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def _normalise(text: str, max_words: int, person: bool) -> str:
    text = text.lower().lstrip(_LEADING_PUNCTUATION).replace("-", " ").replace("/", " ")
    if person:
        text = text.replace("<person>", "person")
    text = _RUNS_OF_WHITESPACE.sub(" ", text).rstrip("\n").strip(" ")
    return truncate_words(text, max_words)


def pre_caption(caption: str, max_words: int) -> str:
    """OFA's caption normaliser: lowercase; strip leading ``,.!?*#:;~``; ``-`` and ``/``
    become spaces; ``<person>`` becomes ``person``; runs of whitespace collapse to one space;
    at most ``max_words`` words. Punctuation inside the text stays."""
    return _normalise(caption, max_words, person=True)


def pre_question(question: str, max_words: int) -> str:
    """OFA's question normaliser: :func:`pre_caption` without the ``<person>`` rule."""
    return _normalise(question, max_words, person=False)


def check_max_words(owner: str, name: str, value: int) -> int:
    """Init-arg check for a word budget (``max_source_length`` / ``max_target_length``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer (a number of words), "
                         f"got {value!r}")
    return value


# ---------------------------------------------------------------------- record checks
def where(task: Task) -> str:
    """Where a task's records come from, for error messages: the source's own description,
    else the task's name."""
    describe = getattr(task.source, "describe", None)
    return describe() if callable(describe) else f"task {task.name!r}"


def field_error(task: Task, record: Mapping[str, Any], field: str, problem: str) -> RecordError:
    """A RecordError naming the source, the record id and the field."""
    return RecordError(f"{where(task)}: record {record_id(record)!r} field {field!r} {problem}")


def text_field(task: Task, record: Mapping[str, Any], field: str) -> str:
    """A record's text field, checked to be a non-blank string."""
    value = record[field]
    if not isinstance(value, str):
        raise field_error(task, record, field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise field_error(task, record, field, "is empty")
    return value


def load_image(task: Task, record: Mapping[str, Any], context: SampleContext
               ) -> tuple[torch.Tensor, tuple[float, float], tuple[int, int]]:
    """The record's image as the model sees it (``context.image_size`` square), the (w, h)
    resize ratios and the original (width, height)."""
    image = open_image(record["image"], where(task), record_id(record))
    tensor, ratios = image_to_tensor(image, context.image_size)
    return tensor, ratios, image.size


def finite_numbers(task: Task, record: Mapping[str, Any], field: str, values: Any,
                   count: int | None = None) -> list[float]:
    """``values`` as a list of finite floats (``count`` of them when given)."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise field_error(task, record, field, f"must be a sequence of numbers, got {values!r}")
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise field_error(task, record, field, f"must hold numbers, got {list(values)!r}") from None
    if count is not None and len(numbers) != count:
        raise field_error(task, record, field, f"must hold {count} numbers, got {len(numbers)}: "
                          f"{numbers}")
    if not all(math.isfinite(v) for v in numbers):
        raise field_error(task, record, field, f"holds a non-finite number: {numbers}")
    return numbers


def image_box(task: Task, record: Mapping[str, Any], field: str, value: Any,
              image_size: tuple[int, int]) -> list[float]:
    """A box ``(x0, y0, x1, y1)`` in original-image pixels, checked to be finite, not
    degenerate and inside the ``(width, height)`` image."""
    box = finite_numbers(task, record, field, value, count=4)
    x0, y0, x1, y1 = box
    width, height = image_size
    if not (x0 < x1 and y0 < y1):
        raise field_error(task, record, field, f"{box} is degenerate or inverted; a box is "
                          f"(x0, y0, x1, y1) with x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise field_error(task, record, field, f"{box} reaches outside the {width}x{height} "
                          f"image; boxes are in pixels of the original image")
    return box


def box_bins(box: Sequence[float], ratios: tuple[float, float], context: SampleContext
             ) -> list[int]:
    """An original-pixel box as the four ``<bin>`` ids of the resized image (OFA's RefCOCO
    convention: scale by the resize ratios, quantise with max_image_size = image_size)."""
    resized = resize_box(box, *ratios)
    return box_to_tokens(resized, context.vocab, max_image_size=context.image_size).tolist()


def answer_scores(task: Task, record: Mapping[str, Any]) -> dict[str, float]:
    """A VQA record's ``answers`` as ``{answer: confidence}``: a mapping, a list (1.0 each)
    or one string; answers trimmed, confidences finite and >= 0."""
    answers = record["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if isinstance(answers, Mapping):
        pairs = list(answers.items())
    elif isinstance(answers, Sequence):
        pairs = [(a, 1.0) for a in answers]
    else:
        raise field_error(task, record, "answers", f"must be a dict answer -> confidence or a "
                          f"list of answers, got {type(answers).__name__}")
    scores: dict[str, float] = {}
    for answer, score in pairs:
        if not isinstance(answer, str) or not answer.strip():
            raise field_error(task, record, "answers",
                              f"must hold non-empty answer strings; found {answer!r}")
        try:
            value = float(score)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(score, bool) or not math.isfinite(value) or value < 0:
            raise field_error(task, record, "answers", f"gives answer {answer!r} the "
                              f"confidence {score!r}; confidences are numbers >= 0")
        scores[answer.strip()] = value
    if not scores:
        raise field_error(task, record, "answers", "is empty")
    return scores


TOKENIZERS = ("auto", "ptb", "simple")


def check_scorers(owner: str, scorers: Sequence[str] | str) -> tuple[str, ...]:
    scorers = (scorers,) if isinstance(scorers, str) else tuple(scorers)
    unknown = [s for s in scorers if s not in CAPTION_METRICS]
    if not scorers or unknown:
        raise ValueError(f"{owner}: scorers must be a non-empty choice from "
                         f"{list(CAPTION_METRICS)}, got {list(scorers)}")
    return scorers


def caption_metrics(owner: str, scorers: Sequence[str],
                    tokenizer: Literal["auto", "ptb", "simple"]) -> dict[str, Metric]:
    """Caption metrics as ``CaptionTask`` reports them; ``"auto"`` picks the official PTB
    tokenizer when Java is installed and warns when it falls back to the simple one."""
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "simple"
        if tokenizer == "simple":
            warnings.warn(f"{owner}: no `java` on PATH, so captions are scored with the "
                          f"Java-free 'simple' tokenizer; scores differ slightly from the "
                          f"official PTBTokenizer ones (install a JRE for those)", stacklevel=3)
    return {"captioning": CaptionMetrics(metrics=tuple(scorers), tokenizer=tokenizer)}


def check_choice(owner: str, field: str, value: Any, choices: Any) -> None:
    """Raise a ValueError naming the init argument, the value and the valid choices."""
    if value not in choices:
        raise ValueError(f"{owner}: {field} must be one of {list(choices)}, got {value!r}")


PROMPT_TYPES = ("none", "prev_output")


def prompted_generation(owner: str, prompt_type: str,
                        generation: Mapping[str, Any] | None) -> dict[str, Any]:
    """``generation`` with the length default a decoder prompt needs: under ``prev_output``
    the budget counts the prompt too, so ``max_len_a = 1.0`` lets the source length cover
    it (an explicit ``max_len_a`` still wins). Checks ``prompt_type`` first."""
    check_choice(owner, "prompt_type", prompt_type, PROMPT_TYPES)
    defaults = {"max_len_a": 1.0} if prompt_type == "prev_output" else {}
    return {**defaults, **(generation or {})}


def decoder_prompts(prompt_type: str, batch: Batch, pad_id: int) -> list[torch.Tensor] | None:
    """Per sample, the tokens decoding is forced to read after bos: the instruction under
    ``prev_output`` (the layout training used), None under ``none``."""
    return batch.source_prompts(pad_id) if prompt_type == "prev_output" else None
