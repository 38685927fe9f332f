"""Visual grounding, OFA's ``visual_grounding`` / RefCOCO task: image + phrase -> box."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from torchmetrics import Metric

from ofa_lightning.data import Sample
from ofa_lightning.location import box_to_original, tokens_to_box
from ofa_lightning.metrics import GroundingAccuracy
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from ofa_lightning.visualize import draw_boxes
from ofa_lightning.vocab import UnifiedVocab
from tasks._text import (box_bins, check_max_words, image_box, load_image, pre_caption,
                         text_field, where)


class VisualGroundingTask(Task):
    """Referring-expression grounding (RefCOCO/+/g-style), scored by Acc@0.5 and mean IoU.

    Record schema (a mapping):

    - ``id``: anything printable; names the record in errors and evaluation (optional).
    - ``image``: a PIL image, a file path or encoded image bytes.
    - ``text``: the referring expression, a non-empty string.
    - ``box``: ``(x0, y0, x1, y1)`` in pixels of the *original* image, top-left origin, with
      ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <= height``.

    The official RefCOCO convention (``reference/ofa_spec.md`` §2.3): the image is resized
    to ``context.image_size`` square (aspect ratio not kept), the box is scaled by the same
    ``(w_ratio, h_ratio)`` and quantised with ``max_image_size = context.image_size``; the
    target is the four ``<bin>`` tokens ``x0 y0 x1 y1`` then eos. Predictions are mapped
    back to original pixels, where the metric compares them with the record's box.

    Args:
        max_source_length: word budget of the expression after ``pre_caption`` (official 80).
            The target is always four bins, so there is no target budget.
    """

    name = "visual_grounding"
    instruction = ' which region does the text " {} " describe?'
    required_fields = ("image", "text", "box")
    query_field = "text"
    # Official RefCOCO evaluation (evaluate_refcoco.sh); the bins-only constraint comes from
    # constraints(vocab), since the bin ids depend on the vocabulary.
    default_generation = {"beam": 5, "min_len": 4, "max_len_a": 0.0, "max_len_b": 4,
                          "no_repeat_ngram_size": 3}

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *,
                 max_source_length: int = 80) -> None:
        super().__init__(source, weight, generation)
        self.max_source_length = check_max_words(type(self).__name__, "max_source_length",
                                                 max_source_length)

    # ------------------------------------------------------------------ samples
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        text = pre_caption(text_field(self, record, "text"), self.max_source_length)
        image, ratios, size = load_image(self, record, context)
        vocab = context.vocab
        return Sample.seq2seq(
            self.name, vocab, vocab.encode(self.fill_instruction(text)), [], image=image,
            meta={"id": record.get("id"), "ratios": ratios, "image_size": size,
                  "max_image_size": context.image_size})

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        query = self.build_query(record, context)
        box = image_box(self, record, "box", record["box"], query.meta["image_size"])
        target = box_bins(box, query.meta["ratios"], context)
        return query.with_target(context.vocab, target, meta={**query.meta, "box": box})

    # ------------------------------------------------------------------ predictions
    def constraints(self, vocab: UnifiedVocab) -> dict[str, Any]:
        """Bins only, unless the generation settings name their own range."""
        if self.generation.constraint_range is not None:
            return {}
        return {"constraint_range": vocab.bin_range}

    def decode(self, tokens: torch.Tensor, vocab: UnifiedVocab,
               meta: Mapping[str, Any]) -> torch.Tensor:
        """Four bin tokens (then eos) -> the box (4,) float32 in original-image pixels.

        Anything else (not four bins, or x1 < x0 / y1 < y0) gives the zero box, which
        scores IoU 0 (a miss, as the official evaluation counts it) instead of crashing.
        """
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        ends = (ids == vocab.eos).nonzero()
        if ends.numel():
            ids = ids[: int(ends[0])]
        if ids.numel() != 4 or not bool(vocab.is_bin(ids).all()):
            return torch.zeros(4)
        box = tokens_to_box(ids, vocab, max_image_size=meta["max_image_size"])
        box = box_to_original(box, *meta["ratios"])
        if box[2] < box[0] or box[3] < box[1]:
            return torch.zeros(4)
        return box

    def visualize(self, image: Image.Image, prediction: Any) -> Image.Image:
        return draw_boxes(image, [torch.as_tensor(prediction).tolist()])

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Metric]:
        return {"grounding": GroundingAccuracy()}

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        if not predictions:
            return
        predicted = torch.stack([torch.as_tensor(p, dtype=torch.float32) for p in predictions])
        targets = torch.tensor([list(m["box"]) for m in metas], dtype=torch.float32)
        metrics["grounding"].update(predicted, targets)
