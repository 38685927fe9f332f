"""Metrics against hand-computed values and against pycocoevalcap's own scorers.

The Java-backed paths (PTBTokenizer, METEOR) run once, in the module-scoped ``official``
fixture; every other test uses the Java-free tokenizer or no tokenizer at all.
The multi-process (gloo) test lives in test_metrics_ddp.py.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from ofa_lightning.metrics import (
    CAPTION_METRICS,
    CaptionMetrics,
    GroundingAccuracy,
    VQAAccuracy,
    VQAAccuracyByType,
    cider_d,
    grounding_iou,
    java_available,
    score_captions,
    strip_punctuation,
    vqa_soft_scores,
)
from ofa_lightning.metrics.captioning import decode_texts, encode_texts, simple_tokenize

needs_java = pytest.mark.skipif(not java_available(), reason="pycocoevalcap's PTBTokenizer/METEOR need Java")

# Five images, three references each: capitals, commas, an apostrophe, hyphens and "&".
PREDICTIONS = [
    "A man, on a surfboard, riding a wave.",
    "a black-and-white dog's toy on the couch",
    "Two people standing in a kitchen, cooking!",
    "a red bus on a city street",
    "a plate of food with broccoli and rice",
]
REFERENCES = [
    ["A surfer riding a large wave in the ocean.", "A man on a surfboard riding a wave.",
     "a person surfing on a big wave"],
    ["A black and white dog lying on a couch.", "The dog's toy is on the sofa.",
     "a dog with a toy on a couch"],
    ["Two people cooking food in a kitchen.", "A couple prepares a meal in the kitchen",
     "two men standing next to a stove"],
    ["A red double-decker bus on a city street.", "a bus drives down the road",
     "A red bus is driving past buildings."],
    ["A plate topped with rice and broccoli.", "a dish of food with vegetables",
     "Broccoli, rice & chicken on a white plate."],
]
# pycocoevalcap 1.2 (meteor-1.5.jar, OpenJDK 17) on the captions above, tokenised as
# COCOEvalCap does; OFA_LIVE_METEOR=1 re-derives it live (test_meteor_golden_value_live).
METEOR_GOLDEN = 0.4065863561842568


def reference_scores(predictions, references, with_meteor=False):
    """What OFA's coco_eval gets: strip prediction punctuation, PTB-tokenise gts and res
    separately (as COCOEvalCap does), then pycocoevalcap's scorers one by one."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": strip_punctuation(p)}] for i, p in enumerate(predictions)}
    gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {"cider": Cider().compute_score(gts, res)[0], "rouge_l": Rouge().compute_score(gts, res)[0],
           **{f"bleu{n}": bleu[n - 1] for n in range(1, 5)}}
    if with_meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = Meteor().compute_score(gts, res)[0]
    return out


@pytest.fixture(scope="module")
def official():
    """One CaptionMetrics run with PTB + every scorer (the only METEOR JVM of this file)."""
    if not java_available():
        pytest.skip("needs Java")
    metric = CaptionMetrics(metrics=CAPTION_METRICS, tokenizer="ptb")
    metric.update(PREDICTIONS[:2], REFERENCES[:2])
    metric.update(PREDICTIONS[2:], REFERENCES[2:])
    return {k: v.item() for k, v in metric.compute().items()}, reference_scores(PREDICTIONS, REFERENCES)


# --------------------------------------------------------------------------- captioning

@needs_java
def test_caption_metrics_equal_pycocoevalcap(official):
    ours, expected = official
    assert set(ours) == set(CAPTION_METRICS)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert ours["meteor"] == pytest.approx(METEOR_GOLDEN, rel=1e-9)
    assert 0.5 < ours["bleu4"] < ours["bleu1"] < 1.0  # the corpus has real 4-gram matches


@needs_java
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OFA_LIVE_METEOR"),
                    reason="a second METEOR JVM (~10 s); set OFA_LIVE_METEOR=1 to re-check the golden value")
def test_meteor_golden_value_live():
    assert reference_scores(PREDICTIONS, REFERENCES, with_meteor=True)["meteor"] == pytest.approx(
        METEOR_GOLDEN, rel=1e-9)


