"""Pretraining task plugins grounded_caption / image_text_match / vqa_image_text_match /
text_infilling: official prompts and ids, negatives, span-masking statistics, deterministic
evaluation samples, metrics against hand-computed values, record errors, and predictions of
a small random model end to end."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from datamodules.shapes_world import NUMBER_WORDS, SHAPES, ShapesWorld
from datamodules.sources import MemorySource, ShapesWorldSource
from ofa_lightning.data import collate
from ofa_lightning.generation import score_candidates
from ofa_lightning.metrics.classification import (LabelAccuracy, TextReconstruction,
                                                  word_edit_distance)
from ofa_lightning.task import RecordError, SampleContext
from ofa_lightning.vocab import UnifiedVocab
from tasks._pretrain import (negative_answer, shift_count, swap_object, yes_no_tokens,
                             yes_no_trie)
from tasks._text import pre_caption
from tasks.grounded_caption import GroundedCaptionTask
from tasks.image_text_match import (SHAPES_WORLD_ANSWER_TYPES, ImageTextMatchTask,
                                    VQAImageTextMatchTask)
from tasks.text_infilling import TextInfillingTask, mask_spans, word_starts
from tasks.visual_grounding import VisualGroundingTask

IMAGE_SIZE = 64
TASKS = (GroundedCaptionTask, ImageTextMatchTask, VQAImageTextMatchTask, TextInfillingTask)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vocab() -> UnifiedVocab:
    """A small BPE trained on ShapesWorld text plus the instructions, as the datamodule
    trains one (so instructions are a few tokens, and " yes" may be split)."""
    texts = list(ShapesWorld(seed=11).all_text(40))
    texts += [t.instruction for t in TASKS] * 20
    return UnifiedVocab.train(texts, vocab_size=512, num_codes=64)


@pytest.fixture(scope="module")
def context(vocab: UnifiedVocab) -> SampleContext:
    return SampleContext(vocab, IMAGE_SIZE)


@pytest.fixture(scope="module")
def sources() -> dict[str, ShapesWorldSource]:
    return {kind: ShapesWorldSource(kind, seed=3, val_size=120)
            for kind in ("caption", "vqa", "visual_grounding", "text")}


def image(width: int = 40, height: int = 30) -> Image.Image:
    return Image.new("RGB", (width, height), (200, 30, 30))


def train_samples(task, records, context, n: int):
    """What the datamodule does: seed the global generators per sample, build with train=True."""
    out = []
    for i in range(n):
        random.seed(i)
        torch.manual_seed(i)
        out.append(task.build_sample(records[i % len(records)], context, train=True))
    return out


# ---------------------------------------------------------------------- prompts
def test_names_and_instructions_are_the_official_strings():
    assert [t.name for t in TASKS] == ["grounded_caption", "image_text_match",
                                       "vqa_image_text_match", "text_infilling"]
    assert GroundedCaptionTask.instruction == "  what does the region describe? region:"
    assert GroundedCaptionTask.instruction.startswith("  w")  # two leading spaces
    assert ImageTextMatchTask().fill_instruction("a cat") == ' does the image describe " a cat "?'
    assert VQAImageTextMatchTask().fill_instruction("how many?", "two") == \
        ' what is the answer to question " how many? ". is " two "?'
    assert TextInfillingTask.instruction == ' what is the complete text of " "?'


# ---------------------------------------------------------------------- grounded caption
def test_grounded_caption_has_the_official_ids(official_vocab):
    size = 512
    ctx = SampleContext(official_vocab, size)
    box = (100.0, 50.0, 300.0, 390.0)
    record = {"id": "g1", "image": image(640, 480), "text": "The Man-on the left", "box": box}
    sample = GroundedCaptionTask().build_sample(record, ctx, train=False)
    w_ratio, h_ratio = size / 640, size / 480
    bins = [round(c / size * 999) for c in (box[0] * w_ratio, box[1] * h_ratio,
                                            box[2] * w_ratio, box[3] * h_ratio)]
    prefix = [1437, 99, 473, 5, 976, 6190, 116, 976, 35]  # 'Ġ' 'Ġwhat' ... 'Ġregion' ':'
    assert sample.source.tolist() == [0, *prefix, *[58457 + b for b in bins], 2]
    assert official_vocab.decode(sample.source) == \
        "  what does the region describe? region:" + "".join(f"<bin_{b}>" for b in bins)
    assert official_vocab.decode(sample.target) == " the man on the left"
    assert sample.target.tolist()[-1] == 2 and sample.prev_output.tolist()[0] == 0
    assert sample.meta["references"] == ["The Man-on the left"] and sample.weight == 1.0
    task = GroundedCaptionTask()
    assert task.decode(sample.target, official_vocab, sample.meta) == "the man on the left"


def test_grounded_caption_region_is_the_grounding_target(sources, context):
    """The same record: the region bins of the source are visual grounding's target bins."""
    task, grounding = GroundedCaptionTask(), VisualGroundingTask()
    for i in range(8):
        record = sources["visual_grounding"].record("val", i)
        region = task.build_sample(record, context, train=False).source[-5:-1]
        assert region.tolist() == grounding.build_sample(record, context, False).target[:4].tolist()
        assert bool(context.vocab.is_bin(region).all())


