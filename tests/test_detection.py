"""The detection task and its metric: official prompt and ids, box round trips, flip
augmentation, lenient decoding, record errors, hand-computed mAP/precision/recall, DDP
equality, and predictions of a small random model end to end."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from datamodules.shapes_world import ShapesWorld
from datamodules.sources import ShapesWorldSource
from ofa_lightning.data import collate
from ofa_lightning.generation import generate
from ofa_lightning.metrics.detection import (
    DetectionMetrics,
    average_precision,
    emission_order_scores,
    label_key,
)
from ofa_lightning.task import RecordError, SampleContext
from ofa_lightning.vocab import UnifiedVocab
from tasks.detection import DetectionTask

IMAGE_SIZE = 64


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vocab() -> UnifiedVocab:
    return UnifiedVocab.train(ShapesWorld(seed=11).all_text(40), vocab_size=512, num_codes=64)


@pytest.fixture(scope="module")
def context(vocab: UnifiedVocab) -> SampleContext:
    return SampleContext(vocab, IMAGE_SIZE)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    source = ShapesWorldSource("detection", seed=5, val_size=6)
    return [dict(r) for r in source.records("val")]


class FakeSource:
    def records(self, split: str):
        return iter(())

    def describe(self) -> str:
        return "FakeSource(/data/det.tsv)"


def image(width: int = 40, height: int = 30, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def half_bin(image_size: int, ratio: float, vocab: UnifiedVocab) -> float:
    """Largest round-trip error of one coordinate, in original pixels."""
    return image_size / (vocab.num_bins - 1) / 2 / ratio + 1e-3


# ---------------------------------------------------------------------- prompt and ids
def test_instruction_name_and_defaults():
    task = DetectionTask()
    assert DetectionTask.instruction == " what are the objects in the image?"
    assert DetectionTask.name == "detection" and task.query_field is None
    generation = task.generation
    # greedy; budget 20 objects * (4 bins + 8 label tokens); at least one box + label token
    assert (generation.beam, generation.max_len_a, generation.max_len_b, generation.min_len,
            generation.no_repeat_ngram_size) == (1, 0.0, 240, 5, 0)
    assert DetectionTask(max_objects=3, max_label_tokens=2).generation.max_len_b == 18
    assert DetectionTask(generation={"max_len_b": 7, "beam": 3}).generation.max_len_b == 7
    info = task.describe()
    assert info["class_path"] == "tasks.detection.DetectionTask"
    assert info["metrics"] == ["detection"] and info["fields"] == ["image", "objects"]


def test_sample_has_the_official_ids(official_vocab):
    size = 512
    ctx = SampleContext(official_vocab, size)
    boxes = [(100.0, 50.0, 300.0, 390.0), (10.0, 20.0, 630.0, 470.0)]  # no rounding ties
    record = {"id": "d1", "image": image(640, 480),
              "objects": [{"box": boxes[0], "label": "person"},
                          {"box": boxes[1], "label": "dining table"}]}
    sample = DetectionTask().build_sample(record, ctx, train=False)
    source = sample.source.tolist()
    assert official_vocab.decode(sample.source) == " what are the objects in the image?"
    # ids shared with the caption prompt (tests/test_tasks.py): " what" ... " image" "?"
    assert source[:2] == [0, 99] and source[-4:] == [5, 2274, 116, 2]
    target: list[int] = []
    for box, label in zip(boxes, ["person", "dining table"]):
        w, h = size / 640, size / 480
        resized = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
        target += [58457 + round(c / size * 999) for c in resized]  # the official bin ids
        # the official string " ".join([bins..., bpe(" label")]) looked up symbol by symbol
        target += official_vocab.encode(f" {label}")
    assert sample.target.tolist() == target + [2]
    assert sample.prev_output.tolist() == [0] + target
    assert official_vocab.encode(" person") != official_vocab.encode("person")  # the space counts
    assert sample.weight == 2.0
    assert sample.meta["boxes"] == [list(b) for b in boxes]
    assert sample.meta["labels"] == ["person", "dining table"]
    assert sample.meta["image_size"] == (640, 480) and sample.meta["flipped"] is False


# ---------------------------------------------------------------------- round trips
def test_shapes_world_round_trip(records, context):
    task = DetectionTask()
    vocab = context.vocab
    for record in records:
        sample = task.build_sample(record, context, train=False)
        decoded = task.decode(sample.target, vocab, sample.meta)
        assert [d["label"] for d in decoded] == [o["label"] for o in record["objects"]]
        tolerance = half_bin(IMAGE_SIZE, 1.0, vocab)
        for d, obj in zip(decoded, record["objects"]):
            assert max(abs(a - b) for a, b in zip(d["box"], obj["box"])) <= tolerance, (d, obj)
        # no generation scores: ranked by order of emission
        assert [d["score"] for d in decoded] == pytest.approx(
            emission_order_scores(len(decoded)).tolist())


@pytest.mark.parametrize("image_size", [64, 480])
def test_round_trip_on_a_non_square_image(vocab, image_size):
    ctx = SampleContext(vocab, image_size)
    task = DetectionTask()
    width, height = 300, 170
    generator = torch.Generator().manual_seed(0)
    objects = []
    labels = ["small red circle", "large blue square", "small green star", "large yellow circle",
              "small red square"]
    for label in labels:
        x = (torch.rand(2, generator=generator).sort().values * width).tolist()
        y = (torch.rand(2, generator=generator).sort().values * height).tolist()
        objects.append({"box": [x[0], y[0], x[1] + 1e-3, y[1] + 1e-3], "label": label})
    objects.append({"box": [0, 0, width, height], "label": "large blue star"})
    sample = task.build_sample({"id": 0, "image": image(width, height), "objects": objects}, ctx,
                               train=False)
    last = sample.target[-(4 + len(vocab.encode(" large blue star")) + 1):]  # bins, label, eos
    assert vocab.bin_index(last[:4]).tolist() == [0, 0, 999, 999]  # the whole bin range
    decoded = task.decode(sample.target, vocab, sample.meta)
    w_tol = half_bin(image_size, image_size / width, vocab)
    h_tol = half_bin(image_size, image_size / height, vocab)
    assert [d["label"] for d in decoded] == [o["label"] for o in objects]
    for d, obj in zip(decoded, objects):
        error = [abs(a - b) for a, b in zip(d["box"], obj["box"])]
        assert error[0] <= w_tol and error[2] <= w_tol and error[1] <= h_tol and error[3] <= h_tol


def test_loss_weight(context, records):
    record = records[0]
    assert DetectionTask().build_sample(record, context, train=True).weight == 2.0
    sample = DetectionTask(loss_weight=0.5).build_sample(record, context, train=True)
    assert sample.weight == 0.5
    assert collate([sample], context.vocab.pad).weights.tolist() == [0.5]
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="loss_weight"):
            DetectionTask(loss_weight=bad)
    with pytest.raises(ValueError, match="max_objects"):
        DetectionTask(max_objects=0)
    with pytest.raises(ValueError, match="max_label_tokens"):
        DetectionTask(max_label_tokens=1.5)


# ---------------------------------------------------------------------- flip augmentation
def test_hflip_mirrors_image_and_boxes_together(vocab):
    ctx = SampleContext(vocab, IMAGE_SIZE)
    picture = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    picture.paste((255, 0, 0), (4, 10, 20, 30))  # a red box on the left, x 4..20, y 10..30
    record = {"id": "f", "image": picture,
              "objects": [{"box": [4, 10, 20, 30], "label": "red box"}]}
    task = DetectionTask(hflip=True)
    random.seed(0)
    samples = [task.build_sample(record, ctx, train=True) for _ in range(30)]
    flipped = [s for s in samples if s.meta["flipped"]]
    kept = [s for s in samples if not s.meta["flipped"]]
    assert flipped and kept  # p = 0.5 each way: 30 draws see both
    for sample in flipped:
        assert sample.meta["boxes"] == [[44, 10, 60, 30]]  # [W - x1, y0, W - x0, y1]
        decoded = task.decode(sample.target, vocab, sample.meta)[0]
        assert decoded["box"] == pytest.approx([44, 10, 60, 30], abs=half_bin(IMAGE_SIZE, 1, vocab))
        red = sample.image[0] > 0.5  # (H, W): the red channel, normalised to [-1, 1]
        assert red[20, 52] and not red[20, 12]  # the red box is now on the right
    for sample in kept:
        assert sample.meta["boxes"] == [[4, 10, 20, 30]]
        assert sample.image[0][20, 12] > 0.5 and not sample.image[0][20, 52] > 0.5
    # never at evaluation, never without the flag
    assert not any(task.build_sample(record, ctx, train=False).meta["flipped"] for _ in range(10))
    plain = DetectionTask()
    assert not any(plain.build_sample(record, ctx, train=True).meta["flipped"] for _ in range(10))


# ---------------------------------------------------------------------- lenient decoding
def test_decode_drops_malformed_groups(vocab):
    task = DetectionTask()
    meta = {"max_image_size": IMAGE_SIZE, "ratios": (1.0, 1.0)}
    b = vocab.bin_id
    red, circle = vocab.encode(" red circle")[:1], vocab.encode(" circle")
    good = [b(0), b(100), b(999), b(500)] + red
    good_box = [0.0, 100 / 999 * 64, 64.0, 500 / 999 * 64]

    def labels(tokens):
        return [d["label"] for d in task.decode(torch.tensor(tokens), vocab, meta)]

    assert task.decode(torch.tensor(good + [vocab.eos]), vocab, meta)[0]["box"] == \
        pytest.approx(good_box)
    assert labels([vocab.eos]) == [] and labels([]) == []
    assert labels(good + [vocab.eos] + [b(1)] * 4 + circle) == ["red"]  # after eos: ignored
    assert labels([b(1), b(2), b(3)] + circle + good) == ["red"]  # three bins
    assert labels([b(1)] * 5 + circle + good) == ["red"]  # five bins
    assert labels(circle + good) == ["red"]  # a label with no box
    assert labels(good + [b(1), b(2), b(3), b(4)]) == ["red"]  # a box with no label (end)
    assert labels([b(1)] * 4 + good) == []  # a box with no label, then a box: 8 bins in a row
    assert labels([b(1)] * 4 + circle + [b(1)] * 4 + good) == ["circle"]  # 8 bins, then red
    assert labels([b(1)] * 4 + [vocab.code_id(3)] + circle + good) == ["red"]  # a code inside
    assert labels(good + [b(1)] * 4 + circle[:1] + [vocab.unk]) == ["red"]  # unk in a label
    assert labels(good + [b(1)] * 4 + circle) == ["red", "circle"]
    # inverted corners are kept: the model said it, the metric counts a false positive
    inverted = task.decode(torch.tensor([b(9), b(9), b(1), b(1)] + circle), vocab, meta)
    assert len(inverted) == 1 and inverted[0]["box"][2] < inverted[0]["box"][0]


def test_decode_scores_objects_by_their_token_log_probs(vocab):
    task = DetectionTask()
    meta = {"max_image_size": IMAGE_SIZE, "ratios": (1.0, 1.0)}
    b = vocab.bin_id
    circle = vocab.encode(" circle")
    tokens = [b(1), b(2), b(3), b(4)] + circle + [b(5), b(6), b(7), b(8)] + circle + [vocab.eos]
    n = 4 + len(circle)
    log_p = torch.tensor([-0.1] * n + [-2.0] * n + [-0.5])
    out = task.decode(torch.tensor(tokens), vocab, meta, token_scores=log_p)
    assert [d["score"] for d in out] == pytest.approx([math.exp(-0.1), math.exp(-2.0)])


# ---------------------------------------------------------------------- record errors
@pytest.mark.parametrize("objects, field, problem", [
    ([{"box": [10, 5, 41, 20], "label": "a"}], "objects[0].box", "outside the 40x30 image"),
    ([{"box": [-1, 5, 20, 20], "label": "a"}], "objects[0].box", "outside"),
    ([{"box": [1, 1, 5, 5], "label": "a"}, {"box": [10, 5, 20, 31], "label": "b"}],
     "objects[1].box", "outside"),
    ([{"box": [20, 5, 10, 20], "label": "a"}], "objects[0].box", "degenerate or inverted"),
    ([{"box": [10, 5, 10, 20], "label": "a"}], "objects[0].box", "degenerate or inverted"),
    ([{"box": [10, 5, 20, 5], "label": "a"}], "objects[0].box", "degenerate or inverted"),
    ([{"box": [10, 5, 20, float("nan")], "label": "a"}], "objects[0].box", "non-finite"),
    ([{"box": [10, 5, 20], "label": "a"}], "objects[0].box", "must hold 4 numbers"),
    ([{"box": "10,5,20,20", "label": "a"}], "objects[0].box", "sequence of numbers"),
    ([{"box": [1, 1, 5, 5], "label": "a"}, {"box": [1, 1, 5, 5]}], "objects[1].label", "missing"),
    ([{"label": "a"}], "objects[0].box", "missing"),
    ([{"box": [1, 1, 5, 5], "label": 7}], "objects[0].label", "must be a string"),
    ([{"box": [1, 1, 5, 5], "label": "  "}], "objects[0].label", "is empty"),
    ([{"box": [1, 1, 5, 5], "label": "a"}, "car"], "objects[1]", "mapping"),
    ([], "objects", "is empty"),
    ("car", "objects", "must be a list"),
    ([{"box": [1, 1, 5, 5], "label": "a"}] * 3, "objects", "max_objects=2"),
    ([{"box": [1, 1, 5, 5], "label": "a b c d e f g h i j"}], "objects[0].label",
     "max_label_tokens=8"),
])
def test_bad_objects_are_record_errors(context, objects, field, problem):
    task = DetectionTask(source=FakeSource(), max_objects=2)
    record = {"id": "d7", "image": image(40, 30), "objects": objects}
    with pytest.raises(RecordError, match=r"FakeSource\(/data/det.tsv\): record 'd7' field "
                                          + re.escape(f"'{field}'")) as error:
        task.build_sample(record, context, train=False)
    assert problem in str(error.value)


def test_missing_fields_name_the_record(context):
    with pytest.raises(RecordError, match=r"record 'd8' lacks field\(s\) \['objects'\]"):
        DetectionTask().build_sample({"id": "d8", "image": image()}, context, train=False)
    with pytest.raises(RecordError, match=r"record 'd9' lacks field\(s\) \['image'\]"):
        DetectionTask().build_sample({"id": "d9", "objects": [{"box": [0, 0, 1, 1], "label": "a"}]},
                                     context, train=False)
    with pytest.raises(RecordError, match="d10.*does not decode"):
        DetectionTask().build_sample({"id": "d10", "image": b"not a png",
                                      "objects": [{"box": [0, 0, 1, 1], "label": "a"}]},
                                     context, train=False)


# ---------------------------------------------------------------------- metric, by hand
A, B = "red circle", "blue square"
BOX1, BOX2, BOX3 = [0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]


def score(preds: list[dict], targets: list[dict]) -> dict[str, float]:
    metric = DetectionMetrics()
    metric.update(preds, targets)
    return {k: v.item() for k, v in metric.compute().items()}


def image_of(*objects, scores=None) -> dict:
    """One image's entry: objects are (box, label)."""
    entry = {"boxes": torch.tensor([o[0] for o in objects], dtype=torch.float).reshape(-1, 4),
             "labels": [o[1] for o in objects]}
    if scores is not None:
        entry["scores"] = torch.tensor(scores)
    return entry


