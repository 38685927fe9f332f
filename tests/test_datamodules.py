"""Record sources and the datamodules: schemas, file:line errors, the deterministic,
shardable, resumable training stream, one evaluation dataloader per task, and a real
Lightning Trainer that saves the vocabulary and resumes the stream exactly.

The small task and source defined here are also the example of plugins that live outside
the package: a Task subclass and a RecordSource need nothing but the contract.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from datamodules.multitask import (MixturePhase, MultiTaskDataModule, TaskDataModule, TrainStream,
                                   build_sample, permute)
from datamodules.sources import REGION_QUESTIONS, JsonlSource, MemorySource, ShapesWorldSource
from ofa_lightning.distributed import destroy_process_group_at_exit
from ofa_lightning.data import Sample
from ofa_lightning.task import RecordError, SampleContext, Task
from ofa_lightning.vocab import UnifiedVocab

REPO = Path(__file__).resolve().parents[1]
BPE_DIR = REPO.parent / "shared" / "fixtures" / "ofa_reference" / "bpe"


# ---------------------------------------------------------------- plugins defined outside
class CountingSource:
    """An endless train split of numbered texts, a finite val split: a minimal RecordSource."""

    def __init__(self, prefix: str = "n", val_size: int = 5) -> None:
        self.prefix, self.val_size = prefix, val_size

    def record(self, split: str, index: int) -> Mapping[str, Any]:
        return {"id": f"{self.prefix}-{split}-{index}", "text": f"{self.prefix} number {index}"}

    def size(self, split: str) -> int | None:
        return None if split == "train" else self.val_size

    def texts(self, limit: int) -> Iterable[str]:
        return (self.record("train", i)["text"] for i in range(limit))

    def records(self, split: str) -> Iterable[Mapping[str, Any]]:
        return (self.record(split, i) for i in range(self.size(split) or 10**18))

    def describe(self) -> str:
        return f"CountingSource({self.prefix})"


class EchoTask(Task):
    """Text only: record {id, text} -> the text back."""

    name = "echo"
    instruction = " repeat{}"
    required_fields = ("text",)
    uses_image = False

    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        sample = self.build_sample(record, context, train=False)
        return Sample.seq2seq(self.name, context.vocab, sample.source[1:-1].tolist(), [],
                              meta=sample.meta)

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        if not isinstance(record["text"], str):
            raise RecordError(f"record {record['id']!r} field 'text' must be a string")
        vocab = context.vocab
        return Sample.seq2seq(self.name, vocab, vocab.encode(self.fill_instruction(" " + record["text"])),
                              vocab.encode(" " + record["text"]), meta={"id": record["id"]})

    def decode(self, tokens: torch.Tensor, vocab: UnifiedVocab, meta: Mapping[str, Any]) -> str:
        return vocab.decode(tokens).strip()

    def metrics(self) -> dict:
        return {}

    def update_metrics(self, metrics: dict, predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        pass


class ShoutTask(EchoTask):
    name = "shout"
    instruction = " shout{}"


def ids(batch) -> list[tuple[str, str]]:
    return [(task, meta["id"]) for task, meta in zip(batch.tasks, batch.meta)]


def stream_ids(stream: TrainStream, num_batches: int) -> list[list[tuple[str, str]]]:
    batches = stream.batches()
    return [ids(next(batches)) for _ in range(num_batches)]


@pytest.fixture(scope="module")
def context() -> SampleContext:
    texts = [f"n number {i} m repeat shout {i * 7}" for i in range(200)]
    return SampleContext(UnifiedVocab.train(texts, vocab_size=300), image_size=32)


def mixture(weights: tuple[float, float] = (3.0, 1.0)) -> list[Task]:
    return [EchoTask(CountingSource("a"), weight=weights[0]),
            ShoutTask(CountingSource("b"), weight=weights[1])]


def datamodule(tasks: list[Task], **kwargs: Any) -> MultiTaskDataModule:
    return MultiTaskDataModule(tasks, **{"image_size": 32, "vocab_size": 300,
                                         "tokenizer_texts": 50, **kwargs})


# ---------------------------------------------------------------- ShapesWorldSource
@pytest.mark.parametrize("kind", ["caption", "vqa", "visual_grounding", "detection", "text",
                                  "image", "grounded_vqa"])
def test_shapes_world_records_match_the_task_schemas(kind: str) -> None:
    source = ShapesWorldSource(kind, seed=3, image_size=48, val_size=4, test_size=2)
    assert source.size("train") is None and source.size("val") == 4 and source.size("test") == 2
    for split in ("train", "val", "test"):
        record = source.record(split, 1)
        assert record["id"] == f"shapes-{kind}-{split}-1"
        if kind == "text":
            assert set(record) == {"id", "text"} and record["text"].startswith("there ")
            continue
        assert isinstance(record["image"], Image.Image) and record["image"].size == (48, 48)
        if kind == "image":
            assert set(record) == {"id", "image"}
        elif kind == "caption":
            assert set(record) == {"id", "image", "captions", "objects"}
            assert record["captions"] and all(isinstance(c, str) and c for c in record["captions"])
            assert record["objects"] and all(o in record["captions"][0] for o in record["objects"])
        elif kind == "grounded_vqa":
            assert set(record) == {"id", "image", "question", "box", "answers"}
            attribute = REGION_QUESTIONS[record["question"]]
            (answer, _), = record["answers"].items()
            scene = source.world.scene(1, split)
            assert any(list(o.box) == record["box"] and getattr(o, attribute) == answer
                       for o in scene.objects)
        elif kind == "detection":
            assert set(record) == {"id", "image", "objects"} and record["objects"]
            for obj in record["objects"]:
                x0, y0, x1, y1 = obj["box"]
                assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
                assert obj["label"].split()[0] in ("small", "large")
        elif kind == "vqa":
            assert set(record) == {"id", "image", "question", "answers"}
            assert record["question"].endswith("?")
            (answer, score), = record["answers"].items()
            assert score == 1.0 and answer in source.answer_candidates()
        else:
            assert set(record) == {"id", "image", "text", "box"}
            x0, y0, x1, y1 = record["box"]
            assert all(isinstance(v, int) for v in record["box"])
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
            assert record["text"].startswith("the ")
    # the same arguments give the same records; held-out splits are not the train split
    again = ShapesWorldSource(kind, seed=3, image_size=48, val_size=4, test_size=2)
    first = source.record("train", 5)
    assert {k: v for k, v in first.items() if k != "image"} == \
        {k: v for k, v in again.record("train", 5).items() if k != "image"}
    if kind == "text":
        assert source.record("val", 0)["text"] != source.record("train", 0)["text"]
        return
    assert first["image"].tobytes() == again.record("train", 5)["image"].tobytes()
    assert source.record("val", 0)["image"].tobytes() != source.record("train", 0)["image"].tobytes()
    assert len(list(source.records("val"))) == 4


def test_shapes_world_vqa_answers_are_the_candidates() -> None:
    source = ShapesWorldSource("vqa", max_objects=3)
    candidates = source.answer_candidates()
    assert len(candidates) == len(set(candidates))
    assert "four" not in candidates and {"zero", "three", "yes", "no", "red", "star", "small"} <= set(candidates)
    seen = {a for i in range(300) for a in source.record("train", i)["answers"]}
    assert seen <= set(candidates)
    assert len(seen) > 12  # counts, yes/no, colours, shapes and sizes all occur


def test_shapes_world_records_per_scene() -> None:
    source = ShapesWorldSource("visual_grounding", records_per_scene=3)
    records = [source.record("train", i) for i in range(6)]
    assert records[0]["image"] is records[2]["image"]  # one scene, rendered once
    assert records[2]["image"] is not records[3]["image"]
    pairs = [(r["text"], tuple(r["box"])) for r in records[:3]]
    assert len(set(pairs)) == 3  # different expressions of the one scene
    texts = list(source.texts(4))
    assert texts == [r["text"] for r in records[:4]]


def test_shapes_world_source_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown kind 'segmentation'.*caption, vqa, "
                                         "visual_grounding, detection"):
        ShapesWorldSource("segmentation")
    source = ShapesWorldSource("caption", val_size=3)
    with pytest.raises(IndexError, match=r"val record index must be an int in \[0, 3\), got 3"):
        source.record("val", 3)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        source.record("dev", 0)
    assert source.describe() == "ShapesWorld(seed=0, kind=caption)"


# ---------------------------------------------------------------- JsonlSource
def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_jsonl(path: Path, lines: Sequence[Any]) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines), encoding="utf-8")


@pytest.fixture
def jsonl_dir(tmp_path: Path) -> Path:
    write_png(tmp_path / "images" / "red.png", (255, 0, 0))
    write_png(tmp_path / "images" / "blue.png", (0, 0, 255))
    write_jsonl(tmp_path / "train.jsonl", [
        {"id": "t0", "image": "images/red.png", "question": "what colour?", "answers": {"red": 1.0}},
        "",
        {"image": "images/blue.png", "question": "which colour?", "answers": {"blue": 0.9, "navy": 0.3}},
    ])
    write_jsonl(tmp_path / "val.jsonl", [
        {"id": "v0", "image": "images/red.png", "question": "colour?", "answers": {"red": 1.0}},
        {"id": "v1", "image": "images/blue.png", "answers": {"blue": 1.0}},  # no question
        '{"id": "v2", "image": "images/red.png", "question": "colour?",',  # broken JSON
        ["not", "an", "object"],
        {"id": "v4", "image": 7, "question": "colour?", "answers": {"red": 1.0}},
        {"id": "v5", "image": "images/green.png", "question": "colour?", "answers": {"g": 1.0}},
    ])
    return tmp_path


def test_jsonl_source_reads_records(jsonl_dir: Path) -> None:
    source = JsonlSource(str(jsonl_dir))
    assert source.size("train") == 2  # the blank line is no record
    first, second = source.records("train")
    assert first["id"] == "t0" and Path(first["image"]) == jsonl_dir / "images" / "red.png"
    assert second["id"] == "train.jsonl:3"  # the default id names the line
    with Image.open(second["image"]) as image:
        assert image.getpixel((0, 0)) == (0, 0, 255)
    assert sorted(source.texts(10)) == sorted(["what colour?", "red", "which colour?", "blue", "navy"])
    assert source.locate("train", 1) == f"{jsonl_dir / 'train.jsonl'}:3"
    # other file names and an image folder elsewhere
    (jsonl_dir / "other").mkdir()
    write_jsonl(jsonl_dir / "other" / "mine.jsonl", [{"image": "red.png", "text": "x"}])
    moved = JsonlSource(str(jsonl_dir / "other"), image_root=str(jsonl_dir / "images"),
                        splits={"train": "mine.jsonl"})
    assert Path(moved.record("train", 0)["image"]) == jsonl_dir / "images" / "red.png"


@pytest.mark.parametrize("index, message", [
    (2, r"val.jsonl:3: invalid JSON \(.* at column \d+\)"),
    (3, r"val.jsonl:4: expected a JSON object, found a JSON list"),
    (4, r"val.jsonl:5: field 'image': expected a file path .* found 7"),
    (5, r"val.jsonl:6: field 'image': .*green.png does not exist"),
])
def test_jsonl_errors_name_file_line_and_field(jsonl_dir: Path, index: int, message: str) -> None:
    source = JsonlSource(str(jsonl_dir))
    with pytest.raises(RecordError, match=message):
        source.record("val", index)


def test_jsonl_missing_fields_and_files_are_named(jsonl_dir: Path) -> None:
    from tasks.vqa import VQATask

    source = JsonlSource(str(jsonl_dir))
    dm = datamodule([VQATask(source)])
    with pytest.raises(RecordError, match=r"val.jsonl:2: .*'v1'.*lacks field\(s\) \['question'\]"):
        build_sample(dm.tasks[0], "val", 1, dm.context, train=False)
    assert build_sample(dm.tasks[0], "val", 0, dm.context, train=False).meta["id"] == "v0"
    with pytest.raises(FileNotFoundError, match="split 'test' needs .*test.jsonl, which does not exist"):
        source.size("test")
    with pytest.raises(ValueError, match="no file for split 'dev'"):
        source.size("dev")
    with pytest.raises(ValueError, match="is a file"):
        JsonlSource(str(jsonl_dir / "val.jsonl"))


def test_skip_bad_records_warns_and_keeps_the_rest(jsonl_dir: Path) -> None:
    from tasks.vqa import VQATask

    dm = datamodule([VQATask(JsonlSource(str(jsonl_dir)))], eval_batch_size=6, skip_bad_records=True)
    loader, = dm.val_dataloader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch, = list(loader)
    assert ids(batch) == [("vqa", "v0")]
    skipped = [str(w.message) for w in caught]
    assert len(skipped) == 5 and all(m.startswith("skipped: ") for m in skipped)
    assert "val.jsonl:3: invalid JSON" in skipped[1]
    strict = datamodule([VQATask(JsonlSource(str(jsonl_dir)))], eval_batch_size=6)
    with pytest.raises(RecordError, match="val.jsonl:2"):
        list(strict.val_dataloader()[0])


# ---------------------------------------------------------------- the training stream
def test_permute_is_a_bijection() -> None:
    for size in (1, 2, 3, 10, 97, 1000):
        for key in (0, 12345):
            assert sorted(permute(i, size, key) for i in range(size)) == list(range(size))
    assert [permute(i, 1000, 1) for i in range(20)] != [permute(i, 1000, 2) for i in range(20)]
    assert [permute(i, 1000, 1) for i in range(20)] != list(range(20))


def test_stream_is_deterministic(context: SampleContext) -> None:
    first = stream_ids(TrainStream(mixture(), context, batch_size=4, seed=5), 6)
    again = stream_ids(TrainStream(mixture(), context, batch_size=4, seed=5), 6)
    other = stream_ids(TrainStream(mixture(), context, batch_size=4, seed=6), 6)
    assert first == again and first != other
    # endless sources read record g for global sample g
    assert [i for b in first for _, i in b] == [f"{'a' if t == 'echo' else 'b'}-train-{g}"
                                                for g, (t, _) in enumerate(x for b in first for x in b)]


def test_task_weights_are_respected(context: SampleContext) -> None:
    tasks = [EchoTask(CountingSource("a"), weight=1.0), ShoutTask(CountingSource("b"), weight=3.0)]
    stream = TrainStream(tasks, context, batch_size=8, seed=0)
    counts = Counter(stream.task_index(g) for g in range(2000))
    assert abs(counts[0] / 2000 - 0.25) < 0.05 and abs(counts[1] / 2000 - 0.75) < 0.05


def test_phases_change_the_weights_from_their_start(context: SampleContext) -> None:
    phases = [MixturePhase(1000, {"echo": 0.0}), MixturePhase(2000, {"shout": 1.0})]
    stream = TrainStream(mixture((1.0, 3.0)), context, batch_size=8, seed=0, phases=phases)
    plain = TrainStream(mixture((1.0, 3.0)), context, batch_size=8, seed=0)
    # before the first phase the stream is the plain mixture's, sample for sample
    assert [stream.task_index(g) for g in range(1000)] == [plain.task_index(g) for g in range(1000)]
    assert {stream.task_index(g) for g in range(1000, 2000)} == {1}  # echo left out
    # the second phase names only shout: echo is back at its own weight 1.0, shout at 1.0
    assert abs(Counter(stream.task_index(g) for g in range(2000, 6000))[0] / 4000 - 0.5) < 0.05
    from_zero = TrainStream(mixture((1.0, 3.0)), context, 8, phases=[MixturePhase(0, {"shout": 0})])
    assert {from_zero.task_index(g) for g in range(500)} == {0}


@pytest.mark.parametrize("phases, message", [
    ([MixturePhase(-1, {"echo": 2.0})], r"phases\[0\] \(start -1\): phases must start at sample 0"),
    ([MixturePhase(10, {}), MixturePhase(10, {})], r"phases\[1\] .* after the previous one \(10\)"),
    ([MixturePhase(10, {"caption": 1.0})], r"unknown tasks \['caption'\]; the mixture has \['echo', 'shout'\]"),
    ([MixturePhase(10, {"echo": -1.0})], r"weights must be >= 0 with one positive, got \{'echo': -1.0"),
    ([MixturePhase(10, {"echo": 0, "shout": 0})], "weights must be >= 0 with one positive"),
])
def test_bad_phases_are_refused_when_the_datamodule_is_built(
        phases: list[MixturePhase], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        datamodule(mixture(), phases=phases)


def test_ranks_together_see_the_batch_of_one_process_with_double_batch_size(
        context: SampleContext) -> None:
    single = stream_ids(TrainStream(mixture(), context, batch_size=6, seed=1), 4)
    ranks = [stream_ids(TrainStream(mixture(), context, batch_size=3, seed=1, rank=r, world_size=2), 4)
             for r in range(2)]
    for step in range(4):
        # contiguous sharding: rank 0's batch, then rank 1's, is the single-process batch
        assert ranks[0][step] + ranks[1][step] == single[step]
    assert TrainStream(mixture(), context, 3, rank=1, world_size=2).global_indices(2) == range(15, 18)


def test_start_continues_the_stream_exactly(context: SampleContext) -> None:
    whole = stream_ids(TrainStream(mixture(), context, batch_size=4, seed=2), 5)
    resumed = stream_ids(TrainStream(mixture(), context, batch_size=4, seed=2, start=2 * 4), 3)
    assert resumed == whole[2:]


def test_finite_sources_are_reshuffled_per_pass(context: SampleContext) -> None:
    size = 10
    records = {"train": [{"id": f"r{i}", "text": f"n {i}"} for i in range(size)]}
    stream = TrainStream([EchoTask(MemorySource(records, "ten"))], context, batch_size=5, seed=0)
    passes = [[stream.record_index(0, g) for g in range(p * size, (p + 1) * size)] for p in range(3)]
    assert all(sorted(p) == list(range(size)) for p in passes)  # each record once per pass
    assert passes[0] != passes[1] != passes[2]
    assert [i for b in stream_ids(stream, 2) for _, i in b] == [f"r{i}" for i in passes[0]]


def test_random_choices_in_build_sample_are_part_of_the_stream(context: SampleContext) -> None:
    from tasks.caption import CaptionTask

    captions = [f"caption number {k}" for k in range(8)]
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    source = MemorySource({"train": [{"id": "c", "image": image, "captions": captions}]})
    stream = TrainStream([CaptionTask(source)], context, batch_size=16, seed=0)
    first = next(stream.batches()).target
    import random
    random.seed(123)  # the global states do not matter, and are left as they were
    torch.manual_seed(123)
    state, torch_state = random.getstate(), torch.get_rng_state()
    assert torch.equal(next(stream.batches()).target, first)
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)
    assert len({tuple(row.tolist()) for row in first}) > 1  # and the choice still varies


def test_dataloader_workers_do_not_change_the_stream() -> None:
    from tasks.vqa import VQATask

    def take(num_workers: int) -> list:
        dm = datamodule([VQATask(ShapesWorldSource("vqa")), EchoTask(CountingSource("a"))],
                        batch_size=3, num_workers=num_workers, tokenizer_texts=20)
        loader = dm.train_dataloader()
        batches = iter(loader)
        return [ids(next(batches)) for _ in range(5)]

    assert take(2) == take(0)


def test_mixed_batches_collate_text_only_beside_images() -> None:
    from tasks.visual_grounding import VisualGroundingTask

    dm = datamodule([VisualGroundingTask(ShapesWorldSource("visual_grounding")),
                     EchoTask(CountingSource("a"))], batch_size=8, tokenizer_texts=30)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch.tasks) == {"visual_grounding", "echo"}
    has_image = torch.tensor([t == "visual_grounding" for t in batch.tasks])
    assert batch.patch_images.shape == (8, 3, 32, 32)
    assert torch.equal(batch.patch_masks, has_image)
    assert not batch.patch_images[~has_image].any()
    assert batch.src_tokens.shape[0] == batch.target.shape[0] == 8


# ---------------------------------------------------------------- the datamodule
def test_validation_has_one_dataloader_per_task() -> None:
    from tasks.caption import CaptionTask
    from tasks.visual_grounding import VisualGroundingTask
    from tasks.vqa import VQATask

    dm = datamodule([CaptionTask(ShapesWorldSource("caption", val_size=5, test_size=3)),
                     VQATask(ShapesWorldSource("vqa", val_size=7, test_size=3)),
                     VisualGroundingTask(ShapesWorldSource("visual_grounding", val_size=2))],
                    batch_size=4, max_eval_samples=6, tokenizer_texts=30, vocab_size=1000)
    loaders = dm.val_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [5, 6, 2]
    assert [loader.dataset.task for loader in loaders] == dm.tasks
    for task, loader in zip(dm.tasks, loaders):
        batch = next(iter(loader))
        assert set(batch.tasks) == {task.name} and len(batch) == min(4, len(loader.dataset))
        assert batch.meta[0]["id"] == f"shapes-{task.name}-val-0"
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [3, 3, 6]
    # the trained vocabulary spells the world's words and the instructions in few tokens
    assert len(dm.vocab.encode(" what does the image describe?")) <= 6
    assert len(dm.vocab.encode(" how many shapes are there?")) == 6  # words, then "?"
    assert len(dm.vocab.encode(" the large red circle")) == 4


def test_validate_reports_each_task_under_its_own_dataloader(tmp_path: Path) -> None:
    """`validate` returns one dict per loader: that task's metrics only, computed over all
    of its batches (here two per task), not a copy of every task's numbers."""
    from ofa_lightning.module import OFAModule
    from tasks.visual_grounding import VisualGroundingTask
    from tasks.vqa import VQATask

    vqa = VQATask(ShapesWorldSource("vqa", val_size=5), decode_mode="trie")
    grounding = VisualGroundingTask(ShapesWorldSource("visual_grounding", val_size=5))
    dm = datamodule([vqa, grounding], eval_batch_size=3, tokenizer_texts=30, num_bins=16)
    dm.setup("validate")
    module = OFAModule("nano", model_overrides={"encoder_layers": 1, "decoder_layers": 1,
                                                "embed_dim": 32, "ffn_dim": 64},
                       vocab=dm.vocab, tasks=dm.tasks)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few workers
        vqa_results, grounding_results = trainer.validate(module, datamodule=dm, verbose=False)
    assert {key.split("/")[1] for key in grounding_results} == {"visual_grounding"}

    module.eval()
    by_type: dict[str, list[bool]] = {}
    with torch.no_grad():
        for batch in dm.val_dataloader()[0]:
            for prediction, meta in zip(vqa.predict(module.model, batch, dm.vocab), batch.meta):
                kind = meta["answer_type"].replace("/", "_")
                by_type.setdefault(kind, []).append(prediction.strip() in meta["answers"])
    assert set(vqa_results) == {"val/vqa/loss", "val/vqa/accuracy",
                                *(f"val/vqa/accuracy_{kind}" for kind in by_type)}
    assert vqa_results["val/vqa/accuracy"] == pytest.approx(sum(map(sum, by_type.values())) / 5)
    for kind, hits in by_type.items():
        assert vqa_results[f"val/vqa/accuracy_{kind}"] == pytest.approx(sum(hits) / len(hits))