def test_cider_d_equals_pycocoevalcap_cider():
    from pycocoevalcap.cider.cider import Cider

    preds = [simple_tokenize(p) for p in PREDICTIONS]
    refs = [[simple_tokenize(r) for r in rs] for rs in REFERENCES]
    gts = {i: rs for i, rs in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    expected, expected_each = Cider().compute_score(gts, res)
    score, each = cider_d(preds, refs, tokenizer="none")
    assert score == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(each, expected_each, rtol=1e-12)
    # the default simple tokenizer does that tokenisation itself
    assert cider_d(PREDICTIONS, REFERENCES)[0] == pytest.approx(expected, rel=1e-12)


def test_cider_by_hand():
    # 2 images, every n-gram in exactly one image's refs: idf = log(2/1) for all of them.
    # "a b" == its reference: cosine 1 for 1- and 2-grams, 0 for the absent 3-, 4-grams, no
    # length penalty -> 10 * mean(1, 1, 0, 0) = 5. "x y" shares nothing with "c d" -> 0.
    score, each = cider_d(["a b", "x y"], [["a b"], ["c d"]], tokenizer="none")
    np.testing.assert_allclose(each, [5.0, 0.0])
    assert score == pytest.approx(2.5)
    # a single image: every idf is log(1/1) = 0, so CIDEr is 0 even for a perfect caption
    assert cider_d(["a b"], [["a b"]], tokenizer="none")[0] == 0.0


def test_simple_tokenizer_perfect_caption_by_hand():
    metric = CaptionMetrics(metrics=("bleu4", "rouge_l", "cider"), tokenizer="simple")
    metric.update(["A Man, riding a horse!", "two dogs"], [["a man riding a horse"], ["two dogs"]])
    scores = metric.compute()
    # corpus BLEU pools n-gram counts: every n-gram matches (the 2-word caption simply adds
    # no 3-/4-grams), so BLEU-4 is 1 up to pycocoevalcap's 1e-15 / 1e-9 smoothing terms
    assert scores["bleu4"].item() == pytest.approx(1.0, abs=1e-6)
    assert scores["rouge_l"].item() == pytest.approx(1.0)
    # idf log(2/1) everywhere: the 5-word caption scores 10 * mean(1,1,1,1) = 10, the
    # 2-word one 10 * mean(1,1,0,0) = 5
    assert scores["cider"].item() == pytest.approx(7.5)
    assert scores["cider"].dtype == torch.float64


def test_text_helpers():
    assert strip_punctuation("  A dog's toy, on-top!  ") == "A dogs toy ontop"
    assert simple_tokenize("A  Dog's\ttoy,\non-top!") == "a dogs toy ontop"
    texts = ["café ☕", "", "a\nb", "ok"]
    data, lengths = encode_texts(texts)
    assert data.dtype == torch.uint8 and lengths.tolist() == [len(t.encode()) for t in texts]
    assert decode_texts(data, lengths) == texts
    assert decode_texts(*encode_texts(["", ""])) == ["", ""]
    metric = CaptionMetrics(metrics=("cider",), tokenizer="simple")
    metric.update(texts, [["x"]] * len(texts))
    metric.set_dtype(torch.float16)  # a no-op: the states are bytes and counts
    assert metric.pred_bytes[0].dtype == torch.uint8 and metric._gathered()[0] == texts


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_caption_update_accumulates_and_resets():
    metric = CaptionMetrics(metrics=("cider",), tokenizer="simple")
    metric.update([], [])  # an empty batch is a no-op
    for p, r in zip(PREDICTIONS, REFERENCES):
        metric.update([p], [r])
    once = CaptionMetrics(metrics=("cider",), tokenizer="simple")
    once.update(PREDICTIONS, REFERENCES)
    assert metric.compute()["cider"].item() == pytest.approx(once.compute()["cider"].item(), rel=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="no captions"):
        metric.compute()


def test_caption_input_errors():
    metric = CaptionMetrics(metrics=("cider",), tokenizer="simple")
    with pytest.raises(ValueError, match=r"3 predictions but 2 reference"):
        metric.update(["a", "b", "c"], [["a"], ["b"]])
    with pytest.raises(TypeError, match=r"references\[1\] must be a list of str"):
        metric.update(["a", "b"], [["a"], "b"])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        metric.update(["a"], [[]])
    with pytest.raises(TypeError, match=r"predictions\[0\] must be a str"):
        metric.update([torch.tensor([1, 2])], [["a"]])
    with pytest.raises(ValueError, match=r"unknown metrics \['spice'\].*'cider'"):
        CaptionMetrics(metrics=("cider", "spice"), tokenizer="simple")
    with pytest.raises(ValueError, match=r"unknown tokenizer"):
        CaptionMetrics(metrics=("cider",), tokenizer="nltk")
    with pytest.raises(ValueError, match="no captions"):
        score_captions([], [], ("cider",), tokenizer="simple")


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no java executable can be found
    with pytest.raises(RuntimeError, match=r"needs Java.*tokenizer='simple'"):
        CaptionMetrics(metrics=("cider",), tokenizer="ptb")
    with pytest.raises(RuntimeError, match=r"'meteor'.*needs Java"):
        CaptionMetrics(metrics=("cider", "meteor"), tokenizer="simple")
    CaptionMetrics(metrics=("cider", "bleu4", "rouge_l"), tokenizer="simple")  # Java-free works


# --------------------------------------------------------------------------- VQA

def test_vqa_soft_score_by_hand():
    metric = VQAAccuracy()
    metric.update(["no", "yes"], [{"no": 0.6, "yes": 0.3}, {"no": 1.0}])  # 0.6 + 0 (absent)
    metric.update([], [])
    metric.update(["2", " cat "], [{"2": 1.0, "3": 0.3}, {"cat": 0.9}])  # 1.0 + 0.9 (trimmed)
    assert metric.compute().item() == pytest.approx((0.6 + 0.0 + 1.0 + 0.9) / 4)
    assert vqa_soft_scores(["Yes"], [{"yes": 1.0}]) == [0.0]  # lookup is verbatim, no lower-casing


def test_vqa_accuracy_by_type_by_hand():
    metric = VQAAccuracyByType()
    metric.update(["yes", "no", "two"], [{"yes": 1.0}, {"yes": 1.0}, {"two": 0.6}],
                  ["yes/no", "yes/no", "number"])
    metric.update(["yes"], [{"yes": 0.3, "no": 1.0}], ["yes/no"])
    got = {k: v.item() for k, v in metric.compute().items()}
    # no "other" question was seen, so there is no "other" accuracy (not a 0)
    assert got == pytest.approx({"accuracy_yes_no": (1.0 + 0.0 + 0.3) / 3, "accuracy_number": 0.6})
    with pytest.raises(ValueError, match=r"answer_types\[0\] is 'colour'; expected one of"):
        metric.update(["red"], [{"red": 1.0}], ["colour"])
    with pytest.raises(ValueError, match="got 1 predictions but 2 answer types"):
        metric.update(["red"], [{"red": 1.0}], ["other", "other"])


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_vqa_errors():
    metric = VQAAccuracy()
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()
    with pytest.raises(ValueError, match=r"2 predictions but 1 answer-score"):
        metric.update(["a", "b"], [{"a": 1.0}])
    with pytest.raises(TypeError, match=r"answer_scores\[0\] must be a dict"):
        metric.update(["a"], [["a"]])


# --------------------------------------------------------------------------- grounding

def official_hits(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OFA's Acc@0.5 test in its own terms: unclamped intersection, then the w, h > 0 mask."""
    pred, target = pred.float(), target.float()
    iw = torch.minimum(pred[:, 2], target[:, 2]) - torch.maximum(pred[:, 0], target[:, 0])
    ih = torch.minimum(pred[:, 3], target[:, 3]) - torch.maximum(pred[:, 1], target[:, 1])
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    iou = iw * ih / (area_p + area_t - iw * ih + 1e-6)
    return (iou >= 0.5) & (iw > 0) & (ih > 0)


def test_grounding_by_hand():
    pred = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    target = torch.tensor([
        [0, 0, 10, 10],    # identical: IoU 1
        [0, 0, 10, 20],    # IoU 100/(200 + 1e-6): exactly 0.5 in float32 -> a hit, as in OFA
        [5, 0, 15, 10],    # IoU 50/150 = 1/3
        [20, 20, 30, 30],  # apart on both axes: w * h = (-10)(-10) > 0, official mask -> miss
        [10, 0, 20, 10],   # touching edge: w = 0 -> miss
    ])
    metric = GroundingAccuracy()
    metric.update(pred[:3], target[:3])
    metric.update(pred[3:], target[3:])
    out = metric.compute()
    assert out["acc@0.5"].item() == pytest.approx(2 / 5)
    assert out["miou"].item() == pytest.approx((1 + 0.5 + 1 / 3 + 0 + 0) / 5, rel=1e-6)
    assert official_hits(pred, target).tolist() == [True, True, False, False, False]


def test_grounding_matches_official_formula_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4000, 2, 2, generator=g) * 60  # small canvas: many overlaps and misses
    wh = torch.rand(4000, 2, 2, generator=g) * 40
    pred = torch.cat([xy[:, 0], xy[:, 0] + wh[:, 0]], 1)
    target = torch.cat([xy[:, 1], xy[:, 1] + wh[:, 1]], 1)
    target[::7] = pred[::7].round()  # near-duplicates, borderline IoUs
    hits = grounding_iou(pred, target) >= 0.5
    assert torch.equal(hits, official_hits(pred, target))
    assert 0.05 < hits.float().mean() < 0.95


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_grounding_errors():
    metric = GroundingAccuracy()
    with pytest.raises(ValueError, match="no boxes"):
        metric.compute()
    ok = torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0]])
    bad = torch.tensor([[0.0, 0.0, 5.0, 5.0], [4.0, 1.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match=r"pred_boxes\[1\] = \[4\.0, 1\.0, 2\.0, 2\.0\] has x1 < x0"):
        metric.update(bad, ok)
    with pytest.raises(ValueError, match=r"target_boxes\[1\]"):
        metric.update(ok, bad)
    with pytest.raises(ValueError, match=r"2 pred_boxes but 1 target_boxes"):
        metric.update(ok, ok[:1])
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        metric.update(ok[:, :3], ok[:, :3])
    with pytest.raises(ValueError, match="not finite"):
        metric.update(torch.tensor([[0.0, 0.0, math.nan, 1.0]]), ok[:1])
    metric.update(torch.zeros(0, 4), torch.zeros(0, 4))  # empty batch: no-op
    assert metric.total.item() == 0