@pytest.mark.parametrize("preds, targets, expected", [
    # perfect: every object found once with its label
    ([image_of((BOX1, A), (BOX2, B))], [image_of((BOX1, A), (BOX2, B))], (1.0, 1.0, 1.0)),
    # one miss: A has 2 objects, 1 found -> recall 1/2, precision 1/1; AP_A = 1/2 * 1 = 0.5
    ([image_of((BOX1, A))], [image_of((BOX1, A), (BOX2, A))], (0.5, 1.0, 0.5)),
    # one false positive ranked below the hit: P/R points (1, 1/1), (1, 1/2) -> AP 1;
    # precision 1/2, recall 1
    ([image_of((BOX1, A), (BOX2, A), scores=[0.9, 0.8])], [image_of((BOX1, A))], (1.0, 0.5, 1.0)),
    # ... ranked above it: (R, P) = (0, 0), (1, 1/2) -> AP = 1 * 1/2
    ([image_of((BOX1, A), (BOX2, A), scores=[0.8, 0.9])], [image_of((BOX1, A))], (0.5, 0.5, 1.0)),
    # wrong label on the right box: A gets AP 0; B has no ground truth, so no AP -> mAP 0
    ([image_of((BOX1, B))], [image_of((BOX1, A))], (0.0, 0.0, 0.0)),
    # duplicate: the second copy finds the ground truth taken -> FP after the TP: AP 1,
    # precision 1/2, recall 1
    ([image_of((BOX1, A), (BOX1, A), scores=[0.9, 0.8])], [image_of((BOX1, A))], (1.0, 0.5, 1.0)),
    # two classes, two images. A: img1 hit (0.9), img2 miss-located (0.8) -> (R, P) =
    # (1/2, 1), (1/2, 1/2) -> AP_A = 1/2; B: hit -> AP_B = 1; mAP = 3/4;
    # precision 2 TP / 3 preds, recall 2 / 3 objects
    ([image_of((BOX1, A), (BOX2, B), scores=[0.9, 0.6]), image_of((BOX3, A), scores=[0.8])],
     [image_of((BOX1, A), (BOX2, B)), image_of((BOX2, A))], (0.75, 2 / 3, 2 / 3)),
    # nothing predicted: AP 0, precision 0 by convention, recall 0
    ([image_of()], [image_of((BOX1, A))], (0.0, 0.0, 0.0)),
])
def test_metric_hand_computed(preds, targets, expected):
    got = score(preds, targets)
    assert (got["map50"], got["precision"], got["recall"]) == pytest.approx(expected)