def test_vocab_choices(tmp_path: Path) -> None:
    dm = datamodule(mixture())
    assert dm.context.vocab is dm.vocab and dm.context.image_size == 32
    dm.vocab.save(tmp_path / "saved")
    assert datamodule(mixture(), vocab=str(tmp_path / "saved")).vocab == dm.vocab
    with pytest.raises(FileNotFoundError, match="encoder.json, vocab.bpe, dict.txt.*it holds nothing"):
        (tmp_path / "empty").mkdir()
        datamodule(mixture(), vocab=str(tmp_path / "empty"))
    if BPE_DIR.is_dir():
        assert len(datamodule(mixture(), vocab=str(BPE_DIR)).vocab) == 59457


def test_datamodule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        datamodule([])
    with pytest.raises(ValueError, match="task 'echo' .* has no source"):
        datamodule([EchoTask()])
    with pytest.raises(ValueError, match=r"repeated: \['echo'\]"):
        datamodule([EchoTask(CountingSource()), EchoTask(CountingSource())])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        datamodule(mixture(), batch_size=0)
    with pytest.raises(ValueError, match="val split of CountingSource.* is endless"):
        class Endless(CountingSource):
            def size(self, split: str) -> None:
                return None
        datamodule([EchoTask(Endless())]).val_dataloader()


