"""Task plugins caption / vqa / visual_grounding: official prompts and ids, record checks,
box round trips, and predictions of a small random model end to end."""

from __future__ import annotations

import io
import pickle
import random

import pytest
import torch
from PIL import Image

from datamodules.shapes_world import Scene, ShapesWorld
from ofa_lightning.data import collate
from ofa_lightning.generation import generate
from ofa_lightning.task import RecordError, SampleContext
from ofa_lightning.vocab import UnifiedVocab
from tasks._text import pre_caption, pre_question
from tasks.caption import CaptionTask
from tasks.visual_grounding import VisualGroundingTask
from tasks.vqa import VQATask

IMAGE_SIZE = 64


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=11)


@pytest.fixture(scope="module")
def scenes(world: ShapesWorld) -> list[Scene]:
    return [world.scene(i, "val") for i in range(3)]


@pytest.fixture(scope="module")
def vocab(world: ShapesWorld) -> UnifiedVocab:
    return UnifiedVocab.train(world.all_text(40), vocab_size=512, num_codes=64)


@pytest.fixture(scope="module")
def context(vocab: UnifiedVocab) -> SampleContext:
    return SampleContext(vocab, IMAGE_SIZE)


class FakeSource:
    """A record source as the datamodules provide: describe() and answer_candidates()."""

    def __init__(self, candidates: list[str] | None = None) -> None:
        self._candidates = candidates

    def records(self, split: str):
        return iter(())

    def describe(self) -> str:
        return "FakeSource(/data/refs.tsv)"

    def answer_candidates(self) -> list[str]:
        return list(self._candidates or [])


