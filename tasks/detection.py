"""Object detection, OFA's pretraining ``detection`` task: image -> every object's box and label."""

from __future__ import annotations

import math
import random
import re
from typing import Any, Mapping, Sequence, TypedDict

import torch
from PIL import Image
from torchmetrics import Metric

from ofa_lightning.data import Batch, Sample
from ofa_lightning.generation import generate
from ofa_lightning.location import box_to_original, tokens_to_box
from ofa_lightning.metrics.detection import DetectionMetrics, emission_order_scores
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from ofa_lightning.visualize import draw_boxes
from ofa_lightning.vocab import UnifiedVocab
from tasks._text import box_bins, field_error, image_box, load_image, where

# Bins of one box: x0 y0 x1 y1.
BOX_TOKENS = 4


# A valid object, written with one letter per token: four bins, then at least one text token.
_OBJECT = re.compile(f"b{{{BOX_TOKENS}}}t+")


class Detection(TypedDict):
    """One predicted object, JSON-ready (``predict`` writes predictions as JSON lines)."""

    box: list[float]  # x0, y0, x1, y1 in pixels of the original image
    label: str
    score: float  # exp(mean token log-prob) from generation, else the emission-order rank


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


def _object_groups(ids: Sequence[int], vocab: UnifiedVocab) -> list[tuple[int, int, int]]:
    """(start, label start, end) of each well-formed object in ``ids`` (no eos).

    Each token becomes a letter (``b`` bin, ``t`` text, ``x`` anything else) and the
    sequence is cut before every bin that follows a non-bin, so a group is a run of bins
    and what follows up to the next bin. A group is an object when it reads exactly
    ``bbbbt...t``.
    """
    text_lo, text_hi = vocab.text_range
    letters = "".join("b" if vocab.is_bin(i) else "t" if text_lo <= i < text_hi else "x"
                      for i in ids)
    return [(m.start(), m.start() + BOX_TOKENS, m.end())
            for m in re.finditer(r"b*[^b]+|b+$", letters) if _OBJECT.fullmatch(m.group())]