def test_metric_interpolates_precision():
    # class A, one object in each of 3 images; predictions ranked TP, FP, TP, TP:
    #   recall    1/3, 1/3, 2/3, 1      precision 1, 1/2, 2/3, 3/4
    #   envelope (best precision at this recall or higher): 1, 3/4, 3/4, 3/4
    #   AP = 1/3 * 1 + 1/3 * 3/4 + 1/3 * 3/4 = 5/6   (the raw curve would give 0.8056)
    preds = [image_of((BOX1, A), scores=[0.9]),
             image_of((BOX3, A), (BOX1, A), scores=[0.8, 0.7]),
             image_of((BOX1, A), scores=[0.6])]
    targets = [image_of((BOX1, A))] * 3
    assert score(preds, targets) == pytest.approx(
        {"map50": 5 / 6, "precision": 3 / 4, "recall": 1.0})
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 1]),
                             3) == pytest.approx(5 / 6)


def test_metric_ties_are_one_threshold():
    # one hit and one miss with the same score: a single point (R, P) = (1, 1/2) -> AP 1/2,
    # whichever comes first (taking the hit first would give 1)
    for order in ([1, 0], [0, 1]):
        assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor(order), 1) == 0.5
    pair = [image_of((BOX1, A), (BOX2, A), scores=[0.5, 0.5])]
    assert score(pair, [image_of((BOX1, A))])["map50"] == 0.5
    swapped = [image_of((BOX2, A), (BOX1, A), scores=[0.5, 0.5])]
    assert score(swapped, [image_of((BOX1, A))])["map50"] == 0.5


