"""Drawing predictions onto images, for ``ofa-lightning predict`` and notebooks."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

Box = Sequence[float]


def draw_boxes(image: Image.Image, boxes: Sequence[Box], labels: Sequence[str] | None = None,
               colour: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    """A copy of ``image`` with each box outlined (pixel coordinates of this image) and its
    label, if any, written at its top-left corner."""
    drawn = image.convert("RGB").copy()
    pen = ImageDraw.Draw(drawn)
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box)
        pen.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=2)
        if labels is not None and labels[i]:
            pen.text((x0 + 2, y0 + 1), labels[i], fill=colour)
    return drawn