def image(width: int = 40, height: int = 30, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def caption_records(scene: Scene) -> list[dict]:
    return [{"id": scene.id, "image": scene.image, "captions": scene.captions}]


def vqa_records(scene: Scene) -> list[dict]:
    return [{"id": f"{scene.id}/q{i}", "image": scene.image, "question": q, "answers": {a: 1.0}}
            for i, (q, a) in enumerate(scene.questions[:4])]


def grounding_records(scene: Scene) -> list[dict]:
    return [{"id": f"{scene.id}/r{i}", "image": scene.image, "text": text, "box": box}
            for i, (text, box) in enumerate(scene.referring[:4])]


def shapes_answers(scenes: list[Scene]) -> list[str]:
    return sorted({a for s in scenes for _, a in s.questions})


# ---------------------------------------------------------------------- prompts and text
def test_instructions_are_the_official_strings():
    assert CaptionTask.instruction == " what does the image describe?"
    assert VQATask.instruction == " {}"
    assert VisualGroundingTask.instruction == ' which region does the text " {} " describe?'
    assert (CaptionTask.name, VQATask.name, VisualGroundingTask.name) == (
        "caption", "vqa", "visual_grounding")
    assert VQATask().fill_instruction("what is it?") == " what is it?"
    assert VisualGroundingTask().fill_instruction("a man") == \
        ' which region does the text " a man " describe?'


def test_official_decoding_settings():
    caption = CaptionTask().generation
    assert (caption.beam, caption.max_len_a, caption.max_len_b, caption.min_len,
            caption.no_repeat_ngram_size) == (5, 0, 16, 1, 3)
    grounding = VisualGroundingTask().generation
    assert (grounding.beam, grounding.min_len, grounding.max_len_a, grounding.max_len_b,
            grounding.no_repeat_ngram_size) == (5, 4, 0, 4, 3)
    vqa = VQATask().generation
    assert vqa.beam == 5 and vqa.normalize_scores is False  # --unnormalized
    assert VQATask(prompt_type="prev_output").generation.max_len_a == 1.0
    assert CaptionTask(generation={"beam": 2}).generation.beam == 2


@pytest.mark.parametrize("text, expected", [
    ("  A Man -- riding/a horse.  ", "a man riding a horse."),
    (",.!?*#:;~Hello  world", "hello world"),
    ("a <person> on a bike", "a person on a bike"),
    ("one two three four five", "one two three"),
])
def test_pre_caption(text, expected):
    assert pre_caption(text, 3 if "five" in text else 20) == expected


def test_pre_question_keeps_person_tag_and_truncates():
    assert pre_question("Is the <person> LEFT-handed?", 20) == "is the <person> left handed?"
    assert pre_question("a b c d", 2) == "a b"


# ---------------------------------------------------------------------- exact ids (official BPE)
def test_caption_sample_has_the_official_ids(official_vocab):
    ctx = SampleContext(official_vocab, 32)
    task = CaptionTask()
    record = {"id": 7, "image": image(), "captions": ["A man riding a horse on the beach",
                                                      "a horse"]}
    sample = task.build_sample(record, ctx, train=False)
    assert sample.source.tolist() == [0, 99, 473, 5, 2274, 6190, 116, 2]
    assert sample.target.tolist() == [10, 313, 5793, 10, 5253, 15, 5, 4105, 2]
    assert sample.prev_output.tolist() == [0, 10, 313, 5793, 10, 5253, 15, 5, 4105]
    assert sample.image.shape == (3, 32, 32) and sample.weight == 1.0
    assert sample.meta == {"id": 7, "references": record["captions"]}
    assert task.decode(sample.target, official_vocab, sample.meta) == \
        "a man riding a horse on the beach"
    # the official fine-tuning form deletes punctuation first
    punctuated = {**record, "captions": ["A man, riding a horse on the beach."]}
    stripped = CaptionTask(remove_punctuation=True).build_sample(punctuated, ctx, train=False)
    assert stripped.target.tolist() == sample.target.tolist()


def test_caption_training_picks_one_reference(context):
    captions = ["a red circle", "a blue square", "two shapes"]
    record = {"id": "c", "image": image(), "captions": captions}
    task = CaptionTask(max_target_length=2)
    random.seed(0)
    seen = {context.vocab.decode(task.build_sample(record, context, train=True).target).strip()
            for _ in range(40)}
    assert seen == {"a red", "a blue", "two shapes"}  # truncated to 2 words, all chosen
    assert task.build_sample(record, context, train=False).meta["references"] == captions


def test_vqa_sample_has_the_official_ids_and_confidence_weight(official_vocab):
    ctx = SampleContext(official_vocab, 32)
    record = {"id": "q1", "image": image(), "question": "What color is the car",
              "answers": {"one dog": 0.3, "two dogs": 0.6}}
    sample = VQATask().build_sample(record, ctx, train=True)
    assert sample.source.tolist() == [0, 99, 3195, 16, 5, 512, 116, 2]  # "?" appended
    assert sample.target.tolist() == [80, 3678, 2]
    assert sample.prev_output.tolist() == [0, 80, 3678]
    assert sample.weight == pytest.approx(0.6)
    assert sample.meta == {"id": "q1", "answers": {"one dog": 0.3, "two dogs": 0.6},
                           "answer_type": "other",  # "two dogs" is not a bare number
                           "image_size": (40, 30), "ratios": (32 / 40, 32 / 30)}

    prompted = VQATask(prompt_type="prev_output").build_sample(record, ctx, train=True)
    assert prompted.source.tolist() == sample.source.tolist()
    assert prompted.prev_output.tolist() == [0, 99, 3195, 16, 5, 512, 116, 80, 3678]
    assert prompted.target.tolist() == [1] * 6 + [80, 3678, 2]  # loss on answer + eos only
    assert prompted.weight == pytest.approx(0.6)


@pytest.mark.parametrize("answers, best, weight", [
    (["yes", "no"], "yes", 1.0),  # a list: 1.0 each, the first of equals wins
    ("two", "two", 1.0),
    ({"red": 0.3, "blue": 0.9, "green": 0.9}, "blue", 0.9),
    ({" red ": 1}, "red", 1.0),
])
def test_vqa_answer_forms(context, answers, best, weight):
    record = {"id": 1, "image": image(), "question": "what?", "answers": answers}
    sample = VQATask().build_sample(record, context, train=True)
    assert context.vocab.decode(sample.target) == f" {best}"
    assert sample.weight == pytest.approx(weight)
    assert best in sample.meta["answers"]


def test_grounding_sample_quantises_the_resized_box(official_vocab):
    size = 512
    ctx = SampleContext(official_vocab, size)
    box = (100.0, 50.0, 300.0, 390.0)  # no coordinate on a rounding tie
    record = {"id": "g1", "image": image(640, 480), "text": "The Man-on the left", "box": box}
    sample = VisualGroundingTask().build_sample(record, ctx, train=False)
    assert official_vocab.decode(sample.source) == \
        ' which region does the text " the man on the left " describe?'
    w_ratio, h_ratio = size / 640, size / 480
    resized = (box[0] * w_ratio, box[1] * h_ratio, box[2] * w_ratio, box[3] * h_ratio)
    bins = [round(c / size * 999) for c in resized]
    assert sample.target.tolist() == [official_vocab.bin_id(b) for b in bins] + [2]
    assert sample.target.tolist()[:4] == [58457 + b for b in bins]  # the official bin ids
    assert sample.meta["box"] == list(box)
    assert sample.meta["ratios"] == pytest.approx((w_ratio, h_ratio))
    assert sample.meta["image_size"] == (640, 480)


@pytest.mark.parametrize("image_size", [64, 480])
def test_grounding_box_round_trip_within_half_a_bin(official_vocab, image_size):
    ctx = SampleContext(official_vocab, image_size)
    task = VisualGroundingTask()
    width, height = 300, 170  # not square: the two ratios differ
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.rand(2, generator=generator).sort().values * width
        y = torch.rand(2, generator=generator).sort().values * height
        box = [float(x[0]), float(y[0]), float(x[1]) + 1e-3, float(y[1]) + 1e-3]
        sample = task.build_sample({"id": 0, "image": image(width, height), "text": "it",
                                    "box": box}, ctx, train=False)
        decoded = task.decode(sample.target, official_vocab, sample.meta)
        half_bin = image_size / (official_vocab.num_bins - 1) / 2  # in model pixels
        w_ratio, h_ratio = sample.meta["ratios"]
        tolerance = torch.tensor([half_bin / w_ratio, half_bin / h_ratio] * 2) + 1e-3
        assert ((decoded - torch.tensor(box)).abs() <= tolerance).all(), (box, decoded)
    # edges: the whole image maps to bins 0 and 999 and back
    whole = task.build_sample({"id": 0, "image": image(width, height), "text": "all",
                               "box": [0, 0, width, height]}, ctx, train=False)
    assert official_vocab.bin_index(whole.target[:4]).tolist() == [0, 0, 999, 999]
    assert task.decode(whole.target, official_vocab, whole.meta).tolist() == \
        pytest.approx([0, 0, width, height], abs=1e-3)


def test_grounding_decode_of_malformed_output_is_a_miss(vocab):
    task = VisualGroundingTask()
    meta = {"max_image_size": IMAGE_SIZE, "ratios": (1.0, 1.0)}
    b = vocab.bin_id
    for tokens in ([b(1), b(2), b(3), vocab.eos],  # three bins
                   [b(1), vocab.bos, b(3), b(4), vocab.eos],  # a special inside
                   [b(5), b(5), b(1), b(9), vocab.eos],  # x1 < x0
                   [vocab.eos]):
        assert task.decode(torch.tensor(tokens), vocab, meta).tolist() == [0, 0, 0, 0]
    good = task.decode(torch.tensor([b(0), b(1), b(2), b(3), vocab.eos]), vocab, meta)
    assert good.shape == (4,) and good[2] > 0


# ---------------------------------------------------------------------- record errors
@pytest.mark.parametrize("task, record, field", [
    (CaptionTask(), {"id": "r1", "image": image()}, "captions"),
    (VQATask(), {"id": "r1", "image": image(), "answers": ["yes"]}, "question"),
    (VQATask(), {"id": "r1", "image": image(), "question": "q?"}, "answers"),
    (VisualGroundingTask(), {"id": "r1", "image": image(), "text": "it"}, "box"),
    (VisualGroundingTask(), {"id": "r1", "text": "it", "box": [0, 0, 1, 1]}, "image"),
])
def test_missing_field_names_field_and_record(context, task, record, field):
    with pytest.raises(RecordError, match=rf"'r1'.*'{field}'"):
        task.build_sample(record, context, train=True)


@pytest.mark.parametrize("task, extra", [
    (CaptionTask(), {"captions": ["a cat"]}),
    (VQATask(), {"question": "q?", "answers": ["yes"]}),
    (VisualGroundingTask(), {"text": "it", "box": [0, 0, 1, 1]}),
])
def test_undecodable_image_names_the_record(context, task, extra):
    record = {"id": "broken-7", "image": b"definitely not a png", **extra}
    with pytest.raises(RecordError, match="broken-7.*does not decode"):
        task.build_sample(record, context, train=False)


@pytest.mark.parametrize("box, problem", [
    ([10, 5, 41, 20], "outside the 40x30 image"),
    ([-1, 5, 20, 20], "outside"),
    ([10, 5, 20, 31], "outside"),
    ([20, 5, 10, 20], "degenerate or inverted"),
    ([10, 5, 10, 20], "degenerate or inverted"),
    ([10, 5, 20], "must hold 4 numbers"),
    ([10, 5, 20, float("nan")], "non-finite"),
    ("10,5,20,20", "sequence of numbers"),
])
def test_bad_box_is_a_record_error(context, box, problem):
    task = VisualGroundingTask(source=FakeSource())
    record = {"id": "g9", "image": image(40, 30), "text": "it", "box": box}
    with pytest.raises(RecordError, match=r"FakeSource\(/data/refs.tsv\): record 'g9' field "
                                          r"'box'") as error:
        task.build_sample(record, context, train=False)
    assert problem in str(error.value)


@pytest.mark.parametrize("task, record, field", [
    (CaptionTask(), {"captions": []}, "captions"),
    (CaptionTask(), {"captions": ["ok", 3]}, "captions"),
    (CaptionTask(), {"captions": ["..."]}, "captions"),  # empty once normalised
    (VQATask(), {"question": "  ", "answers": ["yes"]}, "question"),
    (VQATask(), {"question": "q?", "answers": {"yes": -0.5}}, "answers"),
    (VQATask(), {"question": "q?", "answers": {}}, "answers"),
    (VQATask(), {"question": "q?", "answers": 3}, "answers"),
    (VisualGroundingTask(), {"text": 5, "box": [0, 0, 1, 1]}, "text"),
])
def test_bad_values_are_record_errors(context, task, record, field):
    record = {"id": "x1", "image": image(), **record}
    with pytest.raises(RecordError, match=rf"task '{task.name}': record 'x1' field '{field}'"):
        task.build_sample(record, context, train=True)


def test_bad_init_args_are_value_errors():
    with pytest.raises(ValueError, match="decode_mode"):
        VQATask(decode_mode="greedy")
    with pytest.raises(ValueError, match="prompt_type"):
        VQATask(prompt_type="src")
    with pytest.raises(ValueError, match="max_source_length"):
        VisualGroundingTask(max_source_length=0)
    with pytest.raises(ValueError, match="scorers"):
        CaptionTask(scorers=("cider", "spice"))
    with pytest.raises(ValueError, match="candidates"):
        VQATask(candidates=["yes", ""])


def test_image_as_bytes_and_path(context, tmp_path):
    buffer = io.BytesIO()
    image(50, 20).save(buffer, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buffer.getvalue())
    task = VisualGroundingTask()
    for value in (buffer.getvalue(), path, str(path)):
        sample = task.build_sample({"id": 1, "image": value, "text": "it", "box": [0, 0, 50, 20]},
                                   context, train=False)
        assert sample.image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert sample.meta["image_size"] == (50, 20)


# ---------------------------------------------------------------------- ShapesWorld records
def test_shapes_world_records_build(scenes, context):
    vocab = context.vocab
    for scene in scenes:
        for record in caption_records(scene):
            sample = CaptionTask().build_sample(record, context, train=False)
            assert vocab.decode(sample.target).strip() == pre_caption(scene.captions[0], 20)
        for record in vqa_records(scene):
            sample = VQATask().build_sample(record, context, train=True)
            assert vocab.decode(sample.source).strip() == record["question"]
            assert vocab.decode(sample.target).strip() in record["answers"]
        task = VisualGroundingTask()
        for record in grounding_records(scene):
            sample = task.build_sample(record, SampleContext(vocab, 96), train=False)
            decoded = task.decode(sample.target, vocab, sample.meta)
            half_bin = 96 / (vocab.num_bins - 1) / 2 / (96 / IMAGE_SIZE)  # original pixels
            assert (decoded - torch.tensor(record["box"], dtype=torch.float)).abs().max() \
                <= half_bin + 1e-4


# ---------------------------------------------------------------------- predictions end to end
def test_caption_predicts_and_scores(model, vocab, context, scenes):
    task = CaptionTask(tokenizer="simple", generation={"max_len_b": 6})
    samples = [task.build_sample(r, context, train=False) for s in scenes
               for r in caption_records(s)]
    batch = collate(samples, vocab.pad)
    predictions = task.predict(model, batch, vocab)
    assert len(predictions) == len(samples) and all(isinstance(p, str) for p in predictions)
    metrics = task.metrics()
    task.update_metrics(metrics, predictions, batch.meta)
    scores = metrics["captioning"].compute()
    assert set(scores) == {"cider", "bleu4"}
    assert all(torch.isfinite(v) for v in scores.values())


def test_grounding_predicts_four_bins_and_scores(model, vocab, context, scenes):
    task = VisualGroundingTask()
    assert task.constraints(vocab) == {"constraint_range": vocab.bin_range}
    samples = [task.build_sample(r, context, train=False) for s in scenes
               for r in grounding_records(s)]
    batch = collate(samples, vocab.pad)
    hypotheses = generate(model, batch.src_tokens, batch.patch_images, batch.patch_masks,
                          config=task.generation, **task.constraints(vocab))
    for sample in hypotheses:
        tokens = sample[0].tokens
        assert tokens.numel() == 5 and tokens[-1] == vocab.eos
        assert bool(vocab.is_bin(tokens[:4]).all()), tokens
    predictions = task.predict(model, batch, vocab)
    assert all(p.shape == (4,) and bool(torch.isfinite(p).all()) for p in predictions)
    metrics = task.metrics()
    task.update_metrics(metrics, predictions, batch.meta)
    result = metrics["grounding"].compute()
    assert 0.0 <= float(result["acc@0.5"]) <= 1.0 and 0.0 <= float(result["miou"]) <= 1.0


def test_grounding_metrics_score_a_perfect_prediction(vocab, context, scenes):
    task = VisualGroundingTask()
    samples = [task.build_sample(r, context, train=False) for r in grounding_records(scenes[0])]
    predictions = [task.decode(s.target, vocab, s.meta) for s in samples]
    metrics = task.metrics()
    task.update_metrics(metrics, predictions, [s.meta for s in samples])
    assert float(metrics["grounding"].compute()["acc@0.5"]) == 1.0


@pytest.mark.parametrize("prompt_type", ["none", "prev_output"])
@pytest.mark.parametrize("decode_mode", ["beam", "trie", "allcand"])
def test_vqa_predicts_in_every_mode(model, vocab, context, scenes, decode_mode, prompt_type):
    candidates = shapes_answers(scenes)
    task = VQATask(source=FakeSource(candidates), decode_mode=decode_mode,
                   prompt_type=prompt_type, generation={"max_len_b": 4})
    samples = [task.build_sample(r, context, train=False) for s in scenes for r in vqa_records(s)]
    batch = collate(samples, vocab.pad)
    predictions = task.predict(model, batch, vocab)
    assert len(predictions) == len(samples) and all(isinstance(p, str) for p in predictions)
    if decode_mode != "beam":
        assert set(predictions) <= set(candidates), predictions
    if prompt_type == "prev_output" and decode_mode == "beam":
        questions = {vocab.decode(s.source).strip() for s in samples}
        assert not any(q in p for q in questions for p in predictions)  # prompt stripped
    metrics = task.metrics()
    task.update_metrics(metrics, predictions, batch.meta)
    accuracy = float(metrics["accuracy"].compute())
    expected = sum(float(m["answers"].get(p, 0.0)) for p, m in zip(predictions, batch.meta))
    assert accuracy == pytest.approx(expected / len(samples))


def test_vqa_trie_and_allcand_agree_on_single_answer_sets(model, vocab, context, scenes):
    """With one candidate every mode must return it."""
    samples = [VQATask().build_sample(r, context, train=False) for r in vqa_records(scenes[0])]
    batch = collate(samples, vocab.pad)
    for mode in ("trie", "allcand"):
        task = VQATask(decode_mode=mode, candidates=["yes"])
        assert task.predict(model, batch, vocab) == ["yes"] * len(samples)


@pytest.mark.parametrize("answers, given, expected", [
    ({"yes": 1.0, "no": 0.3}, None, "yes/no"), (["No"], None, "yes/no"),
    ({"two": 0.6, "3": 1.0}, None, "number"), (["zero"], None, "number"),
    (["red"], None, "other"), (["yes"], "other", "other"),  # the record's own type wins
])
def test_vqa_answer_type_from_the_record_or_its_best_answer(answers, given, expected, context,
                                                             scenes):
    record = {**vqa_records(scenes[0])[0], "answers": answers}
    if given is not None:
        record["answer_type"] = given
    assert VQATask().build_sample(record, context, train=False).meta["answer_type"] == expected


def test_vqa_bad_answer_type_names_the_record_and_field(context, scenes):
    record = {**vqa_records(scenes[0])[0], "id": "q7", "answer_type": "colour"}
    with pytest.raises(RecordError, match=r"record 'q7' field 'answer_type' is 'colour'; "
                                          r"expected one of \['yes/no', 'number', 'other'\]"):
        VQATask().build_sample(record, context, train=False)


def test_vqa_candidates_come_from_init_file_or_source(tmp_path, vocab):
    path = tmp_path / "answers.txt"
    path.write_text("yes\nno\n\nyes\n two \n", encoding="utf-8")
    assert VQATask(decode_mode="trie", candidates=str(path)).answer_candidates() == \
        ["yes", "no", "two"]
    task = VQATask(decode_mode="allcand", source=FakeSource(["red", "blue"]))
    assert task.answer_candidates() == ["red", "blue"]
    clone = pickle.loads(pickle.dumps(VQATask(decode_mode="trie", candidates=["a", "b"])))
    assert "trie" in clone.constraints(vocab)
    with pytest.raises(ValueError, match="needs candidate answers"):
        VQATask(decode_mode="trie").constraints(vocab)


def test_describe_lists_fields_and_metrics():
    assert CaptionTask(tokenizer="simple").describe()["fields"] == ["image", "captions"]
    assert VQATask().describe()["metrics"] == ["accuracy", "accuracy_by_type"]
    info = VisualGroundingTask().describe()
    assert info["class_path"] == "tasks.visual_grounding.VisualGroundingTask"
    assert info["instruction"] == VisualGroundingTask.instruction
