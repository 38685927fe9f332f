"""Box quantisation pinned to the official convention: bin = round(coord / 512 * 999)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ofa_lightning.location import (box_iou, box_to_original, box_to_tokens, dequantize_box,
                                    quantize_box, resize_box, tokens_to_box)
from ofa_lightning.vocab import UnifiedVocab

HALF_BIN = 512 / 999 / 2


@pytest.fixture(scope="module")
def official(ofa_fixtures: Path) -> UnifiedVocab:
    return UnifiedVocab.from_bpe_dir(ofa_fixtures / "bpe")


# ---------------------------------------------------------------- quantisation
def test_edges_map_to_first_and_last_bin() -> None:
    assert quantize_box([0, 0, 512, 512]).tolist() == [0, 0, 999, 999]
    assert dequantize_box([0, 0, 999, 999]).tolist() == [0.0, 0.0, 512.0, 512.0]


def test_matches_the_official_formula_on_every_half_pixel() -> None:
    coords = [c / 2 for c in range(0, 1025)]  # exact in float32 and float64 alike
    boxes = torch.tensor([[c, c, c, c] for c in coords])
    expected = [int(round(c / 512 * 999)) for c in coords]  # Python rounds half to even
    assert quantize_box(boxes)[:, 0].tolist() == expected
    assert quantize_box([256, 0, 256, 0]).tolist()[0] == 500  # 499.5 -> 500


def test_ties_round_half_to_even_like_the_official_code() -> None:
    # On this grid bin = x / 10 exactly, so 5, 15, 25, 35 are ties: 0.5, 1.5, 2.5, 3.5.
    assert quantize_box([5, 15, 25, 35], max_image_size=100, num_bins=11).tolist() == [0, 2, 2, 4]


def test_known_values_other_grid() -> None:
    assert quantize_box([10, 20, 30, 40], max_image_size=100, num_bins=11).tolist() == [1, 2, 3, 4]
    assert dequantize_box([1, 2, 3, 4], max_image_size=100, num_bins=11).tolist() == pytest.approx(
        [10, 20, 30, 40])


def test_round_trip_error_is_at_most_half_a_bin() -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 50, 2, 2, generator=generator) * 512  # (2, 50, corner, xy)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    bins = quantize_box(boxes)
    assert bins.shape == (2, 50, 4) and bins.dtype == torch.int64
    error = (dequantize_box(bins) - boxes).abs().max().item()
    assert error <= HALF_BIN + 1e-4
    assert error > HALF_BIN * 0.9  # the bound is tight, so the test would notice a wrong scale


def test_clipping_and_its_refusal() -> None:
    assert quantize_box([-10.0, 5.0, 600.0, 700.0]).tolist() == [0, 10, 999, 999]
    with pytest.raises(ValueError, match=r"box \[-10.0, 5.0, 600.0, 700.0\] reaches outside "
                                         r"\[0, 512.0\]; pass clip=True"):
        quantize_box([-10.0, 5.0, 600.0, 700.0], clip=False)
    assert quantize_box([0, 0, 512, 512], clip=False).tolist() == [0, 0, 999, 999]


def test_degenerate_boxes_are_allowed() -> None:
    assert quantize_box([100, 100, 100, 100]).tolist() == [195, 195, 195, 195]
    assert quantize_box([100, 50, 100, 80]).tolist() == [195, 98, 195, 156]  # zero width
    assert quantize_box([600, 600, 700, 700]).tolist() == [999] * 4  # clipped to a point


@pytest.mark.parametrize("box, message", [
    ([30.0, 0.0, 10.0, 5.0], r"box \[30.0, 0.0, 10.0, 5.0\] has x1 < x0 or y1 < y0"),
    ([0.0, 9.0, 10.0, 5.0], r"box \[0.0, 9.0, 10.0, 5.0\] has x1 < x0 or y1 < y0"),
    ([[0, 0, 1, 1], [5, 6, 4, 7]], r"box \[5.0, 6.0, 4.0, 7.0\] has x1 < x0"),
    ([0.0, float("nan"), 1.0, 1.0], r"non-finite"),
    ([1.0, 2.0, 3.0], r"a box is 4 numbers .*got shape \(3,\)"),
])
def test_bad_boxes_are_named(box: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_box(box)


@pytest.mark.parametrize("call, message", [
    (lambda: dequantize_box([0, 0, 1000, 3]),
     r"bins must lie in \[0, 1000\), got \[0, 0, 1000, 3\]"),
    (lambda: dequantize_box([-1, 0, 3, 3]), r"bins must lie in \[0, 1000\)"),
    (lambda: dequantize_box([0.5, 0, 3, 3]), r"bins must be integers"),
    (lambda: quantize_box([0, 0, 1, 1], max_image_size=0), r"max_image_size must be > 0, got 0"),
    (lambda: quantize_box([0, 0, 1, 1], num_bins=1), r"num_bins must be >= 2, got 1"),
])
def test_bad_bins_and_grids(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- tokens
def test_box_to_tokens_gives_official_ids(official: UnifiedVocab, reference_inputs: dict) -> None:
    box = dequantize_box([12, 345, 678, 901])  # the region of the fixture's case B
    assert box_to_tokens(box, official).tolist() == [58469, 58802, 59135, 59358]
    fixture_bins = reference_inputs["src_tokens"][1, 10:14]  # after the region prompt
    assert box_to_tokens(box, official).tolist() == fixture_bins.tolist()


def test_generated_grounding_tokens_decode_like_the_official_eval(
        official: UnifiedVocab, reference_outputs: dict) -> None:
    grounding = reference_outputs["generate_beam5_grounding"]
    tokens = torch.stack([hypos[0]["tokens"][:-1] for hypos in grounding["hypos"]])  # drop eos
    assert torch.equal(official.bin_index(tokens), grounding["top_boxes_bins"])
    boxes = tokens_to_box(tokens, official)
    assert torch.allclose(boxes, grounding["top_boxes_bins"].float() / 999 * 512)
    # Sample 0 is malformed (y1 < y0): it is decoded, not rejected, and scores IoU 0.
    assert box_iou(boxes[0], torch.tensor([0.0, 0.0, 512.0, 512.0])).item() == 0.0


def test_tokens_to_box_round_trip(official: UnifiedVocab) -> None:
    boxes = torch.tensor([[10.0, 20.0, 300.5, 511.0], [0.0, 0.0, 512.0, 512.0]])
    tokens = box_to_tokens(boxes, official)
    assert official.is_bin(tokens).all()
    assert (tokens_to_box(tokens, official) - boxes).abs().max() <= HALF_BIN + 1e-4


def test_vocab_decides_the_number_of_bins() -> None:
    vocab = UnifiedVocab.train([" a red circle"], vocab_size=256, num_codes=4, num_bins=11)
    tokens = box_to_tokens([10, 20, 30, 40], vocab, max_image_size=100)
    assert tokens.tolist() == [vocab.bin_id(k) for k in (1, 2, 3, 4)]
    assert tokens_to_box(tokens, vocab, max_image_size=100).tolist() == pytest.approx(
        [10, 20, 30, 40])


def test_tokens_that_are_not_bins_are_refused(official: UnifiedVocab) -> None:
    tokens = [official.bin_id(1), official.bin_id(2), official.eos, official.bin_id(3)]
    message = r"^2 is not a valid bin token; valid: 58457 <= id < 59457$"
    with pytest.raises(ValueError, match=message):
        tokens_to_box(tokens, official)


# ---------------------------------------------------------------- resize ratios
def test_official_eval_chain_recovers_original_pixels() -> None:
    # A 640x480 image resized to 512x512, as RefCOCO fine-tuning does.
    w_ratio, h_ratio = 512 / 640, 512 / 480
    original = torch.tensor([100.0, 50.0, 300.0, 200.0])
    resized = resize_box(original, w_ratio, h_ratio)
    assert resized.tolist() == pytest.approx([80.0, 53.3333, 240.0, 213.3333], abs=1e-4)
    recovered = box_to_original(dequantize_box(quantize_box(resized)), w_ratio, h_ratio)
    tolerance = torch.tensor([1 / w_ratio, 1 / h_ratio] * 2) * HALF_BIN + 1e-4
    assert ((recovered - original).abs() <= tolerance).all()


def test_per_box_ratios_broadcast() -> None:
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0], [10.0, 10.0, 20.0, 20.0]])
    scaled = resize_box(boxes, torch.tensor([2.0, 0.5]), torch.tensor([1.0, 4.0]))
    assert scaled.tolist() == [[20.0, 10.0, 40.0, 20.0], [5.0, 40.0, 10.0, 80.0]]
    assert torch.allclose(box_to_original(scaled, torch.tensor([2.0, 0.5]),
                                          torch.tensor([1.0, 4.0])), boxes)


def test_non_positive_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match=r"resize ratios must be > 0, got w_ratio=0.0"):
        box_to_original([0, 0, 1, 1], 0.0, 1.0)


# ---------------------------------------------------------------- IoU
def test_box_iou_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1],
                      [5, 5, 5, 5], [3, 0, 1, 2]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1, 1, 3, 3], [2, 0, 4, 2], [5, 5, 6, 6],
                      [5, 5, 5, 5], [0, 0, 4, 2]])
    iou = box_iou(a, b)
    # same, 1/7 overlap, touching edges, disjoint, two points, inverted (empty) box
    assert iou.tolist() == pytest.approx([1.0, 1 / 7, 0.0, 0.0, 0.0, 0.0])


def test_box_iou_is_paired_and_broadcasts() -> None:
    a = torch.tensor([0.0, 0.0, 4.0, 4.0])
    b = torch.tensor([[[0.0, 0.0, 4.0, 2.0]], [[2.0, 2.0, 6.0, 6.0]]])  # (2, 1, 4)
    assert box_iou(a, b).shape == (2, 1)
    assert box_iou(a, b).flatten().tolist() == pytest.approx([0.5, 4 / 28])
    assert box_iou([0, 0, 4, 4], [0, 0, 4, 2]).item() == pytest.approx(0.5)
