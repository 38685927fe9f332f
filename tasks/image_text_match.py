"""Image-text matching, OFA's pretraining yes/no tasks: does a caption (or a question's
answer) fit the image? Two plugins, one per record kind: captions and VQA answers.

Targets are ``" yes"`` for the record's own text and ``" no"`` for a negative built by the
official recipes (``tasks/_pretrain.py``). In training each record gives a positive with
p = 0.5, else a negative, as in ``unify_dataset.py``; in evaluation the choice and the
negative are drawn from a generator seeded by the record's id, so a validation set is the
same on every run and balanced in expectation. Predictions are the likelier of the two
answers (all-candidate scoring under a trie); the metric is accuracy, with the accuracy
within each true label beside it.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

from datamodules.shapes_world import COLOURS, NUMBER_WORDS, SHAPES, SIZES
from ofa_lightning.data import Sample
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from tasks._pretrain import (NO, YES, YesNoMatching, answer_type_table, caption_from_source,
                             caption_list, check_window, draw_positive, negative_answer,
                             negative_caption, record_rng, string_list)
from tasks._text import (answer_scores, check_max_words, field_error, load_image, pre_caption,
                         pre_question, prompted_generation, text_field, where)

# The answer groups of ShapesWorld questions, in the layout of the official type2ans.json.
SHAPES_WORLD_ANSWER_TYPES: dict[str, tuple[str, ...]] = {
    "how many": NUMBER_WORDS,
    "yes/no": (YES, NO),
    "color": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
}
# A single " yes"/" no" is short; the budget only matters when decoding with generate().
MATCH_GENERATION = {"beam": 1, "max_len_a": 0.0, "max_len_b": 4, "min_len": 1}


def _match_sample(task: Task, record: Mapping[str, Any], context: SampleContext, text: str,
                  label: str, weight: float, meta: Mapping[str, Any]) -> Sample:
    """The yes/no sample both plugins build: the image, the filled instruction, the label,
    laid out for the task's ``prompt_type``."""
    image, _, _ = load_image(task, record, context)
    vocab = context.vocab
    sample = Sample.seq2seq(task.name, vocab, vocab.encode(text), vocab.encode(f" {label}"),
                            image=image, weight=weight,
                            meta={"id": record.get("id"), "label": label, **meta})
    return sample.with_source_prompt(vocab) if task.prompt_type == "prev_output" else sample


class ImageTextMatchTask(YesNoMatching, Task):
    """Does the caption describe the image? (OFA's ITM from caption rows.)

    Record schema: the caption records (``datamodules.sources``):

    - ``id``: names the record in errors; in evaluation it also seeds the positive/negative
      choice and the negative (records without one use their first caption instead).
    - ``image``: a PIL image, a file path or encoded image bytes.
    - ``captions``: the reference captions, a non-empty list of strings (or one string).
    - ``objects`` (optional): the object words that occur in the captions (OFA's
      ``gt_objects``), a list of strings; what a swapped negative replaces.

    Source: ``' does the image describe " {caption} "?'`` with the caption (a random one in
    training, the first in evaluation) after ``pre_caption`` (at most ``max_source_length``
    words). Target ``" yes"``, or ``" no"`` for a negative caption: with p = 0.4 when the
    record has ``objects``, the caption with one of them (and its plural) replaced by
    another word of ``objects``; otherwise the caption of another record. A negative never
    equals one of the record's own captions after normalisation. Loss weight 1.0.

    Args:
        objects: the object words a swap draws from (the official ``object.txt``): a list,
            or a text file with one per line. Default: ShapesWorld's shape names
            (``datamodules.shapes_world.SHAPES``), right for ShapesWorld records; give your
            dataset's object list for any other data.
        negative_captions: the captions other-caption negatives draw from (the official
            ``all_captions.txt``): a list or a file with one per line. Default: a caption of
            a random record among the first ``negative_window`` records of the source's
            train split (the whole split when shorter), read when needed.
        negative_window: see ``negative_captions``; bounds the draw because a source may be
            endless (ShapesWorld's train split).
        max_source_length: word budget of the caption (official 80).
        prompt_type: ``"none"``, the pretraining layout; ``"prev_output"``, the decoder
            reads the instruction before the answer (as ``VQATask``'s option, and the
            official SNLI-VE fine-tuning layout).
    """

    name = "image_text_match"
    instruction = ' does the image describe " {} "?'
    required_fields = ("image", "captions")
    query_field = "captions"
    default_generation = MATCH_GENERATION

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *,
                 objects: Sequence[str] | str | None = None,
                 negative_captions: Sequence[str] | str | None = None,
                 negative_window: int = 10_000, max_source_length: int = 80,
                 prompt_type: Literal["none", "prev_output"] = "none") -> None:
        owner = type(self).__name__
        super().__init__(source, weight, prompted_generation(owner, prompt_type, generation))
        self.prompt_type = prompt_type
        self.objects = [o.lower() for o in
                        string_list(owner, "objects", SHAPES if objects is None else objects)]
        self.negative_captions = (None if negative_captions is None
                                  else string_list(owner, "negative_captions", negative_captions))
        self.negative_window = check_window(owner, negative_window)
        self.max_source_length = check_max_words(owner, "max_source_length", max_source_length)

    # ------------------------------------------------------------------ samples
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        """The claim that the record's first caption describes the image (label " yes")."""
        require_fields(record, self.required_fields, self.name, where(self))
        caption = self.caption_text(self._captions(record)[0])
        return _match_sample(self, record, context, self.fill_instruction(caption), YES, 1.0,
                             {"caption": caption})

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        captions = self._captions(record)
        objects = self._objects(record)
        rng = record_rng(self, record, train, fallback=captions[0])
        caption = self.caption_text(rng.choice(captions) if train else captions[0])
        if draw_positive(rng):
            label, shown = YES, caption
        else:
            references = {self.caption_text(c) for c in captions}
            negative = negative_caption(caption, references, objects, self.objects,
                                        self._draw_caption, self.caption_text, rng)
            if negative is None:
                raise field_error(self, record, "captions", "has no negative: every caption "
                                  "drawn to contrast with it was one of its own captions; "
                                  "give the task more varied negative_captions")
            label, shown = NO, self.caption_text(negative)
        return _match_sample(self, record, context, self.fill_instruction(shown), label, 1.0,
                             {"caption": shown})

    def caption_text(self, caption: str) -> str:
        """A caption as the model reads it (OFA's ``pre_caption``)."""
        return pre_caption(caption, self.max_source_length)

    def _draw_caption(self, rng: Any) -> str | None:
        if self.negative_captions is not None:
            return rng.choice(self.negative_captions)
        return caption_from_source(self, rng, self.negative_window)

    def _captions(self, record: Mapping[str, Any]) -> list[str]:
        captions = caption_list(record["captions"])
        if captions is None:
            raise field_error(self, record, "captions", f"must be a non-empty list of non-empty "
                              f"strings, got {record['captions']!r}")
        if not all(self.caption_text(c) for c in captions):
            raise field_error(self, record, "captions",
                              f"holds a caption that is empty once normalised: {captions!r}")
        return captions

    def _objects(self, record: Mapping[str, Any]) -> list[str]:
        objects = record.get("objects")
        if objects is None:
            return []
        if isinstance(objects, str) or not isinstance(objects, Sequence) or not all(
                isinstance(o, str) and o.strip() for o in objects):
            raise field_error(self, record, "objects", f"must be a list of object words "
                              f"(non-empty strings), got {objects!r}")
        return [o.strip().lower() for o in objects]



