"""Grounded captioning, OFA's pretraining twin of visual grounding: image + region -> the
text that describes the region."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

from torchmetrics import Metric

from ofa_lightning.data import Sample
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from tasks._pretrain import load_region, parse_box
from tasks._text import (TOKENIZERS, caption_metrics, check_choice, check_max_words,
                         check_scorers, field_error, pre_caption, text_field, where)


class GroundedCaptionTask(Task):
    """Describe a region of the image (OFA pretrains it beside every grounding sample);
    scored like captions, with the record's text as the one reference.

    Record schema: the visual-grounding records (``datamodules.sources``):

    - ``id``: anything printable; names the record in errors and evaluation (optional).
    - ``image``: a PIL image, a file path or encoded image bytes.
    - ``text``: the region's description, a non-empty string (only training and evaluation
      need it; a query needs the image and the box).
    - ``box``: ``(x0, y0, x1, y1)`` in pixels of the *original* image, top-left origin,
      inside the image and not degenerate.

    Source: ``'  what does the region describe? region:'`` (two leading spaces, as in the
    official code) followed by the four ``<bin>`` tokens ``x0 y0 x1 y1`` of the box, resized
    with the image and quantised exactly as ``VisualGroundingTask`` quantises its targets.
    Target: ``" {text}"`` after ``pre_caption`` (at most ``max_target_length`` words).

    Args:
        max_target_length: word budget of the description (the pretraining script's 30).
        scorers, tokenizer: as ``CaptionTask``: the caption metrics to compute and the
            tokenizer that prepares captions for them.
    """

    name = "grounded_caption"
    instruction = "  what does the region describe? region:"
    required_fields = ("image", "text", "box")
    query_field = "box"
    # The official caption evaluation settings (evaluate_caption.sh), as CaptionTask.
    default_generation = {"beam": 5, "max_len_a": 0.0, "max_len_b": 16, "min_len": 1,
                          "no_repeat_ngram_size": 3}

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *, max_target_length: int = 30,
                 scorers: Sequence[str] = ("cider", "bleu4"),
                 tokenizer: Literal["auto", "ptb", "simple"] = "auto") -> None:
        super().__init__(source, weight, generation)
        owner = type(self).__name__
        self.max_target_length = check_max_words(owner, "max_target_length", max_target_length)
        self.scorers = check_scorers(owner, scorers)
        check_choice(owner, "tokenizer", tokenizer, TOKENIZERS)
        self.tokenizer = tokenizer

    def query_fields(self, text: str | None) -> dict[str, Any]:
        """``--text "x0,y0,x1,y1"``: the region, in pixels of the image."""
        return {"box": parse_box(self.name, text)}

    # ------------------------------------------------------------------ samples
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        image, _, bins, meta = load_region(self, record, context)
        vocab = context.vocab
        return Sample.seq2seq(self.name, vocab, [*vocab.encode(self.instruction), *bins], [],
                              image=image, meta=meta)

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        text = text_field(self, record, "text")
        target = pre_caption(text, self.max_target_length)
        if not target:
            raise field_error(self, record, "text", f"holds {text!r}, which is empty once "
                              f"normalised")
        query = self.build_query(record, context)
        return query.with_target(context.vocab, context.vocab.encode(f" {target}"),
                                 meta={**query.meta, "references": [text]})

    # ------------------------------------------------------------------ predictions
    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Metric]:
        return caption_metrics(type(self).__name__, self.scorers, self.tokenizer)

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        metrics["captioning"].update(list(predictions), [list(m["references"]) for m in metas])