def test_metric_without_scores_ranks_by_emission_order():
    target = [image_of((BOX1, A))]
    assert score([image_of((BOX1, A), (BOX2, A))], target)["map50"] == 1.0  # hit first
    assert score([image_of((BOX2, A), (BOX1, A))], target)["map50"] == 0.5  # miss first


def test_metric_iou_threshold_and_matching():
    # IoU exactly 0.5 (100 / 200) is a hit; 100 / 210 is not
    assert score([image_of(([0, 0, 10, 20], A))], [image_of((BOX1, A))])["recall"] == 1.0
    assert score([image_of(([0, 0, 10, 21], A))], [image_of((BOX1, A))])["recall"] == 0.0
    # two overlapping objects: the 2nd prediction's best object is taken, so it takes the
    # other one (IoU 9.2 / 10.8 = 0.85): 2 hits (the VOC devkit would call it a miss)
    gts = [image_of((BOX1, A), ([0, 1, 10, 11], A))]
    preds = [image_of((BOX1, A), ([0, 0.2, 10, 10.2], A), scores=[0.9, 0.8])]
    assert score(preds, gts) == pytest.approx({"map50": 1.0, "precision": 1.0, "recall": 1.0})
    # an inverted (malformed) prediction overlaps nothing
    assert score([image_of(([10, 10, 0, 0], A))], [image_of((BOX1, A))])["precision"] == 0.0