def test_sources_are_record_sources_for_the_cli(jsonl_dir: Path) -> None:
    """jsonargparse checks a class_path source against the RecordSource protocol, with the
    exact annotations; every source here and the plugin source above pass."""
    from jsonargparse import ArgumentParser

    from ofa_lightning.task import RecordSource

    parser = ArgumentParser()
    parser.add_argument("--source", type=RecordSource)
    for class_path, init_args in [
            ("datamodules.sources.ShapesWorldSource", {"kind": "vqa", "val_size": 3}),
            ("datamodules.sources.JsonlSource", {"path": str(jsonl_dir)}),
            ("datamodules.sources.MemorySource", {"splits": {"val": [{"id": "m"}]}})]:
        config = parser.parse_object({"source": {"class_path": class_path, "init_args": init_args}})
        source = parser.instantiate(config).source
        assert type(source).__name__ == class_path.rsplit(".", 1)[1] and source.size("val") >= 1
    from jsonargparse._typehints import implements_protocol
    assert implements_protocol(CountingSource, RecordSource)


def test_task_datamodule_is_the_single_task_case() -> None:
    from jsonargparse import ArgumentParser

    dm = TaskDataModule(EchoTask(CountingSource()), batch_size=2, vocab_size=300, tokenizer_texts=20)
    assert isinstance(dm, MultiTaskDataModule) and [t.name for t in dm.tasks] == ["echo"]
    assert ids(next(iter(dm.train_dataloader()))) == [("echo", "n-train-0"), ("echo", "n-train-1")]
    parser = ArgumentParser()
    parser.add_class_arguments(TaskDataModule, "data")
    options = {a.dest for a in parser._actions}
    assert {"data.batch_size", "data.vocab", "data.max_eval_samples"} <= options


