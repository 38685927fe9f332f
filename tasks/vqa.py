"""Visual question answering, OFA's ``vqa`` task: image + question -> short answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torchmetrics import Metric

from ofa_lightning.data import Batch, Sample
from ofa_lightning.generation import Trie, generate, score_candidates
from ofa_lightning.metrics import ANSWER_TYPES, VQAAccuracy, VQAAccuracyByType
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from ofa_lightning.vocab import UnifiedVocab
from tasks._text import (answer_scores, check_choice, check_max_words, decoder_prompts,
                         field_error, load_image, pre_question, prompted_generation, text_field,
                         where)

DECODE_MODES = ("beam", "trie", "allcand")
# answers that make a question's type "number" when the record does not say
NUMBER_ANSWERS = frozenset("zero one two three four five six seven eight nine ten eleven twelve "
                           "thirteen fourteen fifteen sixteen seventeen eighteen nineteen "
                           "twenty".split())


class VQATask(Task):
    """Visual question answering (VQAv2-style), scored by the VQA soft accuracy.

    Record schema (a mapping):

    - ``id``: anything printable; names the record in errors and evaluation (optional).
    - ``image``: a PIL image, a file path or encoded image bytes.
    - ``question``: the question, a non-empty string.
    - ``answers``: ``{answer: confidence}`` (VQAv2 soft scores, finite and >= 0), or a list
      of answers (each scores 1.0), or one answer string.
    - ``answer_type`` (optional): ``"yes/no"``, ``"number"`` or ``"other"``, as VQAv2
      annotates; without it the best answer decides (:func:`answer_type`). Evaluation
      reports the accuracy per type beside the overall one.

    Source: ``" {question}"``, the question after OFA's ``pre_question`` (at most
    ``max_source_length`` words) with ``?`` appended when missing; there is no other prompt.
    Target: ``" {answer}"`` for the highest-confidence answer (the first of equals), and the
    sample's loss weight is that confidence, as in the official data pipeline. Answers are
    used verbatim (only surrounding whitespace is trimmed) because the metric looks the
    predicted string up verbatim.

    Args:
        decode_mode: ``"beam"`` unconstrained beam search; ``"trie"`` beam search constrained
            to the candidate answers by a prefix trie; ``"allcand"`` scores every candidate
            (log-likelihood under the trie mask) and picks the best, the official default.
        candidates: the answer set for ``trie``/``allcand``: a list of answers, or the path
            of a UTF-8 text file with one answer per line. ``None``: asked from the source
            (``source.answer_candidates()``) when first needed.
        prompt_type: ``"none"``, the pretraining layout (decoder input = bos + answer);
            ``"prev_output"``, the official fine-tuning layout: the decoder input is
            bos + question + answer, the loss covers only answer + eos, and decoding forces
            the question as a decoder prefix.
        max_source_length: word budget of the question (official 80).
        chunk_size: candidates per decoder call in ``allcand`` mode (official 20).
    """

    name = "vqa"
    instruction = " {}"
    required_fields = ("image", "question", "answers")
    query_field = "question"
    # Official VQA beam evaluation (evaluate_vqa_beam.sh): beam 5, --unnormalized, temperature 1.
    # Answers are short, so the length budget is 20 tokens after any decoder prompt.
    default_generation = {"beam": 5, "max_len_a": 0.0, "max_len_b": 20, "min_len": 1,
                          "normalize_scores": False}

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *,
                 decode_mode: Literal["beam", "trie", "allcand"] = "beam",
                 candidates: Sequence[str] | str | None = None,
                 prompt_type: Literal["none", "prev_output"] = "none",
                 max_source_length: int = 80, chunk_size: int = 20) -> None:
        owner = type(self).__name__
        check_choice(owner, "decode_mode", decode_mode, DECODE_MODES)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{owner}: chunk_size must be a positive integer, got {chunk_size!r}")
        super().__init__(source, weight, prompted_generation(owner, prompt_type, generation))
        self.decode_mode = decode_mode
        self.prompt_type = prompt_type
        self.max_source_length = check_max_words(owner, "max_source_length", max_source_length)
        self.chunk_size = chunk_size
        self.candidates = None if candidates is None else _candidate_list(candidates, owner)
        self._tokenised: tuple[UnifiedVocab, list[str], list[list[int]], Trie] | None = None

    # ------------------------------------------------------------------ samples
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        question = self.question_text(text_field(self, record, "question"))
        image, ratios, size = load_image(self, record, context)
        vocab = context.vocab
        return Sample.seq2seq(self.name, vocab, vocab.encode(self.fill_instruction(question)), [],
                              image=image, meta={"id": record.get("id"), "ratios": ratios,
                                                 "image_size": size})

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        scores = answer_scores(self, record)
        answer = max(scores, key=scores.get)
        query = self.build_query(record, context)
        vocab = context.vocab
        answer_ids = vocab.encode(f" {answer}")
        meta = {**query.meta, "answers": scores, "answer_type": answer_type(self, record, answer)}
        sample = query.with_target(vocab, answer_ids, weight=scores[answer], meta=meta)
        return sample if self.prompt_type == "none" else sample.with_source_prompt(vocab)

    def question_text(self, question: str) -> str:
        """A question as the model reads it (without the leading space)."""
        question = pre_question(question, self.max_source_length)
        return question if question.endswith("?") else question + "?"

    # ------------------------------------------------------------------ candidates
    def answer_candidates(self) -> list[str]:
        """The candidate answers: the init arg, else the source's ``answer_candidates()``."""
        if self.candidates is not None:
            return self.candidates
        offer = getattr(self.source, "answer_candidates", None)
        if not callable(offer):
            raise ValueError(
                f"{type(self).__name__}(decode_mode={self.decode_mode!r}) needs candidate "
                f"answers, but none were given and the source "
                f"({type(self.source).__name__}) has no answer_candidates(); pass "
                f"init_args.candidates (a list, or a file with one answer per line)")
        self.candidates = _candidate_list(offer(), f"{where(self)}: answer_candidates()")
        return self.candidates

    def _candidate_tokens(self, vocab: UnifiedVocab) -> tuple[list[str], list[list[int]], Trie]:
        """Candidates, their token ids and their trie, built once per vocabulary."""
        if self._tokenised is None or self._tokenised[0] is not vocab:
            answers = self.answer_candidates()
            tokens = [vocab.encode(f" {a}") for a in answers]
            self._tokenised = (vocab, answers, tokens, Trie(tokens, eos=vocab.eos))
        return self._tokenised[1:]

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers need no token cache
        return {**self.__dict__, "_tokenised": None}

    # ------------------------------------------------------------------ predictions
    def constraints(self, vocab: UnifiedVocab) -> dict[str, Any]:
        if self.decode_mode == "trie":
            return {"trie": self._candidate_tokens(vocab)[2]}
        return {}

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: Batch, vocab: UnifiedVocab) -> list[str]:
        prompts = decoder_prompts(self.prompt_type, batch, vocab.pad)
        if self.decode_mode == "allcand":
            answers, tokens, trie = self._candidate_tokens(vocab)
            scores = score_candidates(model, batch.src_tokens, tokens, batch.patch_images,
                                      batch.patch_masks, trie=trie, prefix_tokens=prompts,
                                      chunk_size=self.chunk_size)  # (B, n_candidates)
            return [answers[i] for i in scores.argmax(1).tolist()]
        hypotheses = generate(model, batch.src_tokens, batch.patch_images, batch.patch_masks,
                              config=self.generation, prefix_tokens=prompts,
                              **self.constraints(vocab))
        skip = [0] * len(batch) if prompts is None else [p.numel() for p in prompts]
        return [self.decode(sample[0].tokens[n:], vocab, meta)
                for sample, n, meta in zip(hypotheses, skip, batch.meta)]

    def decode(self, tokens: torch.Tensor, vocab: UnifiedVocab, meta: Mapping[str, Any]) -> str:
        """Answer tokens (after any decoder prompt, ending in eos) -> the answer string."""
        return vocab.decode(tokens).strip()

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Metric]:
        return {"accuracy": VQAAccuracy(), "accuracy_by_type": VQAAccuracyByType()}

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        predictions, answers = list(predictions), [m["answers"] for m in metas]
        metrics["accuracy"].update(predictions, answers)
        metrics["accuracy_by_type"].update(predictions, answers, [m["answer_type"] for m in metas])