def test_metric_labels_may_be_ints_and_strings_hash_stably():
    assert score([image_of((BOX1, 3))], [image_of((BOX1, 3))])["map50"] == 1.0
    assert score([image_of((BOX1, 3))], [image_of((BOX1, 4))])["map50"] == 0.0
    assert label_key("red circle") == label_key("red circle") != label_key("red circlE")


def test_metric_accumulates_over_updates():
    metric = DetectionMetrics()
    metric.update([image_of((BOX1, A))], [image_of((BOX1, A))])
    metric.update([], [])
    metric.update([image_of()], [image_of((BOX2, A))])
    out = metric.compute()  # AP_A: 1 hit of 2 objects, no FP -> 1/2
    assert out["map50"].item() == 0.5 and out["recall"].item() == 0.5
    assert out["map50"].dtype == torch.float64
    metric.reset()
    with pytest.raises(ValueError, match="no ground-truth objects"), \
            pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own
        metric.compute()


@pytest.mark.parametrize("preds, targets, message", [
    ([image_of((BOX1, A))], [], "1 preds but 0 targets"),
    ([{"boxes": torch.zeros(1, 3), "labels": [A]}], [image_of((BOX1, A))], r"shape \(N, 4\)"),
    ([image_of((BOX1, A))], [{"boxes": [[5, 5, 0, 0]], "labels": [A]}], "x1 < x0"),
    ([{"boxes": [BOX1], "labels": [A, B]}], [image_of((BOX1, A))], "1 boxes but 2 labels"),
    ([{"boxes": [BOX1], "labels": [A], "scores": [0.1, 0.2]}], [image_of((BOX1, A))], "2 scores"),
    ([{"boxes": [BOX1], "labels": [1.5]}], [image_of((BOX1, A))], "string or an int"),
    ([{"labels": [A]}], [image_of((BOX1, A))], "mapping with 'boxes'"),
    ([{"boxes": [[0, 0, float("inf"), 1]], "labels": [A]}], [image_of((BOX1, A))], "non-finite"),
])
def test_metric_rejects_bad_input(preds, targets, message):
    with pytest.raises(ValueError, match=message):
        DetectionMetrics().update(preds, targets)


