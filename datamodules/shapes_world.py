"""ShapesWorld: the built-in procedural dataset of coloured shapes on a plain background.

Every scene is a pure function of ``(seed, split, index)``: the random generator is
``random.Random(f"shapesworld/{seed}/{split}/{index}")`` (string seeds are hashed with
SHA-512, so this is stable across processes and Python runs; the global RNG is never
touched). A scene holds the rendered image, the objects with tight pixel boxes, and all the
text the OFA tasks need: reference captions, question-answer pairs, referring expressions
with boxes, and plain sentences for text infilling.

The world is small on purpose, so a tiny model learns it on a CPU in minutes:

* shapes   circle, square, triangle, diamond, star       (never rotated)
* colours  red, orange, yellow, green, blue, purple      (saturated, far from the grey background)
* sizes    small (20 % of the image side), large (36 %)
* 1-4 objects per scene (up to 6 allowed), placed at random.

Layout rules keep every answer determinable from the pixels: each object lies fully
inside the image with a one pixel margin, box IoU between any two objects is at most
``max_iou``, an object keeps at least ``min_visible`` of its area visible and its
visible part still spans its whole box, and box centres are at least ``min_separation``
of the image side apart horizontally, so "left of" is never a close call.

Rendering draws at ``supersample`` times the size and box-filters down, so edges are
antialiased; ``pixel_noise`` optionally adds uniform per-pixel noise from its own random
stream, so it changes the pixels and nothing else.

Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates of the final image (``x1`` and
``y1`` exclusive), the convention of :mod:`ofa_lightning.location`: a pixel belongs to
an object when more than half of it is covered by the object's visible shape, and the box
is the tight box of those pixels.

The language is regular: objects are always described as ``[size] [colour] shape`` in
that order, lists of objects run from left to right, and numbers are words
("zero" ... "six"). :data:`WORDS` is the closed set of words the generator can emit.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

from PIL import Image, ImageChops, ImageDraw

__all__ = [
    "SHAPES", "COLOURS", "SIZES", "BACKGROUND", "NUMBER_WORDS", "SPLITS", "WORDS",
    "ShapeObject", "Scene", "ShapesWorld", "describe", "captions_for", "questions_for",
    "referring_for", "sentences_for",
]

Box = tuple[int, int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (245, 230, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "purple": (150, 40, 190),
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTION = {"small": 0.20, "large": 0.36}  # nominal extent, fraction of the image side
BACKGROUND: tuple[int, int, int] = (200, 200, 200)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
MAX_OBJECTS = len(NUMBER_WORDS) - 1
SPLITS: tuple[str, ...] = ("train", "val", "test")

_PLURAL = {shape: shape + "s" for shape in SHAPES}
_FUNCTION_WORDS = (
    "a an and are colour from how is left many of on right shape shapes size the there to "
    "what which yes no leftmost rightmost"
).split()
WORDS: frozenset[str] = frozenset(
    (*SHAPES, *_PLURAL.values(), *COLOURS, *SIZES, *NUMBER_WORDS, *_FUNCTION_WORDS))


# ---------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: its attributes and its tight pixel box ``(x0, y0, x1, y1)``."""

    shape: str
    colour: str
    size: str
    box: Box

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclass
class Scene:
    """A rendered scene and every text the tasks draw from it.

    ``objects`` run from left to right (by box centre). ``questions`` are
    ``(question, answer)`` pairs and ``referring`` are ``(expression, box)`` pairs, each
    expression matching exactly one object.
    """

    id: str
    image: Image.Image
    objects: list[ShapeObject]
    captions: list[str]
    questions: list[tuple[str, str]]
    referring: list[tuple[str, Box]]
    sentences: list[str]

    def texts(self) -> Iterator[str]:
        """Every string of the scene: captions, questions, answers, expressions, sentences."""
        yield from self.captions
        for question, answer in self.questions:
            yield question
            yield answer
        for expression, _ in self.referring:
            yield expression
        yield from self.sentences


