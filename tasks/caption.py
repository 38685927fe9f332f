"""Image captioning, OFA's ``caption`` task: image -> one sentence describing it."""

from __future__ import annotations

import random
import warnings
from typing import Any, Literal, Mapping, Sequence

import torch
from torchmetrics import Metric

from ofa_lightning.data import Sample
from ofa_lightning.metrics import CAPTION_METRICS, CaptionMetrics, java_available, strip_punctuation
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from ofa_lightning.vocab import UnifiedVocab
from tasks._text import (check_choice, check_max_words, field_error, load_image, pre_caption,
                         where)

TOKENIZERS = ("auto", "ptb", "simple")


class CaptionTask(Task):
    """Image captioning (COCO-style); scored with pycocoevalcap's CIDEr-D, BLEU, ....

    Record schema (a mapping):

    - ``id``: anything printable; names the record in errors and evaluation (optional).
    - ``image``: a PIL image, a file path or encoded image bytes.
    - ``captions``: the reference captions, a list of non-empty strings (a single string is
      taken as a list of one).

    Training target: ``" {caption}"`` where the caption is one reference (a random one per
    call when ``train=True``, the first otherwise) after OFA's ``pre_caption`` (lowercase,
    leading punctuation stripped, ``-``/``/`` to spaces, whitespace collapsed, at most
    ``max_target_length`` words). The evaluation meta keeps all captions, untouched, as
    references.

    Args:
        max_target_length: word budget of the target caption (official 20).
        remove_punctuation: also delete all ASCII punctuation from the target, as the
            official COCO fine-tuning does (its evaluation strips it from predictions too);
            the default keeps the pretraining form, ``pre_caption`` only.
        scorers: which caption metrics to compute, from ``CAPTION_METRICS``. The default
            ``("cider", "bleu4")`` keeps validation fast; add ``"meteor"`` (a JVM start per
            evaluation), ``"rouge_l"``, ``"bleu1"``...
        tokenizer: ``"ptb"`` (Stanford PTBTokenizer, needs Java, the official choice),
            ``"simple"`` (no Java) or ``"auto"`` (ptb when Java is installed, else simple
            with a warning).
    """

    name = "caption"
    instruction = " what does the image describe?"
    required_fields = ("image", "captions")
    # Official caption evaluation (evaluate_caption.sh): reference/ofa_spec.md §5.4.
    default_generation = {"beam": 5, "max_len_a": 0.0, "max_len_b": 16, "min_len": 1,
                          "no_repeat_ngram_size": 3}

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *, max_target_length: int = 20,
                 remove_punctuation: bool = False,
                 scorers: Sequence[str] = ("cider", "bleu4"),
                 tokenizer: Literal["auto", "ptb", "simple"] = "auto") -> None:
        super().__init__(source, weight, generation)
        self.max_target_length = check_max_words(type(self).__name__, "max_target_length",
                                                 max_target_length)
        self.remove_punctuation = remove_punctuation
        scorers = (scorers,) if isinstance(scorers, str) else tuple(scorers)
        unknown = [s for s in scorers if s not in CAPTION_METRICS]
        if not scorers or unknown:
            raise ValueError(f"{type(self).__name__}: scorers must be a non-empty choice from "
                             f"{list(CAPTION_METRICS)}, got {list(scorers)}")
        check_choice(type(self).__name__, "tokenizer", tokenizer, TOKENIZERS)
        self.scorers = scorers
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ samples
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        image, _, _ = load_image(self, record, context)
        vocab = context.vocab
        return Sample.seq2seq(self.name, vocab, vocab.encode(self.fill_instruction()), [],
                              image=image, meta={"id": record.get("id")})

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        captions = self._captions(record)
        caption = random.choice(captions) if train else captions[0]
        target = self.target_text(caption)
        if not target:
            raise field_error(self, record, "captions",
                              f"holds {caption!r}, which is empty once normalised")
        query = self.build_query(record, context)
        return query.with_target(context.vocab, context.vocab.encode(f" {target}"),
                                 meta={**query.meta, "references": list(captions)})

    def target_text(self, caption: str) -> str:
        """A reference caption as the model learns to write it (without the leading space)."""
        if self.remove_punctuation:
            caption = strip_punctuation(caption)
        return pre_caption(caption, self.max_target_length)

    def _captions(self, record: Mapping[str, Any]) -> list[str]:
        captions = record["captions"]
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, Sequence) or not captions:
            raise field_error(self, record, "captions",
                              f"must be a non-empty list of strings, got {captions!r}")
        bad = [c for c in captions if not isinstance(c, str) or not c.strip()]
        if bad:
            raise field_error(self, record, "captions",
                              f"must hold non-empty strings; found {bad[0]!r}")
        return list(captions)

    # ------------------------------------------------------------------ predictions
    def decode(self, tokens: torch.Tensor, vocab: UnifiedVocab, meta: Mapping[str, Any]) -> str:
        return vocab.decode(tokens).strip()

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Metric]:
        tokenizer = self.tokenizer
        if tokenizer == "auto":
            tokenizer = "ptb" if java_available() else "simple"
            if tokenizer == "simple":
                warnings.warn("CaptionTask: no `java` on PATH, so captions are scored with the "
                              "Java-free 'simple' tokenizer; scores differ slightly from the "
                              "official PTBTokenizer ones (install a JRE for those)", stacklevel=2)
        return {"captioning": CaptionMetrics(metrics=self.scorers, tokenizer=tokenizer)}

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        metrics["captioning"].update(list(predictions), [list(m["references"]) for m in metas])