def test_grounded_caption_query_needs_image_and_box_only(context):
    task = GroundedCaptionTask()
    fields = {"id": "q", "image": image(), **task.query_fields(" 4, 3 20 25")}
    assert fields["box"] == [4.0, 3.0, 20.0, 25.0]
    query = task.build_query(fields, context)
    assert query.target.tolist() == [context.vocab.eos] and query.image.shape == (3, 64, 64)
    assert context.vocab.decode(query.source[:-5]).endswith("region:")
    for text in ("1,2,3", "a,b,c,d", None):
        with pytest.raises(ValueError, match="x0,y0,x1,y1"):
            task.query_fields(text)


# ---------------------------------------------------------------------- image-text matching
def test_image_text_match_official_ids(official_vocab):
    ctx = SampleContext(official_vocab, 32)
    record = {"id": "c1", "image": image(), "captions": ["A b"]}
    task = ImageTextMatchTask(negative_captions=["x y"])
    query = task.build_query(record, ctx)
    assert query.source.tolist() == [0, 473, 5, 2274, 6190, 22, 10, 741, 22, 116, 2]
    assert query.target.tolist() == [4420, 2] and query.meta["label"] == "yes"
    labels = {}
    for i in range(40):
        random.seed(i)
        sample = task.build_sample(record, ctx, train=True)
        labels[sample.meta["label"]] = sample
    assert labels["yes"].source.tolist() == query.source.tolist()
    assert labels["no"].target.tolist() == [117, 2]  # " no"
    assert official_vocab.decode(labels["no"].source) == ' does the image describe " x y "?'


def test_image_text_match_training_draws(sources, context):
    source = sources["caption"]
    task = ImageTextMatchTask(source=source, negative_window=200)
    records = [source.record("val", i) for i in range(60)]
    samples = train_samples(task, records, context, 600)
    negatives = [s for s in samples if s.meta["label"] == "no"]
    assert 0.44 < 1 - len(negatives) / len(samples) < 0.56  # positives with p = 0.5
    swaps = 0
    for k, sample in enumerate(samples):
        if sample.meta["label"] != "no":
            continue
        record = records[k % len(records)]
        own = {pre_caption(c, 80) for c in record["captions"]}
        assert sample.meta["caption"] not in own  # never restates the image's own caption
        assert context.vocab.decode(sample.target) == " no"
        swaps += any(_is_swap(sample.meta["caption"], c, record["objects"]) for c in own)
    # a swap when the record names objects and random() > 0.6: 40 % of the negatives
    assert 0.3 < swaps / len(negatives) < 0.5
    for sample in samples:
        if sample.meta["label"] == "yes":
            assert sample.meta["caption"] in {pre_caption(c, 80) for r in records
                                              for c in r["captions"]}
            assert context.vocab.decode(sample.target) == " yes" and sample.weight == 1.0


def _is_swap(shown: str, caption: str, objects: list[str]) -> bool:
    """Whether ``shown`` is ``caption`` with object words (or their plurals) replaced."""
    a, b = shown.split(), caption.split()
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    return len(a) == len(b) and bool(changed) and all(
        y.rstrip(",.s") in objects or y.rstrip(",.") in objects for _, y in changed)


def test_swap_object_replaces_whole_words_and_plurals():
    rng = random.Random(0)
    out = swap_object("two circles and a circle in a circlet", ["circle"], ["circle", "star"], rng)
    assert out == "two stars and a star in a circlet"
    assert swap_object("a red square", ["circle"], ["star"], rng) is None  # object absent
    assert swap_object("a circle", ["circle", "star"], ["circle", "star"], rng) is None