# ---------------------------------------------------------------- with a real Trainer
class Recorder(pl.LightningModule):
    """Records what each training step sees (and writes it to ``out`` per rank). Like
    OFAModule it asks for estimated_stepping_batches in configure_optimizers: with
    max_epochs set, that makes Lightning build and iterate the training dataloader (and
    prefetch a batch) before it restores the step counter of a checkpoint. Like OFAModule it
    destroys the gloo process group at exit, without which a finished DDP run can abort."""

    def __init__(self, out: Path | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[tuple[str, str]]] = []
        self.out = out

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.seen.append(ids(batch))
        return self.layer(batch.weights[:, None]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.trainer.estimated_stepping_batches == self.trainer.max_steps
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self) -> None:
        if self.out is not None:
            (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


def fit(dm: MultiTaskDataModule, root: Path, max_steps: int, ckpt_path: str | Path | None = None,
        **trainer_kwargs: Any) -> Recorder:
    model = Recorder(trainer_kwargs.pop("out", None))
    kwargs = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(root),
                  default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=root / "ckpt",
                                                                  every_n_train_steps=2,
                                                                  save_top_k=-1)])
    trainer = pl.Trainer(**{**kwargs, **trainer_kwargs})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|val_dataloader|"
                                          "IterableDataset|mid-epoch|num_workers|dirpath).*")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def make_dm(**kwargs: Any) -> MultiTaskDataModule:
    return datamodule(mixture(), **{"batch_size": 3, "seed": 4, **kwargs})


