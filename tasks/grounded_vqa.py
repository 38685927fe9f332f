"""Grounded VQA: a question about the region a box marks (``" what colour is the region?
region: <bins>"``).

OFA never trains on this instruction. It is composed of two learned ones: a VQA question
(the question is the whole instruction) and the region syntax of grounded captioning
(``"... region:"`` then the box's four ``<bin>`` tokens). Evaluating a pretrained model on it
zero-shot measures whether instruction pretraining composes (``benchmarks/transfer.py``);
fine-tuning on it is ordinary VQA with a region.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ofa_lightning.data import Sample
from ofa_lightning.task import SampleContext, require_fields
from tasks._text import box_bins, image_box, where
from tasks.vqa import VQATask


class GroundedVQATask(VQATask):
    """VQA whose question is about a region; scored, decoded and configured as ``VQATask``.

    Record schema: the VQA fields (``image``, ``question``, ``answers``) plus ``box``,
    ``(x0, y0, x1, y1)`` in pixels of the original image. Source:
    ``" {question} region:"`` followed by the box's four bins (quantised as visual
    grounding does), e.g. ``" what colour is the region? region: <bin_3> <bin_40> ..."``.
    """

    name = "grounded_vqa"
    instruction = " {} region:"
    required_fields = ("image", "question", "box", "answers")

    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        require_fields(record, ("box",), self.name, where(self))
        query = super().build_query(record, context)
        box = image_box(self, record, "box", record["box"], query.meta["image_size"])
        bins = torch.tensor(box_bins(box, query.meta["ratios"], context), dtype=torch.long)
        source = torch.cat([query.source[:-1], bins, query.source[-1:]])  # bins before eos
        return dataclasses.replace(query, source=source, meta={**query.meta, "box": box})
