"""Text infilling, OFA's pure-text pretraining task: restore a text whose spans of words
were each replaced by one ``<mask>`` (BART's span masking)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torchmetrics import Metric

from ofa_lightning.data import Sample
from ofa_lightning.metrics.classification import TextReconstruction
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from ofa_lightning.vocab import UnifiedVocab
from tasks._pretrain import record_generator
from tasks._text import text_field, where

__all__ = ["TextInfillingTask", "SpanMasking", "mask_spans", "word_starts"]


@dataclass(frozen=True)
class SpanMasking:
    """One masking of a token sequence: the masked ids and what each ``<mask>`` hides."""

    ids: list[int]  # the tokens with each span replaced by one mask id
    spans: list[tuple[int, int]]  # (first word, number of words) per mask, left to right
    num_words: int  # words in the unmasked sequence


def word_starts(ids: Sequence[int], vocab: UnifiedVocab) -> list[bool]:
    """Which tokens begin a word: those that decode with a leading space (GPT-2 BPE's
    ``is_beginning_of_word``, which the official whole-word masking uses), and specials."""
    lo, hi = vocab.text_range
    return [not lo <= i < hi or vocab.decode([i]).startswith(" ") for i in ids]


def mask_spans(ids: Sequence[int], starts: Sequence[bool], mask_id: int, ratio: float = 0.3,
               poisson_lambda: float = 3.0,
               generator: torch.Generator | None = None) -> SpanMasking:
    """BART's span masking over whole words, with non-overlapping spans.

    Words are runs of tokens from one word start to the next (a run before the first start
    is a word too). ``ceil(ratio * words)`` words are masked, in spans whose lengths are
    Poisson(``poisson_lambda``) draws, the last one trimmed to the budget; each span becomes
    a single ``mask_id`` (replace_length 1, no random tokens: random_ratio 0).

    Two departures from fairseq's ``add_whole_word_mask``, which OFA uses, both so that
    a mask means exactly one span: there, spans start at random words and may overlap (so
    fewer words than budgeted get masked) or touch (two masks in a row); here they are
    placed uniformly among the arrangements that keep at least one unmasked word between
    two spans, so the masked fraction is exact. And zero-length draws, which fairseq turns
    into inserted masks hiding nothing (about 5 % of draws at lambda 3), are dropped.
    Spans are merged only when a short text has too few words to separate them.

    Draws use ``generator`` (torch's default generator when None).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    if not poisson_lambda > 0:
        raise ValueError(f"poisson_lambda must be > 0, got {poisson_lambda}")
    if len(starts) != len(ids):
        raise ValueError(f"starts has {len(starts)} flags for {len(ids)} tokens")
    bounds = [i for i, start in enumerate(starts) if start or i == 0] + [len(ids)]
    words = [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)] if ids else []
    budget = math.ceil(ratio * len(words))
    if budget == 0:
        return SpanMasking(list(ids), [], len(words))

    lengths = _span_lengths(budget, poisson_lambda, generator)
    kept = len(words) - budget
    while len(lengths) - 1 > kept:  # too few unmasked words to keep spans apart: merge
        lengths[-2:] = [lengths[-2] + lengths[-1]]
    order = torch.randperm(len(lengths), generator=generator).tolist()
    lengths = [lengths[i] for i in order]
    gaps = _gaps(kept, len(lengths), generator)

    out: list[int] = []
    spans: list[tuple[int, int]] = []
    word = 0
    for gap, length in zip(gaps, lengths):
        out += ids[words[word][0]:words[word + gap - 1][1]] if gap else []
        word += gap
        spans.append((word, length))
        out.append(mask_id)
        word += length
    if gaps[-1]:
        out += ids[words[word][0]:]
    return SpanMasking(out, spans, len(words))


def _span_lengths(budget: int, poisson_lambda: float,
                  generator: torch.Generator | None) -> list[int]:
    """Positive Poisson draws until they cover ``budget`` words; the last one trimmed."""
    lengths: list[int] = []
    total = 0
    while total < budget:
        draws = torch.poisson(torch.full((budget,), float(poisson_lambda)), generator=generator)
        for n in draws.long().tolist():
            if n > 0 and total < budget:
                lengths.append(min(n, budget - total))
                total += lengths[-1]
    return lengths


def _gaps(kept: int, spans: int, generator: torch.Generator | None) -> list[int]:
    """Unmasked words before each span and after the last (``spans + 1`` numbers summing to
    ``kept``, the inner ones >= 1), uniform over all such arrangements (stars and bars)."""
    free = kept - (spans - 1)
    bars = sorted(torch.randperm(free + spans, generator=generator)[:spans].tolist())
    edges = [-1, *bars, free + spans]
    extra = [edges[k + 1] - edges[k] - 1 for k in range(spans + 1)]
    return [e + (1 if 0 < k < spans else 0) for k, e in enumerate(extra)]