@pytest.mark.parametrize("max_epochs", [None, 5])
def test_trainer_saves_the_vocab_and_a_resumed_run_continues_the_stream(
        tmp_path: Path, max_epochs: int | None) -> None:
    whole = fit(make_dm(), tmp_path / "whole", max_steps=6, max_epochs=max_epochs)
    saved = tmp_path / "whole" / "lightning_logs" / "version_0" / "vocab"
    assert UnifiedVocab.load(saved) == make_dm().vocab
    assert whole.seen == stream_ids(TrainStream(mixture(), make_dm().context, batch_size=3, seed=4), 6)

    checkpoint = tmp_path / "whole" / "ckpt" / "epoch=0-step=2.ckpt"
    state = torch.load(checkpoint, weights_only=True)["MultiTaskDataModule"]
    assert state["samples"] == 6 and state["global_step"] == 2
    resumed = fit(make_dm(), tmp_path / "resumed", max_steps=6, ckpt_path=checkpoint,
                  max_epochs=max_epochs)
    assert resumed.seen == whole.seen[2:]

    # 2 micro-batches per optimizer step: a checkpoint at step 2 has consumed 4 batches
    accumulated = fit(make_dm(), tmp_path / "accumulated", max_steps=2, accumulate_grad_batches=2,
                      max_epochs=max_epochs)
    assert accumulated.seen == whole.seen[:4]
    again = fit(make_dm(), tmp_path / "again", max_steps=3, accumulate_grad_batches=2,
                ckpt_path=tmp_path / "accumulated" / "ckpt" / "epoch=0-step=2.ckpt",
                max_epochs=max_epochs)
    assert again.seen == whole.seen[4:6]