# ---------------------------------------------------------------------------- language
def describe(obj: ShapeObject, *, size: bool = True, colour: bool = True) -> str:
    """``"large red circle"``; drop the size or colour with ``size=False``/``colour=False``."""
    words = ([obj.size] if size else []) + ([obj.colour] if colour else []) + [obj.shape]
    return " ".join(words)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count(n: int, noun: str = "shape") -> str:
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else _PLURAL.get(noun, noun + 's')}"


def _unique_names(objects: Sequence[ShapeObject]) -> list[str | None]:
    """The shortest of "shape", "colour shape", "size colour shape" naming each object alone."""
    names: list[str | None] = []
    for obj in objects:
        for keys in (("shape",), ("colour", "shape"), ("size", "colour", "shape")):
            key = tuple(getattr(obj, k) for k in keys)
            if sum(tuple(getattr(o, k) for k in keys) == key for o in objects) == 1:
                names.append(" ".join(key))
                break
        else:
            names.append(None)
    return names


def captions_for(objects: Sequence[ShapeObject]) -> list[str]:
    """Reference captions; ``objects`` must run from left to right."""
    full = [_a(describe(o)) for o in objects]
    short = [_a(describe(o, size=False)) for o in objects]
    n = len(objects)
    if n == 1:
        layout = short[0]
    elif n == 2:
        layout = f"{short[0]} left of {short[1]}"
    else:
        layout = f"{_join(short)} from left to right"
    return [_join(full), _join(short), f"{_count(n)}: {layout}"]


def questions_for(objects: Sequence[ShapeObject], rng: random.Random,
                  shapes: Sequence[str] = SHAPES,
                  colours: Sequence[str] = tuple(COLOURS)) -> list[tuple[str, str]]:
    """Unambiguous question-answer pairs; existence questions are balanced per phrasing.

    ``objects`` must run from left to right; ``shapes`` and ``colours`` are the world's
    vocabulary, from which absent attributes are drawn for "zero" and "no" answers.
    """
    n = len(objects)
    by_colour = Counter(o.colour for o in objects)
    by_shape = Counter(o.shape for o in objects)
    by_pair = Counter((o.colour, o.shape) for o in objects)
    qa: list[tuple[str, str]] = [("how many shapes are there?", NUMBER_WORDS[n])]

    # counting, including one absent colour and one absent shape ("zero")
    absent_colours = [c for c in colours if c not in by_colour]
    absent_shapes = [s for s in shapes if s not in by_shape]
    for colour in sorted(by_colour, key=colours.index) + rng.sample(absent_colours,
                                                                    min(1, len(absent_colours))):
        qa.append((f"how many {colour} shapes are there?", NUMBER_WORDS[by_colour[colour]]))
    for shape in sorted(by_shape, key=shapes.index) + rng.sample(absent_shapes,
                                                                 min(1, len(absent_shapes))):
        qa.append((f"how many {_PLURAL[shape]} are there?", NUMBER_WORDS[by_shape[shape]]))

    # attributes of uniquely named objects
    for obj in objects:
        if by_shape[obj.shape] == 1:
            qa.append((f"what colour is the {obj.shape}?", obj.colour))
        if by_colour[obj.colour] == 1:
            qa.append((f"which shape is {obj.colour}?", obj.shape))
        if by_pair[obj.colour, obj.shape] == 1:
            qa.append((f"what size is the {describe(obj, size=False)}?", obj.size))

    # existence: one "yes" and one "no" per phrasing, so that no phrasing has a prior to
    # learn instead of looking (pooled over phrasings, "is there a <shape>?" used to be
    # 75 % "yes" and the trained model answered "yes" to all of them)
    pairs_absent = [(c, s) for s in shapes for c in colours if (c, s) not in by_pair]
    # a colour and a shape that are both in the scene, not together: only binding tells
    unbound = [(c, s) for c, s in pairs_absent if c in by_colour and s in by_shape]
    phrasings = (
        [(f"is there {_a(c)} shape?", c in by_colour) for c in colours],
        [(f"is there {_a(s)}?", s in by_shape) for s in shapes],
        [(f"is there {_a(c)} {s}?", True) for c, s in by_pair]
        + [(f"is there {_a(c)} {s}?", False) for c, s in (unbound or pairs_absent)],
    )
    for phrasing in phrasings:
        yes = [q for q, present in phrasing if present]
        no = [q for q, present in phrasing if not present]
        if yes and no:
            qa += [(rng.choice(yes), "yes"), (rng.choice(no), "no")]

    # position
    if n >= 2:
        for side, obj in (("left", objects[0]), ("right", objects[-1])):
            where = f"on the {side}" if n == 2 else f"{side}most"
            qa.append((f"which shape is {where}?", obj.shape))
            the = f"the shape on the {side}" if n == 2 else f"the {side}most shape"
            qa.append((f"what colour is {the}?", obj.colour))
    names = _unique_names(objects)
    for i in range(n):
        for j in range(i + 1, n):
            if names[i] is None or names[j] is None:
                continue
            a, b, answer = (i, j, "yes") if rng.random() < 0.5 else (j, i, "no")
            qa.append((f"is the {names[a]} left of the {names[b]}?", answer))
    return qa