def test_image_text_match_evaluation_is_deterministic_and_balanced(sources, context):
    source = sources["caption"]
    task = ImageTextMatchTask(source=source, negative_window=200)
    records = [source.record("val", i) for i in range(120)]
    first = []
    for record in records:
        random.seed(len(first))  # the global state must not matter in evaluation
        first.append(task.build_sample(record, context, train=False))
    again = [task.build_sample(r, context, train=False) for r in reversed(records)][::-1]
    assert [s.source.tolist() for s in first] == [s.source.tolist() for s in again]
    assert [s.meta for s in first] == [s.meta for s in again]
    labels = Counter(s.meta["label"] for s in first)
    assert 0.38 < labels["yes"] / len(records) < 0.62
    for sample, record in zip(first, records):
        assert (sample.meta["caption"] == pre_caption(record["captions"][0], 80)) == \
            (sample.meta["label"] == "yes")
    # the draw follows the id, not the position
    moved = task.build_sample({**records[0], "id": "another-id"}, context, train=False)
    keyed = [task.build_sample({**records[0], "id": f"k{i}"}, context, False).meta["label"]
             for i in range(20)]
    assert len(set(keyed)) == 2 and moved.meta == task.build_sample(
        {**records[0], "id": "another-id"}, context, train=False).meta


def test_negative_from_a_list_skips_the_records_own_captions(context):
    record = {"id": 1, "image": image(), "captions": ["A red circle"]}
    task = ImageTextMatchTask(negative_captions=["a red circle", "a blue star"])
    shown = {s.meta["caption"] for s in train_samples(task, [record], context, 30)
             if s.meta["label"] == "no"}
    assert shown == {"a blue star"}
    stuck = ImageTextMatchTask(negative_captions=["A Red  Circle"])  # the same, normalised
    with pytest.raises(RecordError, match=r"record '1' field 'captions' has no negative"):
        for sample in train_samples(stuck, [record], context, 10):
            pass


def test_negative_captions_from_a_file_and_source_without_train_split(tmp_path, context):
    path = tmp_path / "all_captions.txt"
    path.write_text("a blue star\n\n a green square \n", encoding="utf-8")
    task = ImageTextMatchTask(negative_captions=str(path), objects=["Star", "circle"])
    assert task.negative_captions == ["a blue star", "a green square"]
    assert task.objects == ["star", "circle"]
    record = {"id": 2, "image": image(), "captions": ["a red circle"]}
    no_train = ImageTextMatchTask(source=MemorySource({"val": [record]}))
    with pytest.raises(ValueError, match="negative_captions"):
        for sample in train_samples(no_train, [record], context, 10):
            pass


def test_vqa_match_official_ids_and_confidence_weight(official_vocab):
    ctx = SampleContext(official_vocab, 32)
    record = {"id": "q1", "image": image(), "question": "A b", "answers": {"x": 0.3, "a": 0.6}}
    task = VQAImageTextMatchTask(answer_types={"letters": ["a", "x", "b"]})
    query = task.build_query(record, ctx)
    # ' what is the answer to question " a b ". is " a "?'
    assert official_vocab.decode(query.source) == \
        ' what is the answer to question " a b ". is " a "?'
    assert query.source.tolist()[:9] == [0, 99, 16, 5, 1948, 7, 864, 22, 10]
    assert query.target.tolist() == [4420, 2] and query.weight == pytest.approx(0.6)
    negatives = [s for s in train_samples(task, [record], ctx, 40) if s.meta["label"] == "no"]
    assert negatives and {s.meta["answer"] for s in negatives} == {"b"}  # never "a" nor "x"
    assert all(s.weight == pytest.approx(0.6) and s.target.tolist() == [117, 2]
               for s in negatives)
    assert task.query_fields("what is it? | a cat") == {"question": "what is it?",
                                                        "answers": {"a cat": 1.0}}
    with pytest.raises(ValueError, match="question \\| answer"):
        task.query_fields("what is it?")


