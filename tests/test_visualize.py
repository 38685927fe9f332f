"""Predictions drawn on images: what `ofa-lightning predict` saves for box-valued tasks."""

from __future__ import annotations

import torch
from PIL import Image

from ofa_lightning.visualize import draw_boxes
from tasks.caption import CaptionTask
from tasks.detection import DetectionTask
from tasks.visual_grounding import VisualGroundingTask


def _red_pixels(image: Image.Image) -> set[tuple[int, int]]:
    width, height = image.size
    pixels = image.load()
    return {(x, y) for x in range(width) for y in range(height) if pixels[x, y] == (255, 0, 0)}


def test_draw_boxes_outlines_each_box_and_leaves_the_input_alone() -> None:
    image = Image.new("RGB", (40, 30), (200, 200, 200))
    drawn = draw_boxes(image, [(5, 5, 15, 12), (20, 10, 35, 25)])
    red = _red_pixels(drawn)
    assert {(5, 5), (15, 12), (20, 10), (35, 25), (10, 5), (20, 17)} <= red
    assert (10, 8) not in red and (27, 17) not in red  # insides stay untouched
    assert not _red_pixels(image)


def test_tasks_draw_their_predictions() -> None:
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    grounding = VisualGroundingTask().visualize(image, torch.tensor([4.0, 6.0, 30.0, 40.0]))
    assert (4, 6) in _red_pixels(grounding) and (30, 40) in _red_pixels(grounding)
    detections = [{"box": [10.0, 10.0, 50.0, 20.0], "label": "red circle", "score": 0.9}]
    drawn = DetectionTask().visualize(image, detections)
    assert (50, 20) in _red_pixels(drawn)
    assert CaptionTask(tokenizer="simple").visualize(image, "a red circle") is None