def answer_type(task: Task, record: Mapping[str, Any], best_answer: str) -> str:
    """The record's ``answer_type``, else the best answer's: ``yes``/``no`` -> ``yes/no``,
    digits or an English number word up to twenty -> ``number``, anything else -> ``other``
    (VQAv2 derives a question's type from its annotators' answers in much the same way)."""
    given = record.get("answer_type")
    if given is not None:
        if given not in ANSWER_TYPES:
            raise field_error(task, record, "answer_type", f"is {given!r}; expected one of "
                              f"{list(ANSWER_TYPES)}")
        return given
    answer = best_answer.lower()
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.isdigit() or answer in NUMBER_ANSWERS else "other"


def _candidate_list(candidates: Sequence[str] | str | Path, owner: str) -> list[str]:
    """Answers, stripped and de-duplicated in order; a str or Path names a file of lines."""
    if isinstance(candidates, (str, Path)):
        path = Path(candidates)
        if not path.is_file():
            raise ValueError(f"{owner}: candidates {str(candidates)!r} is not a file; give a "
                             f"list of answers or a text file with one answer per line")
        candidates = [line for line in path.read_text(encoding="utf-8").splitlines()
                      if line.strip()]
    answers = list(dict.fromkeys(c.strip() for c in candidates if isinstance(c, str)))
    bad = [c for c in candidates if not isinstance(c, str)]
    if bad or "" in answers:
        found = repr(bad[0]) if bad else "an empty answer"
        raise ValueError(f"{owner}: candidates must be non-empty strings; found {found}")
    if not answers:
        raise ValueError(f"{owner}: candidates is empty; the trie and allcand modes need at "
                         f"least one answer")
    return answers
