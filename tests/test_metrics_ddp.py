"""The metrics under real DDP: 2 CPU processes, gloo, each updating its own shard.

Each process's ``compute()`` must equal the single-process value on all the data. For
captions that only holds if the strings themselves are gathered (CIDEr's document
frequencies and BLEU's counts are corpus-wide), which is what this checks, together with
uneven shards, non-ASCII text, an empty caption and a process that saw no data at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ofa_lightning.metrics import (CaptionMetrics, GroundingAccuracy, VQAAccuracy,
                                   VQAAccuracyByType, java_available)

WORLD_SIZE = 2
TOKENIZER = "ptb" if java_available() else "simple"
CAPTION_KW = dict(metrics=("cider", "bleu4", "rouge_l"), tokenizer=TOKENIZER)

PREDICTIONS = [
    "a man riding a wave on a surfboard",
    "A café with people sitting at tables.",
    "a dog lying on a couch",
    "",  # the model can emit nothing
    "two giraffes standing in a field",
    "a red bus on a city street",
    "a plate of food with broccoli",
]
REFERENCES = [
    ["a surfer riding a wave", "a man on a surfboard riding a big wave"],
    ["people sitting in a café", "a small café with tables and chairs", "a coffee shop"],
    ["a dog sleeping on a couch", "the dog is lying on the sofa"],
    ["a cat on a bed", "a kitten sleeping"],
    ["two giraffes in a grassy field", "giraffes standing near trees"],
    ["a red double-decker bus on a street", "a bus drives down the road"],
    ["a plate with broccoli and rice", "a dish of vegetables", "food on a white plate"],
]
ANSWERS = ["no", "yes", "2", "red", "cat", "no", "blue"]
ANSWER_SCORES = [{"no": 0.6, "yes": 0.3}, {"no": 1.0}, {"2": 1.0, "3": 0.3}, {"red": 0.9},
                 {"dog": 1.0}, {"no": 0.3}, {"blue": 1.0, "navy": 0.6}]
ANSWER_TYPES = ["yes/no", "yes/no", "number", "other", "other", "yes/no", "other"]


def boxes() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 11, 2, generator=g) * 50
    wh = torch.rand(2, 11, 2, generator=g) * 40 + 1
    return torch.cat([xy[0], xy[0] + wh[0]], 1), torch.cat([xy[1], xy[1] + wh[1]], 1)


def scalars(out) -> dict[str, float]:
    if isinstance(out, dict):
        return {k: v.item() for k, v in out.items()}
    return {"value": out.item()}


def evaluate(shards: list[slice], rank: int | None) -> dict[str, dict[str, float]]:
    """Update every metric with this rank's shards (all data when rank is None), compute."""
    mine = shards if rank is None else shards[rank::WORLD_SIZE]
    caption, vqa, grounding = CaptionMetrics(**CAPTION_KW), VQAAccuracy(), GroundingAccuracy()
    vqa_by_type = VQAAccuracyByType()  # the "number" question lands on rank 1 only
    lopsided = CaptionMetrics(**CAPTION_KW)  # all data on rank 0, nothing at all on rank 1
    pred_boxes, target_boxes = boxes()
    for s in mine:  # several updates per rank: list states hold several tensors
        caption.update(PREDICTIONS[s], REFERENCES[s])
        vqa.update(ANSWERS[s], ANSWER_SCORES[s])
        vqa_by_type.update(ANSWERS[s], ANSWER_SCORES[s], ANSWER_TYPES[s])
        grounding.update(pred_boxes[s], target_boxes[s])
    if rank in (None, 0):
        lopsided.update(PREDICTIONS, REFERENCES)
    with caption.sync_context():  # the strings every process sees after the gather
        texts = caption._gathered()
    return {
        "caption": scalars(caption.compute()),
        "lopsided": scalars(lopsided.compute()),
        "vqa": scalars(vqa.compute()),
        "vqa_by_type": scalars(vqa_by_type.compute()),
        "grounding": scalars(grounding.compute()),
        "texts": sorted(zip(texts[0], map(tuple, texts[1]))),
    }


# round-robin over uneven slices: rank 0 updates 1 + 3 + 1 captions (and 1 + 3 + 5 boxes),
# rank 1 updates 2 + 0 (an empty batch)
SHARDS = [slice(0, 1), slice(1, 3), slice(3, 6), slice(6, 6), slice(6, 11)]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(evaluate(SHARDS, rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    expected = evaluate(SHARDS, rank=None)
    assert expected["texts"] == sorted(zip(PREDICTIONS, map(tuple, REFERENCES)))
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["texts"] == expected["texts"], f"rank {rank} gathered different captions"
        for group in ("caption", "lopsided", "vqa", "vqa_by_type", "grounding"):
            assert got[group].keys() == expected[group].keys()
            for name, value in expected[group].items():
                assert got[group][name] == pytest.approx(value, rel=1e-12, abs=1e-15), (rank, group, name)
    # a shard alone scores differently: the test would catch per-process scoring
    shard = CaptionMetrics(**CAPTION_KW)
    for s in SHARDS[0::WORLD_SIZE]:
        shard.update(PREDICTIONS[s], REFERENCES[s])
    assert shard.compute()["cider"].item() != pytest.approx(expected["caption"]["cider"], rel=1e-3)
