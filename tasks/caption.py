"""Image captioning, OFA's ``caption`` task: image -> one sentence describing it."""

from __future__ import annotations

import random
from typing import Any, Literal, Mapping, Sequence

from torchmetrics import Metric

from ofa_lightning.data import Sample
from ofa_lightning.metrics import strip_punctuation
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from tasks._text import (TOKENIZERS, caption_metrics, check_choice, check_max_words,
                         check_scorers, field_error, load_image, pre_caption, where)


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
        check_choice(type(self).__name__, "tokenizer", tokenizer, TOKENIZERS)
        self.scorers = check_scorers(type(self).__name__, scorers)
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
    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Metric]:
        return caption_metrics(type(self).__name__, self.scorers, self.tokenizer)

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        metrics["captioning"].update(list(predictions), [list(m["references"]) for m in metas])