# ---------------------------------------------------------------------- metric under DDP
WORLD_SIZE = 2


def ddp_data() -> tuple[list[dict], list[dict]]:
    """Twelve images: random boxes jittered into hits and misses, 3 classes, tied scores."""
    g = torch.Generator().manual_seed(1)
    preds, targets = [], []
    labels = [A, B, "green star"]
    for _ in range(12):
        m = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * 40
        gt = torch.cat([xy, xy + 5 + torch.rand(m, 2, generator=g) * 10], 1)
        gt_labels = [labels[int(i)] for i in torch.randint(0, 3, (m,), generator=g)]
        jitter = (torch.rand(m, 4, generator=g) - 0.5) * 6
        pred_labels = [lab if float(torch.rand(1, generator=g)) < 0.8 else A for lab in gt_labels]
        scores = (torch.rand(m, generator=g) * 4).round() / 4  # few values: many ties
        preds.append({"boxes": gt + jitter, "labels": pred_labels, "scores": scores})
        targets.append({"boxes": gt, "labels": gt_labels})
    return preds, targets


def ddp_evaluate(rank: int | None) -> dict[str, float]:
    preds, targets = ddp_data()
    # uneven shards, several updates per rank; rank 1 also sends an empty batch
    shards = [slice(0, 1), slice(1, 4), slice(4, 4), slice(4, 12)]
    metric = DetectionMetrics()
    for s in (shards if rank is None else shards[rank::WORLD_SIZE]):
        metric.update(preds[s], targets[s])
    return {k: v.item() for k, v in metric.compute().items()}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        torch.save(ddp_evaluate(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path: Path, monkeypatch):
    # each process its own str-hash salt, even where the environment pins one: label keys
    # must not depend on it (Python's hash() would split one class into two)
    monkeypatch.setenv("PYTHONHASHSEED", "random")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE,
             join=True)
    expected = ddp_evaluate(rank=None)
    assert 0.0 < expected["map50"] < 1.0 and 0.0 < expected["precision"] < 1.0
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), rank
    # one shard alone scores differently: the test would catch per-process scoring
    preds, targets = ddp_data()
    alone = DetectionMetrics()
    alone.update(preds[1:4], targets[1:4])
    assert alone.compute()["map50"].item() != pytest.approx(expected["map50"])