def referring_for(objects: Sequence[ShapeObject]) -> list[tuple[str, Box]]:
    """Every phrasing from a fixed set that picks out exactly one object, with its box."""
    templates = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"),
                 ("size", "colour", "shape"))
    out: list[tuple[str, Box]] = []
    for obj in objects:
        for keys in templates:
            key = tuple(getattr(obj, k) for k in keys)
            if sum(tuple(getattr(o, k) for k in keys) == key for o in objects) != 1:
                continue
            words = [getattr(obj, k) for k in keys] + ([] if "shape" in keys else ["shape"])
            out.append(("the " + " ".join(words), obj.box))
    if len(objects) == 2:
        out += [("the shape on the left", objects[0].box),
                ("the shape on the right", objects[1].box)]
    elif len(objects) > 2:
        out += [("the leftmost shape", objects[0].box),
                ("the rightmost shape", objects[-1].box)]
    return out


def sentences_for(objects: Sequence[ShapeObject]) -> list[str]:
    """Plain true statements about the scene, for text infilling."""
    n = len(objects)
    out = [f"there {'is' if n == 1 else 'are'} {_count(n)}."]
    out += [f"there is {_a(describe(o))}." for o in objects]
    names = _unique_names(objects)
    for obj, name in zip(objects, names):
        if name is not None:
            out.append(f"the {name} is {obj.size} and {obj.colour}.")
    for i in range(n - 1):
        if names[i] is not None and names[i + 1] is not None:
            out.append(f"the {names[i]} is left of the {names[i + 1]}.")
    return out


