"""torchmetrics Metrics for OFA's tasks, scored the way the official evaluation scores them.

Every metric here is DDP-safe: numeric states are summed across processes, and caption
strings travel as UTF-8 byte tensors so corpus-level scores (CIDEr-D, BLEU, METEOR) are
computed once over the whole evaluated set.
"""

from ofa_lightning.metrics.captioning import (
    CAPTION_METRICS,
    DEFAULT_CAPTION_METRICS,
    CaptionMetrics,
    cider_d,
    java_available,
    score_captions,
    strip_punctuation,
)
from ofa_lightning.metrics.classification import LabelAccuracy, TextReconstruction
from ofa_lightning.metrics.detection import DetectionMetrics
from ofa_lightning.metrics.image_generation import CodeAccuracy, ImageFID, RandomConvFeatures
from ofa_lightning.metrics.grounding import GroundingAccuracy, grounding_iou
from ofa_lightning.metrics.vqa import ANSWER_TYPES, VQAAccuracy, VQAAccuracyByType, vqa_soft_scores

__all__ = [
    "ANSWER_TYPES",
    "CAPTION_METRICS",
    "DEFAULT_CAPTION_METRICS",
    "CaptionMetrics",
    "CodeAccuracy",
    "DetectionMetrics",
    "GroundingAccuracy",
    "ImageFID",
    "LabelAccuracy",
    "RandomConvFeatures",
    "TextReconstruction",
    "VQAAccuracy",
    "VQAAccuracyByType",
    "cider_d",
    "grounding_iou",
    "java_available",
    "score_captions",
    "strip_punctuation",
    "vqa_soft_scores",
]
