"""grounded_vqa: the composed instruction (VQA question + grounded-captioning region syntax),
its ShapesWorld records, and decoding with a small random model."""

from __future__ import annotations

import pytest
import torch

from datamodules.sources import ShapesWorldSource
from ofa_lightning import OFAConfig, OFAModel
from ofa_lightning.data import collate
from ofa_lightning.location import tokens_to_box
from ofa_lightning.task import RecordError, SampleContext
from ofa_lightning.vocab import UnifiedVocab
from tasks.grounded_vqa import GroundedVQATask

IMAGE_SIZE = 96


@pytest.fixture(scope="module")
def source() -> ShapesWorldSource:
    return ShapesWorldSource("grounded_vqa", seed=5, val_size=6, records_per_scene=3)


@pytest.fixture(scope="module")
def context(source: ShapesWorldSource) -> SampleContext:
    vocab = UnifiedVocab.train(source.texts(200), vocab_size=300, num_codes=0, num_bins=120)
    return SampleContext(vocab, IMAGE_SIZE)


def test_source_is_the_question_then_the_region_bins(source: ShapesWorldSource,
                                                      context: SampleContext) -> None:
    vocab = context.vocab
    task = GroundedVQATask(source)
    record = source.record("val", 0)
    sample = task.build_sample(record, context, train=False)
    ids = sample.source.tolist()
    assert ids[0] == vocab.bos and ids[-1] == vocab.eos
    assert vocab.decode(ids[1:-5]) == f" {record['question']} region:"
    bins = torch.tensor(ids[-5:-1])
    assert bool(vocab.is_bin(bins).all())
    # the bins are the record's box in the resized image: 64 px original -> 96 px input
    box = tokens_to_box(bins, vocab, max_image_size=IMAGE_SIZE) * 64 / IMAGE_SIZE
    assert torch.allclose(box, torch.tensor(record["box"], dtype=torch.float), atol=0.5)
    (answer, _), = record["answers"].items()
    assert vocab.decode(sample.target) == f" {answer}"
    assert task.decode(sample.target, vocab, sample.meta) == answer


def test_bad_boxes_are_named(source: ShapesWorldSource, context: SampleContext) -> None:
    task = GroundedVQATask(source)
    record = dict(source.record("val", 1))
    with pytest.raises(RecordError, match=r"record 'shapes-grounded_vqa-val-1' field 'box'.*"
                                          r"degenerate"):
        task.build_sample({**record, "box": [10, 10, 10, 20]}, context, train=True)
    with pytest.raises(RecordError, match="lacks field"):
        task.build_sample({k: v for k, v in record.items() if k != "box"}, context, train=True)


def test_trie_decoding_answers_from_the_candidates(source: ShapesWorldSource,
                                                  context: SampleContext) -> None:
    torch.manual_seed(0)
    vocab = context.vocab
    model = OFAModel(OFAConfig.from_name("nano", vocab_size=len(vocab),
                                         patch_image_size=IMAGE_SIZE)).eval()
    task = GroundedVQATask(source, decode_mode="trie")
    batch = collate([task.build_sample(r, context, train=False) for r in source.records("val")],
                    vocab.pad)
    predictions = task.predict(model, batch, vocab)
    assert len(predictions) == 6
    assert set(predictions) <= set(source.answer_candidates())