class TextInfillingTask(Task):
    """Restore a span-masked text (OFA's ``process_pure_text``); no image.

    Record schema: the text records (``datamodules.sources``): ``id`` (names the record in
    errors; in evaluation it also seeds the masking, so a validation set is the same on
    every run) and ``text``, a non-empty string.

    The text is stripped and lowercased, BPE-encoded as ``" {text}"``, cut to its first
    ``truncate_tokens`` tokens and then to the last ``keep_tokens`` of those (the official
    512 then 256). The target is those tokens. The source is the instruction
    ``' what is the complete text of " "?'`` with the masked tokens (:func:`mask_spans`)
    inserted before its last two BPE tokens; the insertion point is found by encoding
    ``' what is the complete text of "'`` and ``' "?'`` apart, which gives the official
    ids with OFA's BPE (" of", ' "' | ' "', "?") and keeps the text between the quotes
    with a trained BPE that spells ``' "?'`` as one token. The loss weight is
    ``loss_weight`` (the official 2.0). The official code builds two samples per text
    call; here each record gives one, drawn anew each time training visits it.

    Prediction: greedy decoding restricted to text tokens (no mask, code or bin ids).
    ``build_query`` reads a user's text with literal ``<mask>`` markers where words are
    missing. Metric: ``word_accuracy`` (1 - word error rate) and ``exact_match`` of the
    restored text against the original (:class:`TextReconstruction`).

    Args:
        mask_ratio: fraction of words masked (official 0.3).
        poisson_lambda: mean of the span-length distribution (official 3).
        loss_weight: per-sample loss weight (official 2.0).
        truncate_tokens, keep_tokens: the two length cuts (official 512 and 256).
    """

    name = "text_infilling"
    instruction = ' what is the complete text of " "?'
    required_fields = ("text",)
    query_field = "text"
    # Greedy: the output is mostly a copy of the source, where beams add little; the
    # budget covers the source (masks hide ~3 words each) plus room.
    default_generation = {"beam": 1, "max_len_a": 1.5, "max_len_b": 8, "min_len": 1}

    # the instruction around the inserted text: the text goes between the quotes
    _before = ' what is the complete text of "'
    _after = ' "?'

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *, mask_ratio: float = 0.3,
                 poisson_lambda: float = 3.0, loss_weight: float = 2.0,
                 truncate_tokens: int = 512, keep_tokens: int = 256) -> None:
        super().__init__(source, weight, generation)
        owner = type(self).__name__
        if not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio <= 1:
            raise ValueError(f"{owner}: mask_ratio must be in (0, 1], got {mask_ratio!r}")
        if not isinstance(poisson_lambda, (int, float)) or not poisson_lambda > 0:
            raise ValueError(f"{owner}: poisson_lambda must be > 0, got {poisson_lambda!r}")
        if not isinstance(loss_weight, (int, float)) or not 0 < loss_weight < math.inf:
            raise ValueError(f"{owner}: loss_weight must be a positive number, "
                             f"got {loss_weight!r}")
        for arg, value in (("truncate_tokens", truncate_tokens), ("keep_tokens", keep_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: {arg} must be a positive integer, got {value!r}")
        self.mask_ratio = float(mask_ratio)
        self.poisson_lambda = float(poisson_lambda)
        self.loss_weight = float(loss_weight)
        self.truncate_tokens = truncate_tokens
        self.keep_tokens = keep_tokens

    # ------------------------------------------------------------------ samples
    def text_tokens(self, vocab: UnifiedVocab, text: str) -> list[int]:
        """A text as the target spells it: lowercased, ``" {text}"``, cut as documented."""
        return vocab.encode(f" {text.strip().lower()}")[:self.truncate_tokens][-self.keep_tokens:]

    def source_tokens(self, vocab: UnifiedVocab, masked: Sequence[int]) -> list[int]:
        """The instruction with the (masked) text inserted between its quotes."""
        return [*vocab.encode(self._before), *masked, *vocab.encode(self._after)]

    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        """A user's text with ``<mask>`` where words are missing (each marker takes the place
        of a whole span, leading space included, as in training)."""
        require_fields(record, ("text",), self.name, where(self))
        vocab = context.vocab
        marker = vocab.id_to_token(vocab.mask)
        parts = f" {text_field(self, record, 'text').strip().lower()}".split(marker)
        ids: list[int] = []
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            ids += vocab.encode(part if last else part.rstrip(" "))
            ids += [] if last else [vocab.mask]
        ids = ids[:self.truncate_tokens][-self.keep_tokens:]
        return Sample.seq2seq(self.name, vocab, self.source_tokens(vocab, ids), [],
                              weight=self.loss_weight, meta={"id": record.get("id")})

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        text = text_field(self, record, "text")
        vocab = context.vocab
        ids = self.text_tokens(vocab, text)
        masking = mask_spans(ids, word_starts(ids, vocab), vocab.mask, self.mask_ratio,
                             self.poisson_lambda, record_generator(self, record, train, text))
        return Sample.seq2seq(self.name, vocab, self.source_tokens(vocab, masking.ids), ids,
                              weight=self.loss_weight,
                              meta={"id": record.get("id"), "reference": vocab.decode(ids).strip()})

    # ------------------------------------------------------------------ predictions
    def constraints(self, vocab: UnifiedVocab) -> dict[str, Any]:
        """Text tokens only, unless the generation settings name their own range."""
        if self.generation.constraint_range is not None:
            return {}
        return {"constraint_range": vocab.text_range}

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Metric]:
        return {"reconstruction": TextReconstruction()}

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        metrics["reconstruction"].update([str(p) for p in predictions],
                                         [m["reference"] for m in metas])