def test_negative_answers_follow_the_official_recipe():
    types = {k: list(v) for k, v in SHAPES_WORLD_ANSWER_TYPES.items()}
    inverse = {a: k for k, answers in types.items() for a in answers}
    rng = random.Random(0)
    draws = [negative_answer("two", 1.0, {"two": 1.0}, types, inverse, NUMBER_WORDS, rng)
             for _ in range(2000)]
    assert "two" not in draws
    counts = Counter(draws)
    # p > 0.5 and 1.0 > p + 0.1: shifted by one (40 %); p <= 0.5: another count (50 %);
    # p >= 0.9: any answer (10 %)
    shifted = (counts["one"] + counts["three"]) / len(draws)
    expected = 0.4 + 0.5 * 2 / 6 + 0.1 * 2 / 21
    assert abs(shifted - expected) < 0.04
    numbers = sum(counts[n] for n in NUMBER_WORDS) / len(draws)
    assert abs(numbers - (0.9 + 0.1 * 6 / 21)) < 0.03
    # a low confidence goes to the fallback pool (no "other" type: all answers)
    low = Counter(negative_answer("red", 0.05, {"red": 1}, types, inverse, NUMBER_WORDS, rng)
                  for _ in range(500))
    assert len(low) > 10 and "red" not in low
    yes_no = {negative_answer("yes", 1.0, {"yes": 1}, types, inverse, NUMBER_WORDS, rng)
              for _ in range(200)}
    assert "no" in yes_no and "yes" not in yes_no
    assert shift_count("0", NUMBER_WORDS, rng) == "1"
    assert {shift_count("3", NUMBER_WORDS, rng) for _ in range(50)} == {"2", "4"}
    assert {shift_count("zero", NUMBER_WORDS, rng) for _ in range(20)} == {"one"}
    assert shift_count("red", NUMBER_WORDS, rng) is None
    assert negative_answer("a", 1.0, {"a": 1, "b": 1}, {"t": ["a", "b"]}, {"a": "t", "b": "t"},
                           NUMBER_WORDS, rng) is None


def test_vqa_match_evaluation_is_deterministic(sources, context):
    source = sources["vqa"]
    task = VQAImageTextMatchTask(source=source)
    records = [source.record("val", i) for i in range(80)]
    first = [task.build_sample(r, context, train=False) for r in records]
    random.seed(123)
    again = [task.build_sample(r, context, train=False) for r in records]
    assert [s.meta for s in first] == [s.meta for s in again]
    assert 0.35 < sum(s.meta["label"] == "yes" for s in first) / len(first) < 0.65
    for sample, record in zip(first, records):
        assert (sample.meta["answer"] in record["answers"]) == (sample.meta["label"] == "yes")


def test_answer_types_from_a_json_file(tmp_path):
    path = tmp_path / "type2ans.json"
    path.write_text(json.dumps({"how many": ["1", "2"], "other": ["cat", "dog"]}))
    task = VQAImageTextMatchTask(answer_types=str(path))
    assert task.answer_types == {"how many": ["1", "2"], "other": ["cat", "dog"]}
    assert task.answer_type["dog"] == "other"


# ---------------------------------------------------------------------- span masking
WORDS = ("there is a small yellow hexagon, left of the large purple quadrilateral and "
         "the orange zigzag is right of two green squares.").split()  # some split into pieces