def test_a_resumed_run_continues_a_phased_stream_and_warns_when_the_phases_change(
        tmp_path: Path) -> None:
    phases = [MixturePhase(9, {"echo": 0.0})]  # from step 3 on (3 samples per step)
    whole = fit(make_dm(phases=phases), tmp_path / "whole", max_steps=6)
    expected = stream_ids(TrainStream(mixture(), make_dm().context, batch_size=3, seed=4,
                                      phases=phases), 6)
    assert whole.seen == expected and expected != stream_ids(
        TrainStream(mixture(), make_dm().context, batch_size=3, seed=4), 6)
    assert all(task == "shout" for batch in whole.seen[3:] for task, _ in batch)

    checkpoint = tmp_path / "whole" / "ckpt" / "epoch=0-step=2.ckpt"
    resumed = fit(make_dm(phases=phases), tmp_path / "resumed", max_steps=6, ckpt_path=checkpoint)
    assert resumed.seen == whole.seen[2:]
    with pytest.warns(UserWarning, match=r"different training mixture \(phases: \[\[9, \{'echo': 0.0\}\]\] -> \[\]\)"):
        fit(make_dm(), tmp_path / "changed", max_steps=3, ckpt_path=checkpoint)


def test_resume_from_a_checkpoint_without_datamodule_state(tmp_path: Path) -> None:
    whole = fit(make_dm(), tmp_path / "whole", max_steps=4)
    checkpoint = torch.load(tmp_path / "whole" / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    del checkpoint["MultiTaskDataModule"]
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    with pytest.warns(UserWarning, match="holds no MultiTaskDataModule state"):
        resumed = fit(make_dm(), tmp_path / "resumed", max_steps=4, ckpt_path=tmp_path / "foreign.ckpt")
    assert resumed.seen == whole.seen[2:]  # global_step was restored before iterating


def test_ddp_ranks_see_the_global_batch_of_one_process(tmp_path: Path) -> None:
    """Real DDP, 2 CPU processes: each step's two rank batches are the single-process
    batch of twice the size, in rank order."""
    fit(make_dm(batch_size=2), tmp_path / "ddp", max_steps=3, devices=2, strategy="ddp_spawn",
        out=tmp_path, callbacks=[])
    single = stream_ids(TrainStream(mixture(), make_dm().context, batch_size=4, seed=4), 3)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [[tuple(x) for x in a + b] for a, b in zip(*ranks)] == single