class VQAImageTextMatchTask(YesNoMatching, Task):
    """Is this the answer to the question about the image? (OFA's ITM from QA rows.)

    Record schema: the VQA records (``datamodules.sources``): ``id`` (also seeds the
    evaluation draw; without one the question does), ``image``, ``question`` (a non-empty
    string) and ``answers`` (``{answer: confidence}``, a list of answers, each 1.0, or one
    answer).

    Source: ``' what is the answer to question " {question} ". is " {answer} "?'`` with the
    question after ``pre_question`` (nothing appended, as in pretraining) and the
    highest-confidence answer (first of equals), or, for a negative, another answer of the
    same type (:func:`tasks._pretrain.negative_answer`: counts shift by one half the time;
    answers with no type, and low-confidence ones, draw from type ``"other"``). Target
    ``" yes"`` / ``" no"``. The loss weight is the answer's confidence, for positives and
    negatives alike, as in the official data pipeline.

    Args:
        answer_types: ``type -> answers`` (the official ``type2ans.json``, as a mapping or
            the file's path). Default: ShapesWorld's answer groups,
            :data:`SHAPES_WORLD_ANSWER_TYPES`. Type ``"how many"`` marks counts; a type
            ``"other"``, when present, is the pool for untyped answers (else all answers).
        max_source_length: word budget of the question (official 80).
        prompt_type: as :class:`ImageTextMatchTask`'s.
    """

    name = "vqa_image_text_match"
    instruction = ' what is the answer to question " {} ". is " {} "?'
    required_fields = ("image", "question", "answers")
    query_field = "question"
    default_generation = MATCH_GENERATION

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *,
                 answer_types: Mapping[str, Sequence[str]] | str | None = None,
                 max_source_length: int = 80,
                 prompt_type: Literal["none", "prev_output"] = "none") -> None:
        owner = type(self).__name__
        super().__init__(source, weight, prompted_generation(owner, prompt_type, generation))
        self.prompt_type = prompt_type
        self.answer_types, self.answer_type = answer_type_table(
            owner, SHAPES_WORLD_ANSWER_TYPES if answer_types is None else answer_types)
        self.max_source_length = check_max_words(owner, "max_source_length", max_source_length)

    def query_fields(self, text: str | None) -> dict[str, Any]:
        """``--text "question | answer"``: the claim to check."""
        question, bar, answer = (text or "").partition("|")
        if not bar or not question.strip() or not answer.strip():
            raise ValueError(f"task {self.name!r} needs --text 'question | answer' (the answer "
                             f"to check), got {text!r}")
        return {"question": question.strip(), "answers": {answer.strip(): 1.0}}

    # ------------------------------------------------------------------ samples
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        """The claim that the record's best answer is right (label " yes")."""
        require_fields(record, self.required_fields, self.name, where(self))
        question = self.question_text(record)
        scores = answer_scores(self, record)
        answer = max(scores, key=scores.get)
        return _match_sample(self, record, context, self.fill_instruction(question, answer),
                             YES, scores[answer], {"answer": answer})

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        question = self.question_text(record)
        scores = answer_scores(self, record)
        answer = max(scores, key=scores.get)
        rng = record_rng(self, record, train, fallback=question)
        if draw_positive(rng):
            label, shown = YES, answer
        else:
            shown = negative_answer(answer, scores[answer], scores, self.answer_types,
                                    self.answer_type, NUMBER_WORDS, rng)
            if shown is None:
                raise field_error(self, record, "answers", f"leaves no negative answer: the "
                                  f"answer_types hold no answer besides {sorted(scores)}")
            label = NO
        return _match_sample(self, record, context, self.fill_instruction(question, shown),
                             label, scores[answer], {"answer": shown})

    def question_text(self, record: Mapping[str, Any]) -> str:
        question = pre_question(text_field(self, record, "question"), self.max_source_length)
        if not question:
            raise field_error(self, record, "question", "is empty once normalised")
        return question