class DetectionTask(Task):
    """Detection as OFA pretrains it (Objects365/OpenImages rows), scored by mAP@0.5.

    Record schema (a mapping):

    - ``id``: anything printable; names the record in errors and evaluation (optional).
    - ``image``: a PIL image, a file path or encoded image bytes.
    - ``objects``: a non-empty list of ``{"box": (x0, y0, x1, y1), "label": str}``; boxes in
      pixels of the *original* image with ``0 <= x0 < x1 <= width``, ``0 <= y0 < y1 <=
      height``. The target keeps this order (the official one does not sort).

    Target (``reference/ofa_spec.md`` §4.1): for each object, its four ``<bin>`` tokens
    ``x0 y0 x1 y1`` then BPE(``" {label}"``), then eos. The official code joins the bin
    symbols and the label's BPE ids with spaces and looks each up with ``use_bpe=False``,
    which gives exactly these ids. Boxes are quantised as ``visual_grounding`` does: the
    image is resized to ``context.image_size`` square, the box by the same ratios, and
    ``max_image_size = context.image_size``, so the bins span the whole image (the official
    256-px jitter divided by 512 would leave half the bins unused).

    Decoding is greedy (``beam=1``): detection outputs are long and set-like, beam search's
    score favours stopping early (fewer objects, lower recall) and costs ``beam`` times the
    compute on the longest outputs of any task; Pix2Seq, the model of this task, does not
    use beam search either. The length budget is ``max_objects * (4 + max_label_tokens)``
    tokens and ``min_len`` is 5 (one box and one label token: every target has an object).
    No grammar constraint keeps bins and text in their places (the generator's constraints
    are one id range or a trie, neither can say "four bins, then text"), so :meth:`decode`
    parses leniently and drops what does not parse; see there.

    Args:
        loss_weight: the samples' loss weight (``Sample.weight``); the official
            pretraining weighs detection samples 2.0.
        hflip: in training, flip the image left-right with probability 0.5 and mirror the
            boxes with it (the official pipeline also flips; its LargeScaleJitter is not
            reproduced). Object order is kept, as in the official code.
        max_objects: most objects a record may have; sets the generation length budget.
        max_label_tokens: most BPE tokens one label may have; sets the budget too. A record
            beyond either limit is a RecordError that says which to raise.
    """

    name = "detection"
    instruction = " what are the objects in the image?"
    required_fields = ("image", "objects")
    # max_len_b comes from max_objects and max_label_tokens (see __init__)
    default_generation = {"beam": 1, "max_len_a": 0.0, "min_len": BOX_TOKENS + 1}

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *, loss_weight: float = 2.0,
                 hflip: bool = False, max_objects: int = 20, max_label_tokens: int = 8) -> None:
        owner = type(self).__name__
        self.max_objects = _positive_int(owner, "max_objects", max_objects)
        self.max_label_tokens = _positive_int(owner, "max_label_tokens", max_label_tokens)
        budget = self.max_objects * (BOX_TOKENS + self.max_label_tokens)
        super().__init__(source, weight, {"max_len_b": budget, **(generation or {})})
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) \
                or not math.isfinite(loss_weight) or loss_weight <= 0:
            raise ValueError(f"{owner}: loss_weight must be a positive finite number, "
                             f"got {loss_weight!r}")
        self.loss_weight = float(loss_weight)
        self.hflip = bool(hflip)

    # ------------------------------------------------------------------ samples
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        image, ratios, size = load_image(self, record, context)
        vocab = context.vocab
        return Sample.seq2seq(
            self.name, vocab, vocab.encode(self.fill_instruction()), [], image=image,
            meta={"id": record.get("id"), "ratios": ratios, "image_size": size,
                  "max_image_size": context.image_size})

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        vocab = context.vocab
        labelled = self._objects(record, vocab)  # structure first: cheaper than the image
        query = self.build_query(record, context)
        width, height = query.meta["image_size"]
        objects = [(image_box(self, record, f"objects[{index}].box", box, (width, height)),
                    label, tokens) for index, (box, label, tokens) in enumerate(labelled)]
        image = query.image
        flipped = train and self.hflip and random.random() < 0.5
        if flipped:
            image = image.flip(-1)  # (3, H, W): mirror the width axis
            objects = [([width - box[2], box[1], width - box[0], box[3]], label, tokens)
                       for box, label, tokens in objects]
        target: list[int] = []
        for box, _, label_tokens in objects:
            target += box_bins(box, query.meta["ratios"], context) + label_tokens
        meta = {**query.meta, "boxes": [box for box, _, _ in objects],
                "labels": [label for _, label, _ in objects], "flipped": flipped}
        return query.with_target(vocab, target, image=image, weight=self.loss_weight, meta=meta)

    def _objects(self, record: Mapping[str, Any], vocab: UnifiedVocab
                 ) -> list[tuple[Any, str, list[int]]]:
        """(box as given, label, label token ids) of each object; the box is checked once
        the image size is known (:func:`tasks._text.image_box`)."""
        objects = record["objects"]
        if isinstance(objects, (str, bytes, Mapping)) or not isinstance(objects, Sequence):
            raise field_error(self, record, "objects", f"must be a list of {{'box': [x0, y0, x1, "
                              f"y1], 'label': str}} mappings, got {type(objects).__name__}")
        if not objects:
            raise field_error(self, record, "objects", "is empty; a detection record needs at "
                              "least one object")
        if len(objects) > self.max_objects:
            raise field_error(self, record, "objects", f"holds {len(objects)} objects, more than "
                              f"max_objects={self.max_objects}; raise the task's max_objects")
        parsed = []
        for index, obj in enumerate(objects):
            name = f"objects[{index}]"
            if not isinstance(obj, Mapping):
                raise field_error(self, record, name, f"must be a {{'box', 'label'}} mapping, "
                                  f"got {obj!r}")
            for key in ("box", "label"):
                if obj.get(key) is None:
                    raise field_error(self, record, f"{name}.{key}", f"is missing (the object "
                                      f"has {list(obj)})")
            label = obj["label"]
            if not isinstance(label, str):
                raise field_error(self, record, f"{name}.label",
                                  f"must be a string, got {type(label).__name__}")
            label = label.strip()
            if not label:
                raise field_error(self, record, f"{name}.label", "is empty")
            tokens = vocab.encode(f" {label}")
            if len(tokens) > self.max_label_tokens:
                raise field_error(self, record, f"{name}.label", f"{label!r} is {len(tokens)} "
                                  f"tokens, more than max_label_tokens={self.max_label_tokens}; "
                                  f"raise the task's max_label_tokens")
            parsed.append((obj["box"], label, tokens))
        return parsed

    # ------------------------------------------------------------------ predictions
    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: Batch, vocab: UnifiedVocab) -> list[Any]:
        """As the base class, but the per-token log-probs go to :meth:`decode` as scores."""
        hypotheses = generate(model, batch.src_tokens, batch.patch_images, batch.patch_masks,
                              config=self.generation, **self.constraints(vocab))
        return [self.decode(best[0].tokens, vocab, meta, token_scores=best[0].positional_scores)
                for best, meta in zip(hypotheses, batch.meta)]

    def decode(self, tokens: torch.Tensor, vocab: UnifiedVocab, meta: Mapping[str, Any],
               token_scores: torch.Tensor | None = None) -> list[Detection]:
        """Generated tokens -> the objects, boxes in original-image pixels.

        Tokens after the first eos are ignored. An object is exactly four bins followed by
        one or more text tokens, up to the next bin or the end; anything else is dropped
        (fewer or more than four bins in a row, bins with no label, text with no box) and
        so is a group that holds any other token (an image code, ``<mask>``, ``<unk>``,
        bos, pad). A box whose corners come out inverted is kept: it is what the model
        said, and it scores as a false positive (it overlaps nothing).

        ``token_scores`` (log p per token, aligned with ``tokens``) give each object the
        score ``exp(mean log p)`` over its tokens; without them objects are ranked by the
        order of emission (:func:`emission_order_scores`).
        """
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        ends = (ids == vocab.eos).nonzero()
        if ends.numel():
            ids = ids[: int(ends[0])]
        groups = _object_groups(ids.tolist(), vocab)
        detections: list[Detection] = []
        rank_scores = emission_order_scores(len(groups))
        for k, (start, text_start, end) in enumerate(groups):
            label = vocab.decode(ids[text_start:end]).strip()
            if not label:
                continue
            box = tokens_to_box(ids[start:text_start], vocab,
                                max_image_size=meta["max_image_size"])
            box = box_to_original(box, *meta["ratios"])
            if token_scores is not None:
                score = math.exp(float(torch.as_tensor(token_scores)[start:end].double().mean()))
            else:
                score = float(rank_scores[k])
            detections.append({"box": box.tolist(), "label": label, "score": score})
        return detections

    def visualize(self, image: Image.Image, prediction: Any) -> Image.Image:
        return draw_boxes(image, [d["box"] for d in prediction],
                          [f"{d['label']} {d['score']:.2f}" for d in prediction])

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Metric]:
        return {"detection": DetectionMetrics()}

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        preds = [{"boxes": torch.tensor([d["box"] for d in p], dtype=torch.float64).reshape(-1, 4),
                  "labels": [d["label"] for d in p],
                  "scores": torch.tensor([d["score"] for d in p], dtype=torch.float64)}
                 for p in predictions]
        targets = [{"boxes": torch.tensor(m["boxes"], dtype=torch.float64).reshape(-1, 4),
                    "labels": list(m["labels"])} for m in metas]
        metrics["detection"].update(preds, targets)