def _masking_text(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def _restore(masking, ids, starts) -> list[int]:
    """Undo a masking: replace each mask by the words its span hides."""
    bounds = [i for i, s in enumerate(starts) if s or i == 0] + [len(ids)]
    words = list(zip(bounds[:-1], bounds[1:]))
    out, spans = [], iter(masking.spans)
    for token in masking.ids:
        if token != MASK:
            out.append(token)
            continue
        first, length = next(spans)
        out += ids[words[first][0]:words[first + length - 1][1]]
    return out


MASK = -7  # any id not in the text


def test_span_masking_statistics(vocab):
    ids = vocab.encode(" " + _masking_text(60))
    starts = word_starts(ids, vocab)
    assert sum(starts) == 60 and len(ids) > 60  # some words take several tokens
    generator = torch.Generator().manual_seed(0)
    spans, masked_words, per_word = [], [], Counter()
    for _ in range(400):
        masking = mask_spans(ids, starts, MASK, 0.3, 3.0, generator)
        assert masking.num_words == 60
        assert masking.ids.count(MASK) == len(masking.spans)  # one mask per span
        assert all(not (a == MASK and b == MASK) for a, b in zip(masking.ids, masking.ids[1:]))
        assert _restore(masking, ids, starts) == ids
        firsts = [f for f, _ in masking.spans]
        assert firsts == sorted(firsts)
        spans += [n for _, n in masking.spans]
        masked_words.append(sum(n for _, n in masking.spans))
        per_word.update(w for f, n in masking.spans for w in range(f, f + n))
    assert set(masked_words) == {math.ceil(0.3 * 60)}  # exactly the budget
    mean = sum(spans) / len(spans)
    # positive Poisson(3) draws have mean 3 / (1 - e^-3) = 3.157; the trimmed last span of
    # each text pulls it a little lower
    assert 2.85 < mean < 3.25, mean
    p1 = 3 * math.exp(-3) / (1 - math.exp(-3))  # P(length 1 | length > 0) = 0.157
    assert abs(spans.count(1) / len(spans) - p1) < 0.04
    rates = [per_word[w] / 400 for w in range(60)]
    assert min(rates) > 0.08  # every word gets masked, edge words too (somewhat less often:
    assert all(0.2 < r < 0.4 for r in rates[10:50])  # a span cannot reach past them)


def test_span_masking_edge_cases(vocab):
    generator = torch.Generator().manual_seed(1)
    one = vocab.encode(" circle")
    masking = mask_spans(one, word_starts(one, vocab), MASK, 0.3, 3.0, generator)
    assert masking.ids == [MASK] and masking.spans == [(0, 1)]
    assert mask_spans([], [], MASK, generator=generator).ids == []
    short = vocab.encode(" a b c d")
    for _ in range(50):  # budget 4 of 4 words: everything becomes one span
        full = mask_spans(short, word_starts(short, vocab), MASK, 1.0, 1.0, generator)
        assert full.ids == [MASK] and full.spans == [(0, 4)]
    with pytest.raises(ValueError, match="ratio"):
        mask_spans(short, word_starts(short, vocab), MASK, 0.0)


# ---------------------------------------------------------------------- text infilling
def test_text_infilling_official_ids_and_round_trip(official_vocab):
    ctx = SampleContext(official_vocab, 32)
    record = {"id": "t1", "text": "  There IS a Small red Circle left of the blue square.  "}
    task = TextInfillingTask()
    sample = task.build_sample(record, ctx, train=False)
    text = " there is a small red circle left of the blue square."
    instruction = official_vocab.encode(task.instruction)
    source = sample.source.tolist()
    assert source[:8] == [0, 99, 16, 5, 1498, 2788, 9, 22] and source[-3:] == [22, 116, 2]
    assert source[:-1] == [0, *instruction[:-2], *source[8:-3], *instruction[-2:]]  # literal rule
    masked = source[8:-3]
    assert official_vocab.mask in masked and official_vocab.mask == 50264
    assert sample.target.tolist() == [*official_vocab.encode(text), 2]
    assert sample.prev_output.tolist() == [0, *official_vocab.encode(text)]
    assert sample.weight == 2.0 and sample.image is None
    assert sample.meta == {"id": "t1", "reference": text.strip()}
    assert task.decode(sample.target, official_vocab, sample.meta) == text.strip()
    # the unmasked tokens are the text's, in order, with ceil(0.3 * 11) = 4 words hidden
    kept = iter(official_vocab.encode(text))
    assert all(any(t == k for k in kept) for t in masked if t != official_vocab.mask)
    shown = official_vocab.decode(masked).replace("<mask>", " <mask> ").split()
    assert len(text.split()) == 11 and len([w for w in shown if w != "<mask>"]) == 11 - 4


def test_text_infilling_truncates_to_512_then_keeps_the_last_256(vocab, context):
    task = TextInfillingTask()
    text = _masking_text(400)
    ids = vocab.encode(" " + text)
    assert len(ids) > 512
    sample = task.build_sample({"id": 1, "text": text}, context, train=False)
    assert sample.target.tolist() == [*ids[256:512], vocab.eos]
    small = TextInfillingTask(truncate_tokens=20, keep_tokens=5, loss_weight=1.5)
    sample = small.build_sample({"id": 1, "text": text}, context, train=False)
    assert sample.target.tolist() == [*ids[15:20], vocab.eos] and sample.weight == 1.5


def test_text_infilling_draws(sources, context):
    source = sources["text"]
    task = TextInfillingTask(source=source)
    record = source.record("val", 0)
    # evaluation: fixed by the id whatever the global state; another id masks differently
    evals = []
    for seed in range(3):
        torch.manual_seed(seed)
        evals.append(task.build_sample(record, context, train=False).source.tolist())
    assert evals[0] == evals[1] == evals[2]
    other = task.build_sample({**record, "id": "x"}, context, train=False).source.tolist()
    assert other != evals[0]
    # training: follows torch's global generator, which the datamodule seeds per sample
    torch.manual_seed(5)
    a = task.build_sample(record, context, train=True).source.tolist()
    torch.manual_seed(5)
    b = task.build_sample(record, context, train=True).source.tolist()
    torch.manual_seed(6)
    c = task.build_sample(record, context, train=True).source.tolist()
    assert a == b != c
    words = len(record["text"].split())
    for sample in train_samples(task, [source.record("val", i) for i in range(10)], context, 10):
        assert sample.source.tolist().count(context.vocab.mask) >= 1
        assert context.vocab.decode(sample.target).strip() == sample.meta["reference"]
    assert words > 10


def test_text_infilling_query_reads_mask_markers(vocab, context):
    task = TextInfillingTask()
    query = task.build_query({"text": "There is a <MASK> circle.", "image": "ignored"}, context)
    inner = [*vocab.encode(" there is a"), vocab.mask, *vocab.encode(" circle.")]
    assert query.source.tolist() == [vocab.bos, *task.source_tokens(vocab, inner), vocab.eos]
    assert query.image is None and query.target.tolist() == [vocab.eos]
    assert task.query_fields("a <mask>") == {"text": "a <mask>"}


# ---------------------------------------------------------------------- metrics
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric LabelAccuracy")
def test_label_accuracy_by_hand():
    metric = LabelAccuracy(("yes", "no"))
    metric.update(["yes", "no", "yes"], ["yes", "yes", "no"])
    metric.update(["maybe", " no "], ["no", "no"])
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result == pytest.approx({"accuracy": 2 / 5, "recall_yes": 1 / 2, "recall_no": 1 / 3})
    only_yes = LabelAccuracy(("yes", "no"))
    only_yes.update(["yes"], ["yes"])
    assert set(only_yes.compute()) == {"accuracy", "recall_yes"}
    with pytest.raises(ValueError, match="not one of the labels"):
        metric.update(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="no samples"):
        LabelAccuracy(("yes", "no")).compute()


def test_text_reconstruction_by_hand():
    assert word_edit_distance(list("kitten"), list("sitting")) == 3
    assert word_edit_distance([], ["a", "b"]) == 2
    metric = TextReconstruction()
    metric.update(["a red circle", ""], ["a red square", "two shapes"])
    metric.update(["x y z w v u", "The Cat"], ["a", "the cat"])
    result = {k: float(v) for k, v in metric.compute().items()}
    # matched words: 3-1, max(2-2, 0), max(1-6, 0), 2-0 = 4 of 3+2+1+2 = 8; one exact of four
    assert result == pytest.approx({"word_accuracy": 4 / 8, "exact_match": 1 / 4})


@pytest.mark.parametrize("make, feed", [
    (lambda: LabelAccuracy(("yes", "no")),
     [(["yes", "no"], ["yes", "yes"]), (["no", "no", "yes"], ["no", "yes", "no"])]),
    (TextReconstruction,
     [(["a b", "c"], ["a b", "c d"]), (["x"], ["y z"])]),
])
def test_metric_states_sum_across_processes(make, feed):
    """What DDP does with the states (sum) gives the single-process score."""
    whole, parts = make(), [make() for _ in feed]
    for metric, (preds, targets) in zip(parts, feed):
        metric.update(preds, targets)
        whole.update(preds, targets)
    parts[0].merge_state(parts[1])
    merged, single = parts[0].compute(), whole.compute()
    assert {k: float(v) for k, v in merged.items()} == {k: float(v) for k, v in single.items()}


# ---------------------------------------------------------------------- record errors
@pytest.mark.parametrize("task, record, field", [
    (GroundedCaptionTask(), {"image": image(), "box": [0, 0, 1, 1]}, "text"),
    (GroundedCaptionTask(), {"image": image(), "text": "it"}, "box"),
    (GroundedCaptionTask(), {"text": "it", "box": [0, 0, 1, 1]}, "image"),
    (ImageTextMatchTask(), {"image": image()}, "captions"),
    (ImageTextMatchTask(), {"captions": ["a"]}, "image"),
    (VQAImageTextMatchTask(), {"image": image(), "answers": ["yes"]}, "question"),
    (VQAImageTextMatchTask(), {"image": image(), "question": "q?"}, "answers"),
    (TextInfillingTask(), {"image": image()}, "text"),
])
def test_missing_field_names_field_and_record(context, task, record, field):
    with pytest.raises(RecordError, match=rf"'r1'.*'{field}'"):
        task.build_sample({"id": "r1", **record}, context, train=True)


@pytest.mark.parametrize("task, record, field, problem", [
    (GroundedCaptionTask(), {"text": "it", "box": [10, 5, 41, 20]}, "box", "outside the 40x30"),
    (GroundedCaptionTask(), {"text": "it", "box": [20, 5, 10, 20]}, "box", "degenerate"),
    (GroundedCaptionTask(), {"text": "it", "box": [1, 2, 3]}, "box", "must hold 4 numbers"),
    (GroundedCaptionTask(), {"text": "...", "box": [1, 2, 3, 4]}, "text", "empty once normalised"),
    (GroundedCaptionTask(), {"text": 7, "box": [1, 2, 3, 4]}, "text", "must be a string"),
    (ImageTextMatchTask(), {"captions": []}, "captions", "non-empty list"),
    (ImageTextMatchTask(), {"captions": ["a", 3]}, "captions", "non-empty list"),
    (ImageTextMatchTask(), {"captions": ["..."]}, "captions", "empty once normalised"),
    (ImageTextMatchTask(), {"captions": ["a"], "objects": "circle"}, "objects", "list of object"),
    (ImageTextMatchTask(), {"captions": ["a"], "objects": [""]}, "objects", "list of object"),
    (VQAImageTextMatchTask(), {"question": " ", "answers": ["a"]}, "question", "is empty"),
    (VQAImageTextMatchTask(), {"question": "q", "answers": {"a": -1}}, "answers", ">= 0"),
    (VQAImageTextMatchTask(), {"question": "q", "answers": {}}, "answers", "is empty"),
    (VQAImageTextMatchTask(), {"question": "q", "answers": 3}, "answers", "must be a dict"),
    (TextInfillingTask(), {"text": "   "}, "text", "is empty"),
    (TextInfillingTask(), {"text": ["a"]}, "text", "must be a string"),
])
def test_bad_values_are_record_errors(context, task, record, field, problem):
    record = {"id": "x1", "image": image(40, 30), **record}
    with pytest.raises(RecordError, match=rf"task '{task.name}': record 'x1' field '{field}'"
                       ) as error:
        for seed in range(4):  # each yes/no branch of the matching tasks
            random.seed(seed)
            task.build_sample(record, context, train=True)
    assert problem in str(error.value)


def test_bad_init_args_are_value_errors(tmp_path):
    for kwargs, name in (({"mask_ratio": 0}, "mask_ratio"), ({"mask_ratio": 1.5}, "mask_ratio"),
                         ({"poisson_lambda": 0}, "poisson_lambda"),
                         ({"loss_weight": 0}, "loss_weight"), ({"keep_tokens": 0}, "keep_tokens")):
        with pytest.raises(ValueError, match=name):
            TextInfillingTask(**kwargs)
    with pytest.raises(ValueError, match="objects"):
        ImageTextMatchTask(objects=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="objects"):
        ImageTextMatchTask(objects=[])
    with pytest.raises(ValueError, match="negative_window"):
        ImageTextMatchTask(negative_window=0)
    with pytest.raises(ValueError, match="answer_types"):
        VQAImageTextMatchTask(answer_types={})
    with pytest.raises(ValueError, match="scorers"):
        GroundedCaptionTask(scorers=("spice",))
    with pytest.raises(ValueError, match="tokenizer"):
        GroundedCaptionTask(tokenizer="bert")


# ---------------------------------------------------------------------- predictions end to end
def test_matching_tasks_predict_yes_or_no_and_score(model, vocab, context, sources):
    itm = ImageTextMatchTask(source=sources["caption"], negative_window=50)
    vqa = VQAImageTextMatchTask(source=sources["vqa"])
    for task, kind in ((itm, "caption"), (vqa, "vqa")):
        samples = [task.build_sample(sources[kind].record("val", i), context, train=False)
                   for i in range(6)]
        batch = collate(samples, vocab.pad)
        predictions = task.predict(model, batch, vocab)
        assert len(predictions) == 6 and set(predictions) <= {"yes", "no"}
        metrics = task.metrics()
        task.update_metrics(metrics, predictions, batch.meta)
        expected = sum(p == m["label"] for p, m in zip(predictions, batch.meta)) / 6
        assert float(metrics["accuracy"].compute()["accuracy"]) == pytest.approx(expected)
        assert "trie" in task.constraints(vocab)


def test_text_infilling_and_grounded_caption_predict(model, vocab, context, sources):
    infill = TextInfillingTask(generation={"max_len_a": 0.0, "max_len_b": 6})
    samples = [infill.build_sample(sources["text"].record("val", i), context, train=False)
               for i in range(3)]
    batch = collate(samples, vocab.pad)
    assert batch.patch_images is None and batch.weights.tolist() == [2.0] * 3
    predictions = infill.predict(model, batch, vocab)
    assert all(isinstance(p, str) and "<mask>" not in p and "<bin_" not in p
               for p in predictions)
    metrics = infill.metrics()
    infill.update_metrics(metrics, predictions, batch.meta)
    assert 0.0 <= float(metrics["reconstruction"].compute()["word_accuracy"]) <= 1.0

    region = GroundedCaptionTask(tokenizer="simple", generation={"max_len_b": 5})
    samples = [region.build_sample(sources["visual_grounding"].record("val", i), context, False)
               for i in range(3)]
    mixed = collate([*samples, infill.build_query({"text": "a <mask>"}, context)], vocab.pad)
    assert mixed.patch_masks.tolist() == [True, True, True, False]
    batch = collate(samples, vocab.pad)
    predictions = region.predict(model, batch, vocab)
    metrics = region.metrics()
    region.update_metrics(metrics, predictions, batch.meta)
    assert set(metrics["captioning"].compute()) == {"cider", "bleu4"}


def test_describe_names_the_plugins():
    info = ImageTextMatchTask().describe()
    assert info["class_path"] == "tasks.image_text_match.ImageTextMatchTask"
    assert info["metrics"] == ["accuracy"] and info["fields"] == ["image", "captions"]
    assert TextInfillingTask().describe()["metrics"] == ["reconstruction"]
    assert VQAImageTextMatchTask().describe()["class_path"] == \
        "tasks.image_text_match.VQAImageTextMatchTask"
    assert GroundedCaptionTask(tokenizer="simple").describe()["fields"] == ["image", "text", "box"]
    assert set(SHAPES) <= set(ImageTextMatchTask().objects)


def test_matching_tasks_with_a_decoder_prompt(model, vocab, context, sources):
    """prompt_type="prev_output": the decoder reads the instruction before " yes"/" no", only
    the answer and eos are scored, and evaluation scores the answers after the same prefix
    that training teacher-forces (so the two agree with the model's own log-probabilities)."""
    for task, kind in ((ImageTextMatchTask(source=sources["caption"], negative_window=50,
                                           prompt_type="prev_output"), "caption"),
                       (VQAImageTextMatchTask(source=sources["vqa"], prompt_type="prev_output"),
                        "vqa")):
        assert task.generation.max_len_a == 1.0
        samples = [task.build_sample(sources[kind].record("val", i), context, train=False)
                   for i in range(40)]
        for sample in samples:
            prompt = sample.source[1:-1].tolist()
            label = vocab.encode(f" {sample.meta['label']}")
            assert sample.prev_output.tolist() == [vocab.bos, *prompt, *label]
            assert sample.target.tolist() == [vocab.pad] * len(prompt) + [*label, vocab.eos]
        batch = collate(samples, vocab.pad)
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits.float().log_softmax(-1)
        scored = batch.target.ne(vocab.pad)
        teacher_forced = (logits.gather(-1, batch.target.clamp(min=0)[..., None])[..., 0]
                          * scored).sum(1)
        prompts = [s.source[1:-1] for s in samples]
        free = score_candidates(model, batch.src_tokens, yes_no_tokens(vocab), batch.patch_images,
                                batch.patch_masks, constrain=False, prefix_tokens=prompts)
        own = torch.tensor([["yes", "no"].index(s.meta["label"]) for s in samples])
        torch.testing.assert_close(free.gather(1, own[:, None])[:, 0], teacher_forced,
                                   rtol=1e-4, atol=1e-4)
        constrained = score_candidates(model, batch.src_tokens, yes_no_tokens(vocab),
                                       batch.patch_images, batch.patch_masks,
                                       trie=yes_no_trie(vocab), prefix_tokens=prompts)
        plain = score_candidates(model, batch.src_tokens, yes_no_tokens(vocab),
                                 batch.patch_images, batch.patch_masks, trie=yes_no_trie(vocab))
        predicted = task.predict(model, batch, vocab)
        assert predicted == [("yes", "no")[i] for i in constrained.argmax(1).tolist()]
        # the prefix decides: some answers differ from scoring without it
        assert constrained.argmax(1).ne(plain.argmax(1)).any()


def test_prompt_type_must_be_known():
    for task in (ImageTextMatchTask, VQAImageTextMatchTask):
        with pytest.raises(ValueError, match="prompt_type"):
            task(prompt_type="src")