# ---------------------------------------------------------------------------- geometry
def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape centred at ``(cx, cy)`` with half-extent ``r``; ``None`` = circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":  # five points up, as large as fits in the 2r x 2r box
        outer = r / math.sin(2 * math.pi / 5)  # width 2 * outer * sin(72 deg) = 2r
        top = cy - outer * (1 + math.cos(math.pi / 5)) / 2  # centred vertically
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else outer * 0.5
            angle = math.pi * k / 5
            points.append((cx + radius * math.sin(angle), top + outer - radius * math.cos(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ---------------------------------------------------------------------------- the world
@dataclass
class ShapesWorld:
    """A deterministic, infinite source of :class:`Scene` s.

    ``scene(i)`` is the i-th training scene; ``split("val", n)`` and ``split("test", n)``
    are fixed lists drawn from their own generator streams, so they never coincide with
    training scenes.
    """

    seed: int
    image_size: int = 64          # side of the square image, in pixels
    min_objects: int = 1
    max_objects: int = 4
    shapes: Sequence[str] = SHAPES
    colours: Sequence[str] = tuple(COLOURS)
    # rendering
    supersample: int = 4          # draw at this multiple, then box-filter down (antialiasing)
    pixel_noise: int = 0          # amplitude of uniform per-pixel noise, 0 = flat colours
    # layout rules
    max_iou: float = 0.3          # between any two object boxes
    min_visible: float = 0.8      # fraction of an object's area left uncovered
    min_separation: float = 0.08  # horizontal gap between box centres, fraction of image side
    max_attempts: int = 200       # layouts tried before giving up on a scene

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got "
                             f"min_objects={self.min_objects}, max_objects={self.max_objects}")
        for name, chosen, known in (("shapes", self.shapes, SHAPES),
                                    ("colours", self.colours, tuple(COLOURS))):
            bad = [x for x in chosen if x not in known]
            if bad or len(set(chosen)) != len(chosen) or len(chosen) < 2:
                raise ValueError(f"{name} must be at least two distinct names from "
                                 f"{', '.join(known)}; got {list(chosen)}")
        self.shapes, self.colours = tuple(self.shapes), tuple(self.colours)
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        if not 0 <= self.pixel_noise <= 32:
            raise ValueError(f"pixel_noise must be in [0, 32], got {self.pixel_noise}")
        if not 0.0 <= self.max_iou < 1.0 or not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"need 0 <= max_iou < 1 and 0 < min_visible <= 1, got "
                             f"max_iou={self.max_iou}, min_visible={self.min_visible}")
        if not 0.0 <= self.min_separation * (self.max_objects - 1) <= 0.5:
            raise ValueError(f"min_separation={self.min_separation} leaves no room for "
                             f"max_objects={self.max_objects} objects; use at most "
                             f"{0.5 / max(1, self.max_objects - 1):.3f}")

    # ------------------------------------------------------------------ public API
    def scene(self, index: int, split: str = "train") -> Scene:
        """Scene ``index`` of ``split``: the same pixels and text on every call and machine."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        rng = random.Random(f"shapesworld/{self.seed}/{split}/{index}")
        # the number of objects is drawn once and what they are rarely redrawn (after 50
        # failed layouts, in crowded scenes), so rejected layouts barely bias the scene
        # towards fewer or smaller objects
        n = rng.randint(self.min_objects, self.max_objects)
        for attempt in range(self.max_attempts):
            if attempt % 50 == 0:
                things = [(rng.choice(self.shapes), rng.choice(self.colours), rng.choice(SIZES))
                          for _ in range(n)]
            layout = self._layout(things, rng)
            drawn = self._render(layout) if layout is not None else None
            if drawn is not None:
                break
        else:  # only reachable with extreme layout settings
            raise RuntimeError(f"no valid layout for scene {index} of {split!r} in "
                               f"{self.max_attempts} attempts; relax max_iou, min_visible, "
                               f"min_separation or max_objects")
        image, objects = drawn
        if self.pixel_noise:  # its own stream: the noise level changes no object and no text
            amp, s = self.pixel_noise, self.image_size
            noise = random.Random(f"shapesworld/{self.seed}/{split}/{index}/noise")
            grain = Image.frombytes("RGB", (s, s), noise.randbytes(s * s * 3))
            image = ImageChops.add(image, grain.point(lambda v: v * 2 * amp // 255), 1.0, -amp)
        return Scene(
            id=f"shapesworld-{self.seed}-{split}-{index}",
            image=image,
            objects=objects,
            captions=captions_for(objects),
            questions=questions_for(objects, rng, self.shapes, self.colours),
            referring=referring_for(objects),
            sentences=sentences_for(objects),
        )

    def train_stream(self, start: int = 0) -> Iterator[Scene]:
        """Training scenes ``start, start + 1, ...`` without end."""
        index = start
        while True:
            yield self.scene(index)
            index += 1

    def split(self, name: str, size: int) -> list[Scene]:
        """The first ``size`` scenes of the held-out split ``name`` ("val" or "test")."""
        if name not in ("val", "test"):
            raise ValueError(f"held-out split must be 'val' or 'test', got {name!r}; "
                             f"training scenes come from scene(i) or train_stream()")
        return [self.scene(i, name) for i in range(size)]

    def all_text(self, num_scenes: int, split: str = "train") -> Iterator[str]:
        """Every string of the first ``num_scenes`` scenes of ``split`` (to fit a tokenizer)."""
        for i in range(num_scenes):
            yield from self.scene(i, split).texts()

    # ------------------------------------------------------------------ generation
    def _layout(self, things: Sequence[tuple[str, str, str]], rng: random.Random
                ) -> list[tuple[str, str, str, float, float, float]] | None:
        """Nominal geometry ``(shape, colour, size, cx, cy, r)`` in final pixels, or ``None``.

        Objects go on one at a time at random positions that keep the nominal boxes inside
        the image and apart; ``None`` when one of them finds no place.
        """
        s = self.image_size
        placed: list[tuple[str, str, str, float, float, float]] = []
        for shape, colour, size in things:
            r = SIZE_FRACTION[size] * s / 2 * rng.uniform(0.92, 1.08)
            for _ in range(20):
                cx, cy = rng.uniform(r + 1.5, s - r - 1.5), rng.uniform(r + 1.5, s - r - 1.5)
                box = (cx - r, cy - r, cx + r, cy + r)
                if all(abs(cx - p[3]) >= self.min_separation * s
                       and _iou(box, (p[3] - p[5], p[4] - p[5], p[3] + p[5], p[4] + p[5]))
                       <= self.max_iou for p in placed):
                    placed.append((shape, colour, size, cx, cy, r))
                    break
            else:
                return None
        return placed

    def _render(self, layout: list[tuple[str, str, str, float, float, float]]
                ) -> tuple[Image.Image, list[ShapeObject]] | None:
        """Draw a layout; ``None`` when a layout rule fails on the drawn pixels."""
        s, f = self.image_size, self.supersample
        hi = s * f
        # large shapes first, so small ones sit on top and stay visible
        order = sorted(range(len(layout)), key=lambda i: layout[i][2] != "large")
        canvas = Image.new("RGB", (hi, hi), BACKGROUND)
        paint = ImageDraw.Draw(canvas)
        masks: list[Image.Image] = []
        for i in order:  # the same rasteriser call on the canvas and on the object's mask
            shape, colour, _, cx, cy, r = layout[i]
            mask = Image.new("L", (hi, hi), 0)
            outline = _outline(shape, cx * f, cy * f, r * f)
            for draw, fill in ((paint, COLOURS[colour]), (ImageDraw.Draw(mask), 255)):
                if outline is None:
                    draw.ellipse((f * (cx - r), f * (cy - r), f * (cx + r) - 1,
                                  f * (cy + r) - 1), fill=fill)
                else:
                    draw.polygon(outline, fill=fill)
            masks.append(mask)

        objects: list[ShapeObject] = []
        above = Image.new("L", (hi, hi), 0)  # union of the masks drawn later
        for k in range(len(order) - 1, -1, -1):
            # work in the object's neighbourhood, aligned to the final pixel grid
            cx, cy, r = layout[order[k]][3:]
            x0, y0 = max(0, math.floor(cx - r) - 1), max(0, math.floor(cy - r) - 1)
            x1, y1 = min(s, math.ceil(cx + r) + 1), min(s, math.ceil(cy + r) + 1)
            region = (x0 * f, y0 * f, x1 * f, y1 * f)
            full = masks[k].crop(region)
            visible = ImageChops.subtract(full, above.crop(region))
            above = ImageChops.lighter(above, masks[k])
            area, seen = full.histogram()[255], visible.histogram()[255]
            if area == 0 or seen < self.min_visible * area:
                return None
            if f > 1:
                full, visible = full.reduce(f), visible.reduce(f)
            half = Image.new("L", full.size, 128)  # coverage above half: the object's pixel
            box = ImageChops.subtract(full, half).getbbox()
            if box is None or box != ImageChops.subtract(visible, half).getbbox():
                return None
            shape, colour, size = layout[order[k]][:3]
            box = (box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0)
            objects.append(ShapeObject(shape, colour, size, box))

        objects.sort(key=lambda o: o.centre[0])
        for a, b in zip(objects, objects[1:]):
            if b.centre[0] - a.centre[0] < self.min_separation * s:
                return None
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                if _iou(a.box, b.box) > self.max_iou:
                    return None
        image = canvas.reduce(f) if f > 1 else canvas
        return image, objects