# ---------------------------------------------------------------------- task <-> metric
def test_perfect_predictions_score_one(records, context):
    task = DetectionTask()
    samples = [task.build_sample(r, context, train=False) for r in records]
    predictions = [task.decode(s.target, context.vocab, s.meta) for s in samples]
    metrics = task.metrics()
    task.update_metrics(metrics, predictions, [s.meta for s in samples])
    assert {k: v.item() for k, v in metrics["detection"].compute().items()} == \
        {"map50": 1.0, "precision": 1.0, "recall": 1.0}
    # no predictions for the even images: recall = objects of the odd images / all objects,
    # and every prediction made is still right
    metrics = task.metrics()
    task.update_metrics(metrics, [p if i % 2 else [] for i, p in enumerate(predictions)],
                        [s.meta for s in samples])
    counts = [len(r["objects"]) for r in records]
    result = metrics["detection"].compute()
    assert result["recall"].item() == pytest.approx(sum(counts[1::2]) / sum(counts))
    assert result["precision"].item() == 1.0


# ---------------------------------------------------------------------- end to end
def test_predict_on_a_random_model(model, vocab, context, records):
    task = DetectionTask(max_objects=4, max_label_tokens=3)  # budget 4 * (4 + 3) = 28 tokens
    samples = [task.build_sample(r, context, train=False) for r in records[:3]]
    batch = collate(samples, vocab.pad)
    hypotheses = generate(model, batch.src_tokens, batch.patch_images, batch.patch_masks,
                          config=task.generation, **task.constraints(vocab))
    for best in hypotheses:
        tokens = best[0].tokens
        assert 5 < tokens.numel() <= 29 and tokens[-1] == vocab.eos  # min_len 5, budget 28
        assert best[0].positional_scores.shape == tokens.shape
    predictions = task.predict(model, batch, vocab)
    assert len(predictions) == len(samples)
    for prediction, best, sample in zip(predictions, hypotheses, samples):
        assert prediction == task.decode(best[0].tokens, vocab, sample.meta,
                                         token_scores=best[0].positional_scores)
        for detection in prediction:
            assert set(detection) == {"box", "label", "score"}
            assert len(detection["box"]) == 4 and all(math.isfinite(v) for v in detection["box"])
            assert isinstance(detection["label"], str) and detection["label"]
            assert 0.0 < detection["score"] <= 1.0
    json.dumps(predictions)  # the prediction writer stores them as JSON lines
    metrics = task.metrics()
    task.update_metrics(metrics, predictions, batch.meta)
    result = metrics["detection"].compute()
    assert all(0.0 <= float(v) <= 1.0 for v in result.values())


def test_generated_output_forced_to_the_target_decodes_to_the_objects(model, vocab, context,
                                                                      records):
    """A random model emits nothing parseable, so force the target as a decoder prefix: the
    search's own tokens and log-probs must then decode to the record's objects."""
    task = DetectionTask()
    samples = [task.build_sample(r, context, train=False) for r in records[:2]]
    batch = collate(samples, vocab.pad)
    prefix = [s.target[:-1] for s in samples]  # without eos
    hypotheses = generate(model, batch.src_tokens, batch.patch_images, batch.patch_masks,
                          config=task.generation, prefix_tokens=prefix,
                          max_len_b=max(p.numel() for p in prefix) + 2)
    for best, sample, record in zip(hypotheses, samples, records):
        decoded = task.decode(best[0].tokens, vocab, sample.meta,
                              token_scores=best[0].positional_scores)
        objects = record["objects"]
        labels = [d["label"] for d in decoded[:len(objects)]]
        # the model may go on with text after the prefix: that lengthens the last label
        assert labels[:-1] == [o["label"] for o in objects[:-1]]
        assert labels[-1].startswith(objects[-1]["label"])
        for d, obj in zip(decoded, objects):
            assert d["box"] == pytest.approx(obj["box"], abs=half_bin(IMAGE_SIZE, 1.0, vocab))
        # the first object's score is exp(mean log p) of its own tokens
        n = 4 + len(vocab.encode(f" {objects[0]['label']}"))
        log_p = best[0].positional_scores[:n].double().mean().item()
        assert decoded[0]["score"] == pytest.approx(math.exp(log_p))
        assert all(0.0 < d["score"] <= 1.0 for d in decoded)
