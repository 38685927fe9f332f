"""ShapesWorld: determinism, disjoint splits, boxes checked on the pixels, and every text
re-derived from the objects by an interpreter written here, independently of the generator."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datamodules.shapes_world import (BACKGROUND, COLOURS, NUMBER_WORDS, SHAPES, SIZES, WORDS,
                                      Scene, ShapeObject, ShapesWorld)

REPO = Path(__file__).resolve().parents[1]
NUM_SCENES = 300


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=7)


@pytest.fixture(scope="module")
def scenes(world: ShapesWorld) -> list[Scene]:
    return [world.scene(i) for i in range(NUM_SCENES)]


def fingerprint(scene: Scene) -> str:
    digest = hashlib.sha256(scene.image.tobytes())
    digest.update(repr((scene.objects, list(scene.texts()), scene.referring)).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- an independent interpreter
def centre_x(obj: ShapeObject) -> float:
    return (obj.box[0] + obj.box[2]) / 2


def select(phrase: str, objects: list[ShapeObject]) -> list[ShapeObject]:
    """Objects a noun phrase ("the large red circle", "the shape on the left") denotes."""
    words = phrase.removeprefix("the ").split()
    by_x = sorted(objects, key=centre_x)
    if phrase in ("the shape on the left", "the shape on the right"):
        assert len(objects) == 2, f"{phrase!r} asked of {len(objects)} objects"
        return [by_x[0] if words[-1] == "left" else by_x[-1]]
    if phrase in ("the leftmost shape", "the rightmost shape"):
        assert len(objects) > 2, f"{phrase!r} asked of {len(objects)} objects"
        return [by_x[0] if words[0] == "leftmost" else by_x[-1]]
    found = list(objects)
    for word in words:
        if word in SIZES:
            found = [o for o in found if o.size == word]
        elif word in COLOURS:
            found = [o for o in found if o.colour == word]
        elif word in SHAPES:
            found = [o for o in found if o.shape == word]
        else:
            assert word == "shape", f"unknown word {word!r} in {phrase!r}"
    return found


def the(phrase: str, objects: list[ShapeObject]) -> ShapeObject:
    found = select(phrase, objects)
    assert len(found) == 1, f"{phrase!r} matches {len(found)} objects: {objects}"
    return found[0]


EXISTENCE = re.compile(r"is there an? (\w+)(?: (\w+))?\?")  # "is there a red circle?"


def answer(question: str, objects: list[ShapeObject]) -> str:
    """The answer to a question, recomputed from the objects alone."""
    n = len(objects)
    plural = {s + "s": s for s in SHAPES}
    if m := re.fullmatch(r"how many (?:(\w+) )?(shapes|\w+) are there\?", question):
        colour, noun = m.groups()
        found = select(f"the {colour} shape", objects) if colour else (
            objects if noun == "shapes" else select(f"the {plural[noun]}", objects))
        return NUMBER_WORDS[len(found)]
    if m := EXISTENCE.fullmatch(question):
        return "yes" if select("the " + " ".join(w for w in m.groups() if w), objects) else "no"
    if m := re.fullmatch(r"is (.+) left of (.+)\?", question):
        return "yes" if centre_x(the(m[1], objects)) < centre_x(the(m[2], objects)) else "no"
    if m := re.fullmatch(r"which shape is (on the left|on the right|leftmost|rightmost)\?",
                         question):
        side = "left" if "left" in m[1] else "right"
        phrase = f"the shape on the {side}" if m[1].startswith("on") else f"the {side}most shape"
        return the(phrase, objects).shape
    if m := re.fullmatch(r"which shape is (\w+)\?", question):
        assert m[1] in COLOURS
        return the(f"the {m[1]} shape", objects).shape
    if m := re.fullmatch(r"what colour is (.+)\?", question):
        return the(m[1], objects).colour
    if m := re.fullmatch(r"what size is (.+)\?", question):
        return the(m[1], objects).size
    raise AssertionError(f"question outside the grammar: {question!r} ({n} objects)")


# ---------------------------------------------------------------- determinism and splits
def test_same_seed_and_index_give_identical_scenes(world: ShapesWorld) -> None:
    again = ShapesWorld(seed=7)
    for i in (0, 1, 17, 999):
        assert fingerprint(world.scene(i)) == fingerprint(again.scene(i))
    assert fingerprint(world.scene(3)) != fingerprint(world.scene(4))
    assert fingerprint(world.scene(3)) != fingerprint(ShapesWorld(seed=8).scene(3))


def test_scenes_are_identical_in_another_process(world: ShapesWorld) -> None:
    code = ("from datamodules.shapes_world import ShapesWorld; import hashlib; "
            "s = ShapesWorld(seed=7).scene(5); "
            "print(hashlib.sha256(s.image.tobytes()).hexdigest(), s.captions[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123"}).stdout.split(maxsplit=1)
    scene = world.scene(5)
    assert out == [hashlib.sha256(scene.image.tobytes()).hexdigest(), scene.captions[0] + "\n"]


def test_train_stream_matches_scene(world: ShapesWorld) -> None:
    stream = world.train_stream(start=10)
    for i in range(10, 14):
        assert fingerprint(next(stream)) == fingerprint(world.scene(i))


def test_val_and_test_are_disjoint_from_train_and_each_other(world: ShapesWorld,
                                                              scenes: list[Scene]) -> None:
    val, test = world.split("val", 100), world.split("test", 100)
    assert [s.id for s in world.split("val", 3)] == [s.id for s in val[:3]]
    pixels = {split: {hashlib.sha256(s.image.tobytes()).hexdigest() for s in group}
              for split, group in (("train", scenes), ("val", val), ("test", test))}
    assert len(pixels["val"]) == len(pixels["test"]) == 100
    assert not pixels["train"] & pixels["val"]
    assert not pixels["train"] & pixels["test"]
    assert not pixels["val"] & pixels["test"]
    ids = [s.id for s in scenes + val + test]
    assert len(set(ids)) == len(ids)


# ---------------------------------------------------------------- geometry on the pixels
def coverage(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """How much of each pixel a colour covers: the pixel is read as a blend
    ``a * colour + b * other + (1 - a - b) * background`` with ``other`` the palette colour
    that fits best (an antialiased edge over another shape), and ``a`` is returned."""
    bg = np.array(BACKGROUND, dtype=float)
    obj = np.array(rgb, dtype=float) - bg
    target = pixels - bg  # (H, W, 3)
    best = np.zeros(pixels.shape[:2])
    for other in COLOURS.values():
        if tuple(other) == tuple(rgb):
            continue
        basis = np.stack([obj, np.array(other, dtype=float) - bg], axis=1)  # (3, 2)
        ab = target @ basis @ np.linalg.inv(basis.T @ basis)  # (H, W, 2) least squares
        residual = np.linalg.norm(target - ab @ basis.T, axis=-1)
        a, b = ab[..., 0], ab[..., 1]
        fits = (residual < 20) & (a > -0.05) & (b > -0.05) & (a + b < 1.05)
        best = np.maximum(best, np.where(fits, a, 0))
    return best


def test_boxes_are_inside_and_tight_on_the_rendered_image() -> None:
    size = 64
    world = ShapesWorld(seed=3, image_size=size)
    for i in range(200):
        scene = world.scene(i)
        assert scene.image.mode == "RGB" and scene.image.size == (size, size)
        pixels = np.asarray(scene.image, dtype=float)  # (H, W, 3)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, obj
            covered = coverage(pixels, obj.rgb)
            inside = covered[y0:y1, x0:x1]
            assert (inside > 0.9).sum() >= 0.25 * inside.size, (scene.id, obj)
            # tight: every edge row and column of the box is half covered somewhere
            for edge in (inside[0], inside[-1], inside[:, 0], inside[:, -1]):
                assert edge.max() > 0.45, (scene.id, obj, edge.max())
            # nothing of this colour outside the boxes of objects of this colour (give or
            # take a pixel: two edges of the same colour can meet in one full pixel)
            outside = covered > 0.9
            for other in scene.objects:
                if other.colour == obj.colour:
                    a0, b0, a1, b1 = other.box
                    outside[max(0, b0 - 1):b1 + 1, max(0, a0 - 1):a1 + 1] = False
            assert not outside.any(), (scene.id, obj)


def test_pixel_noise_only_changes_pixels() -> None:
    plain, noisy = ShapesWorld(seed=3), ShapesWorld(seed=3, pixel_noise=8)
    for i in range(20):
        a, b = plain.scene(i), noisy.scene(i)
        assert (a.objects, list(a.texts()), a.referring) == (b.objects, list(b.texts()),
                                                             b.referring)
        diff = np.asarray(b.image, dtype=int) - np.asarray(a.image, dtype=int)
        assert np.abs(diff).max() <= 8 and diff.std() > 2


def test_colours_are_far_apart() -> None:
    palette = [np.array(c, dtype=float) for c in [*COLOURS.values(), BACKGROUND]]
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(palette) for b in palette[i + 1:]]
    assert min(gaps) > 90


def test_layout_rules_hold(scenes: list[Scene]) -> None:
    def iou(a, b) -> float:
        w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
        return w * h / (area(a) + area(b) - w * h)

    extents = {size: [] for size in SIZES}
    for scene in scenes:
        objs = scene.objects
        assert [centre_x(o) for o in objs] == sorted(centre_x(o) for o in objs)
        for i, a in enumerate(objs):
            extents[a.size].append(max(a.box[2] - a.box[0], a.box[3] - a.box[1]))
            for b in objs[i + 1:]:
                assert iou(a.box, b.box) <= 0.3, scene.id
                assert abs(centre_x(a) - centre_x(b)) >= 0.08 * 64, scene.id
    assert max(extents["small"]) < min(extents["large"])  # size is visible


def test_object_counts_cover_the_range(scenes: list[Scene]) -> None:
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}
    assert min(counts.values()) > NUM_SCENES / 4 * 0.6  # rejected layouts do not skew n


# ---------------------------------------------------------------- text
def test_every_answer_is_correct_and_every_question_unambiguous(scenes: list[Scene]) -> None:
    kinds = Counter()
    for scene in scenes:
        assert len({q for q, _ in scene.questions}) == len(scene.questions), scene.id
        for question, given in scene.questions:
            assert given == answer(question, scene.objects), (scene.id, question, scene.objects)
            kinds[question.split()[0]] += 1
    assert set(kinds) == {"how", "is", "what", "which"}


def existence_phrasing(question: str) -> str | None:
    """"colour", "shape" or "colour shape" for an existence question, else None."""
    m = EXISTENCE.fullmatch(question)
    if m is None:
        return None
    return "colour shape" if m[2] and m[2] != "shape" else \
        "colour" if m[2] == "shape" else "shape"


def test_existence_answers_are_balanced_within_each_phrasing(world: ShapesWorld) -> None:
    answers: dict[str, Counter] = {}
    for i in range(500):
        for q, a in world.scene(i).questions:
            if (phrasing := existence_phrasing(q)) is not None:
                answers.setdefault(phrasing, Counter())[a] += 1
    assert set(answers) == {"colour", "shape", "colour shape"}
    for phrasing, counts in answers.items():
        assert counts["yes"] == counts["no"] > 300, (phrasing, counts)


def test_absent_colour_shape_pairs_are_of_present_attributes_when_possible(
        world: ShapesWorld) -> None:
    """"is there a red circle?" -> "no" with red and a circle in the scene, where it can
    be: neither attribute alone then answers it."""
    hard = possible = 0
    for i in range(300):
        objects = world.scene(i).objects
        colours, shapes = {o.colour for o in objects}, {o.shape for o in objects}
        pairs = {(o.colour, o.shape) for o in objects}
        if not any((c, s) not in pairs for c in colours for s in shapes):
            continue
        possible += 1
        for q, a in world.scene(i).questions:
            if existence_phrasing(q) == "colour shape" and a == "no":
                colour, shape = EXISTENCE.fullmatch(q).groups()
                hard += colour in colours and shape in shapes
    assert possible > 50 and hard == possible


def test_left_of_answers_are_mixed(scenes: list[Scene]) -> None:
    answers = Counter(a for s in scenes for q, a in s.questions if q.startswith("is the"))
    assert 0.35 <= answers["yes"] / (answers["yes"] + answers["no"]) <= 0.65, answers


def test_referring_expressions_pick_out_exactly_one_object(scenes: list[Scene]) -> None:
    for scene in scenes:
        assert scene.referring, scene.id
        for expression, box in scene.referring:
            assert the(expression, scene.objects).box == box, (scene.id, expression)
        referred = {box for _, box in scene.referring}
        assert len(referred) >= min(len(scene.objects), 2), scene.id


def test_captions_mention_every_object(scenes: list[Scene]) -> None:
    for scene in scenes:
        objs = scene.objects
        full, short, counted = scene.captions
        phrases = [f"{o.size} {o.colour} {o.shape}" for o in objs]
        for caption, expected in ((full, phrases),
                                  (short, [f"{o.colour} {o.shape}" for o in objs])):
            found = re.findall(r"\ban? ((?:\w+ )*?(?:" + "|".join(SHAPES) + r"))\b", caption)
            assert found == expected, (caption, objs)  # every object, left to right
        n = len(objs)
        assert counted.startswith(f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: ")
        assert all(f"{o.colour} {o.shape}" in counted for o in objs)


def test_sentences_are_true(scenes: list[Scene]) -> None:
    for scene in scenes:
        objs = scene.objects
        for sentence in scene.sentences:
            if m := re.fullmatch(r"there (?:is|are) (\w+) shapes?\.", sentence):
                assert m[1] == NUMBER_WORDS[len(objs)]
            elif m := re.fullmatch(r"there is an? (.+)\.", sentence):
                assert select("the " + m[1], objs), sentence
            elif m := re.fullmatch(r"(the .+) is (\w+) and (\w+)\.", sentence):
                obj = the(m[1], objs)
                assert (obj.size, obj.colour) == (m[2], m[3]), sentence
            elif m := re.fullmatch(r"(the .+) is left of (the .+)\.", sentence):
                assert centre_x(the(m[1], objs)) < centre_x(the(m[2], objs)), sentence
            else:
                raise AssertionError(f"sentence outside the grammar: {sentence!r}")


def test_all_text_uses_the_closed_vocabulary(world: ShapesWorld) -> None:
    texts = list(world.all_text(50))
    assert texts[:3] == world.scene(0).captions
    assert {"yes", "no"} <= set(texts)
    used = {w for t in texts for w in re.findall(r"[a-z]+", t)}
    assert used <= WORDS, used - WORDS
    assert not re.search(r"[^a-z ,:.?]", "".join(texts))


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("kwargs, field", [
    ({"image_size": 16}, "image_size"),
    ({"min_objects": 0}, "min_objects"),
    ({"max_objects": 9}, "max_objects"),
    ({"shapes": ("circle", "hexagon")}, "shapes"),
    ({"colours": ("red",)}, "colours"),
    ({"max_iou": 1.5}, "max_iou"),
    ({"pixel_noise": 200}, "pixel_noise"),
])
def test_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ShapesWorld(seed=0, **kwargs)


def test_bad_split_and_index(world: ShapesWorld) -> None:
    with pytest.raises(ValueError, match="'val' or 'test'"):
        world.split("train", 3)
    with pytest.raises(ValueError, match="known splits"):
        world.scene(0, "dev")
    with pytest.raises(ValueError, match=">= 0"):
        world.scene(-1)


def test_subsets_and_sizes() -> None:
    world = ShapesWorld(seed=1, image_size=96, min_objects=3, max_objects=5,
                        shapes=("circle", "square"), colours=("red", "blue"))
    for i in range(30):
        scene = world.scene(i)
        assert scene.image.size == (96, 96)
        assert 3 <= len(scene.objects) <= 5
        assert {o.shape for o in scene.objects} <= {"circle", "square"}
        assert {o.colour for o in scene.objects} <= {"red", "blue"}
        for question, given in scene.questions:
            assert given == answer(question, scene.objects)


def test_speed(world: ShapesWorld) -> None:
    start = time.perf_counter()
    for i in range(10_000, 10_300):
        world.scene(i)
    rate = 300 / (time.perf_counter() - start)
    print(f"\nShapesWorld: {rate:.0f} scenes/s at 64 px")  # informative; no wall-clock assert
    assert rate > 0
