"""Image infilling (pretraining): the official prompt and geometry, the code target's round
trip through a real (tiny, random) GumbelVQ, record and configuration errors, decoding of a
small random model, and the image-generation metrics (code accuracy, FID)."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
from PIL import Image
from torch import nn

from datamodules.shapes_world import ShapesWorld
from datamodules.sources import ShapesWorldSource
from ofa_lightning import OFAConfig, OFAModel
from ofa_lightning.data import collate
from ofa_lightning.metrics.image_generation import CodeAccuracy, ImageFID, RandomConvFeatures
from ofa_lightning.task import RecordError, SampleContext, image_to_tensor
from ofa_lightning.tokenizer import GumbelVQ, VQGANConfig, load_image_tokenizer
from ofa_lightning.tokenizer.loading import STATE_DICT_PREFIX, TOKENIZER_CHECKPOINT_KEY
from ofa_lightning.vocab import UnifiedVocab
from tasks.image_infilling import ImageInfillingTask

IMAGE_SIZE = 64  # ShapesWorld's side; the middle region is rows/cols [16, 48): 32 px
NUM_CODES = 64
# f = 8 like the released VQGAN (4 levels), but a few thousand parameters
TINY_VQGAN = dict(ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                  resolution=64, z_channels=8, embed_dim=8, n_embed=NUM_CODES, norm_groups=4)


# ---------------------------------------------------------------------- fixtures
def save_tokenizer(directory) -> str:
    """A random tiny GumbelVQ saved in the layout ``ofa-lightning fit`` gives tokenizer
    checkpoints (config + prefixed weights), to be read back by load_image_tokenizer."""
    torch.manual_seed(0)
    net = GumbelVQ(VQGANConfig(**TINY_VQGAN))
    path = directory / "tokenizer.ckpt"
    torch.save({TOKENIZER_CHECKPOINT_KEY: {"config": net.config.to_dict(),
                                           "prefix": STATE_DICT_PREFIX},
                "state_dict": {STATE_DICT_PREFIX + k: v for k, v in net.state_dict().items()}},
               path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return save_tokenizer(tmp_path_factory.mktemp("vqgan"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> GumbelVQ:
    return load_image_tokenizer(tokenizer_path).eval()


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=5)


@pytest.fixture(scope="module")
def vocab(world) -> UnifiedVocab:
    return UnifiedVocab.train(world.all_text(10), vocab_size=300, num_codes=NUM_CODES,
                              num_bins=10)


@pytest.fixture(scope="module")
def context(vocab) -> SampleContext:
    return SampleContext(vocab, IMAGE_SIZE)


@pytest.fixture(scope="module")
def task(tokenizer_path) -> ImageInfillingTask:
    return ImageInfillingTask(tokenizer=tokenizer_path)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    source = ShapesWorldSource(kind="image", seed=3, val_size=4)
    return [source.record("val", i) for i in range(4)]


# ---------------------------------------------------------------------- samples
def test_official_prompt_weight_and_code_flag(task, context, records, vocab):
    sample = task.build_sample(records[0], context, train=True)
    assert ImageInfillingTask.instruction == " what is the image in the middle part?"
    assert sample.source.tolist() == [vocab.bos, *vocab.encode(task.instruction), vocab.eos]
    assert sample.code_target is True and sample.weight == 2.0 and sample.task == "image_infilling"
    assert ImageInfillingTask(tokenizer=task.tokenizer, loss_weight=1.5).build_sample(
        records[0], context, train=True).weight == 1.5
    batch = collate([sample, sample], vocab.pad)
    assert batch.code_masks.tolist() == [True, True] and batch.weights.tolist() == [2.0, 2.0]


def test_official_geometry_is_the_central_half_and_256_codes():
    task = ImageInfillingTask()  # no tokenizer: the released VQGAN's f = 8
    assert task.region_bounds(256) == (64, 192)
    assert task.code_grid(256) == 16  # 16 x 16 = 256 codes of the central 128 x 128
    assert ImageInfillingTask(code_image_size=256).code_grid(256) == 32


def test_source_image_has_the_middle_zeroed_and_the_rest_intact(task, context, records):
    sample = task.build_sample(records[1], context, train=False)
    full, _ = image_to_tensor(records[1]["image"], IMAGE_SIZE)
    inside = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    inside[16:48, 16:48] = True
    assert sample.image[:, inside].eq(0).all()
    assert torch.equal(sample.image[:, ~inside], full[:, ~inside])
    assert full[:, inside].ne(0).any()  # the zeros are the mask's, not the picture's
    assert torch.equal(sample.meta["region"], full[:, 16:48, 16:48])


def test_target_decodes_to_the_tokenizers_code_grid(task, context, records, tokenizer, vocab):
    sample = task.build_sample(records[2], context, train=False)
    full, _ = image_to_tensor(records[2]["image"], IMAGE_SIZE)
    expected = tokenizer.encode_codes(full[None, :, 16:48, 16:48])[0]  # (4, 4)
    assert sample.target.numel() == 16 + 1 and sample.target[-1] == vocab.eos
    assert vocab.is_code(sample.target[:-1]).all()
    assert sample.prev_output.tolist() == [vocab.bos, *sample.target[:-1].tolist()]
    decoded = task.decode(sample.target, vocab, sample.meta)
    assert decoded.dtype == torch.long and torch.equal(decoded, expected)
    assert torch.equal(sample.meta["codes"], expected)
    assert "region" not in task.build_sample(records[2], context, train=True).meta


def test_code_image_size_resizes_the_region_before_encoding(tokenizer_path, context, records):
    task = ImageInfillingTask(tokenizer=tokenizer_path, code_image_size=64)
    sample = task.build_sample(records[0], context, train=False)
    assert sample.meta["grid"] == (8, 8) and sample.target.numel() == 65
    assert sample.meta["region"].shape == (3, 64, 64)


@pytest.mark.parametrize("form", ["list", "string", "tensor"])
def test_precomputed_codes_need_no_tokenizer(context, records, vocab, form):
    codes = [(7 * i) % NUM_CODES for i in range(16)]
    value = {"list": codes, "string": " ".join(map(str, codes)),
             "tensor": torch.tensor(codes).view(4, 4)}[form]
    task = ImageInfillingTask()
    sample = task.build_sample({**records[0], "codes": value}, context, train=False)
    assert sample.target[:-1].tolist() == [vocab.code_id(c) for c in codes]
    assert task.decode(sample.target, vocab, sample.meta).view(-1).tolist() == codes
    assert list(task.metrics()) == ["code_accuracy"]  # FID draws images: needs a tokenizer


def test_shapes_world_image_records_build_with_a_pil_file_too(task, context, tmp_path, world):
    path = tmp_path / "scene.png"
    world.scene(0, "val").image.save(path)
    sample = task.build_sample({"id": "file", "image": str(path)}, context, train=True)
    assert sample.image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)


# ---------------------------------------------------------------------- errors
def test_image_too_small_for_the_tokenizer(task, vocab):
    small = SampleContext(vocab, 8)  # a 4 x 4 px region; the tokenizer needs multiples of 8
    with pytest.raises(ValueError, match=r"4x4 px \(image_size=8.*f=8.*next that works: 16"):
        task.build_sample({"id": 1, "image": Image.new("RGB", (8, 8))}, small, train=True)
    with pytest.raises(ValueError, match=r"code_image_size=12.*multiple of 8"):
        ImageInfillingTask(code_image_size=12).code_grid(IMAGE_SIZE)


def test_codebook_size_must_match_the_vocabulary(tokenizer_path, world, records):
    other = UnifiedVocab.train(world.all_text(10), vocab_size=300, num_codes=32, num_bins=10)
    task = ImageInfillingTask(tokenizer=tokenizer_path)
    with pytest.raises(ValueError, match=r"codebook of 64 codes.* 32 code tokens.*set the "
                                         r"datamodule's num_codes to 64"):
        task.build_sample(records[0], SampleContext(other, IMAGE_SIZE), train=True)
    no_codes = UnifiedVocab.train(world.all_text(10), vocab_size=300, num_codes=0, num_bins=10)
    with pytest.raises(ValueError, match="num_codes=0"):
        ImageInfillingTask().build_sample(records[0], SampleContext(no_codes, IMAGE_SIZE), True)


@pytest.mark.parametrize("codes, problem", [
    (list(range(15)), "holds 15 codes, expected 16"),
    ([0] * 15 + [NUM_CODES], f"holds code {NUM_CODES}, outside \\[0, {NUM_CODES}\\)"),
    ([0] * 15 + [-1], "holds code -1, outside"),
    ("1 2 x", "must be integer codes"),
    ([0.5] * 16, "must be integer codes"),
    (torch.zeros(16), "must be integer codes"),
    (12, "must be integer codes"),
])
def test_bad_precomputed_codes_are_record_errors(context, records, codes, problem):
    record = {**records[0], "id": "r7", "codes": codes}
    with pytest.raises(RecordError, match=rf"'r7' field 'codes' {problem}"):
        ImageInfillingTask().build_sample(record, context, train=True)


def test_missing_codes_without_tokenizer_and_missing_image(context, records):
    with pytest.raises(RecordError, match="'codes' is missing and the task has no image tokenizer"):
        ImageInfillingTask().build_sample(records[0], context, train=True)
    with pytest.raises(RecordError, match=r"lacks field\(s\) \['image'\]"):
        ImageInfillingTask().build_sample({"id": 3}, context, train=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_weight=0.0), "loss_weight"),
    (dict(region=0.0), "region"),
    (dict(region=1.5), "region"),
    (dict(code_image_size=0), "code_image_size"),
    (dict(generation={"min_len": 3}), r"\['min_len'\] are fixed by the task"),
])
def test_bad_init_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageInfillingTask(**kwargs)


def test_decode_refuses_output_that_is_not_one_code_grid(task, vocab):
    meta = {"grid": (2, 2)}
    assert task.decode(torch.tensor([*vocab.code_id(torch.arange(4)).tolist(), vocab.eos]),
                       vocab, meta).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="expected 4 code tokens"):
        task.decode(torch.tensor([vocab.code_id(0), vocab.eos]), vocab, meta)
    with pytest.raises(ValueError, match="1 of them not codes"):
        task.decode(torch.tensor([vocab.code_id(0)] * 3 + [vocab.bin_id(0)]), vocab, meta)


# ---------------------------------------------------------------------- tokenizer handling
def test_tokenizer_is_loaded_once_frozen_and_the_task_pickles(task):
    first, again = task.image_tokenizer(), task.image_tokenizer()
    assert first is again and not first.training
    assert not any(p.requires_grad for p in first.parameters())
    clone = pickle.loads(pickle.dumps(task))
    assert clone.image_tokenizer() is first  # one per process, found again by path


# ---------------------------------------------------------------------- prediction
def test_predictions_are_code_grids_and_feed_the_metrics(task, vocab, context, records):
    torch.manual_seed(0)
    model = OFAModel(OFAConfig.from_name("nano", vocab_size=len(vocab), code_image_size=32)).eval()
    samples = [task.build_sample(r, context, train=False) for r in records]
    batch = collate(samples, vocab.pad)
    predictions = task.predict(model, batch, vocab)
    assert len(predictions) == 4
    for grid in predictions:
        assert grid.shape == (4, 4) and grid.dtype == torch.long
        assert grid.min() >= 0 and grid.max() < NUM_CODES
    config = task.generation_config(vocab, 16)
    assert (config.min_len, config.max_len_b, config.gen_code) == (16, 16, True)
    assert config.constraint_range == vocab.code_range and config.beam == 1
    metrics = nn.ModuleDict(task.metrics())  # as OFAModule holds them
    assert sorted(metrics) == ["code_accuracy", "fid"]
    task.update_metrics(metrics, predictions, batch.meta)
    hand = sum(int(p.eq(s.meta["codes"]).sum()) for p, s in zip(predictions, samples)) / 64
    assert metrics["code_accuracy"].compute().item() == pytest.approx(hand)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 images < 32 features: the rank warning
        fid = metrics["fid"].compute()
    assert torch.isfinite(fid) and fid.item() > 0
    # the targets themselves score 1.0
    perfect = task.metrics()["code_accuracy"]
    task.update_metrics({"code_accuracy": perfect}, [s.meta["codes"] for s in samples],
                        batch.meta)
    assert perfect.compute().item() == 1.0


def test_fit_and_validate_on_shapes_world(tokenizer_path, tmp_path):
    """Two training steps and a validation pass through OFAModule: code-mode loss, both
    metrics logged, nothing of the metrics among the parameters or the checkpoint."""
    import lightning.pytorch as pl

    from datamodules.multitask import TaskDataModule
    from ofa_lightning.module import OFAModule

    task = ImageInfillingTask(source=ShapesWorldSource(kind="image", val_size=6),
                              tokenizer=tokenizer_path)
    dm = TaskDataModule(task, batch_size=4, eval_batch_size=3, image_size=IMAGE_SIZE,
                        vocab_size=300, tokenizer_texts=4, num_codes=NUM_CODES, num_bins=10)
    module = OFAModule("nano", model_overrides={"code_image_size": 32}, vocab=dm.vocab,
                       tasks=dm.tasks)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few workers, 6 images < 32 FID features, ...
        trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"])
    assert 0.0 <= logged["val/image_infilling/code_accuracy"].item() <= 1.0
    assert torch.isfinite(logged["val/image_infilling/fid"])
    assert not any(k.startswith(("val_metrics", "test_metrics")) for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(
        p.numel() for p in module.model.parameters())


# ---------------------------------------------------------------------- metrics
def test_code_accuracy_by_hand():
    metric = CodeAccuracy()
    metric.update(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [3, 0]]))
    assert metric.compute().item() == 0.5
    metric.update(torch.tensor([[[5]]]), torch.tensor([[[5]]]))
    assert metric.compute().item() == pytest.approx(3 / 5)
    metric.reset()
    with pytest.raises(ValueError, match="no codes"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute before update
        metric.compute()
    with pytest.raises(ValueError, match=r"shape \(2,\) but target \(3,\)"):
        metric.update(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer codes"):
        metric.update(torch.tensor([1.0]), torch.tensor([1]))


def _images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 1.2 - 0.6  # a colour per image
    return (base + 0.3 * torch.rand(n, 3, 24, 24, generator=g) + shift).clamp(-1, 1)


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift():
    real = _images(80, 0)
    metric = ImageFID()
    metric.update(real, real=True)
    metric.update(real.clone(), real=False)
    assert abs(metric.compute().item()) < 1e-3
    scores = []
    for shift in (0.1, 0.4):
        shifted = ImageFID()
        shifted.update(real, real=True)
        shifted.update(_images(80, 1, shift), real=False)
        scores.append(shifted.compute().item())
    other_draw = ImageFID()
    other_draw.update(real, real=True)
    other_draw.update(_images(80, 1), real=False)  # same distribution, other samples
    assert other_draw.compute().item() < scores[0] < scores[1]
    assert scores[1] > 10 * max(other_draw.compute().item(), 1e-6)


def test_fid_default_extractor_is_fixed_and_not_trainable():
    a, b = RandomConvFeatures(seed=0), RandomConvFeatures(seed=0)
    images = (torch.rand(2, 3, 40, 40) * 255).to(torch.uint8)
    assert a(images).shape == (2, 32) and torch.equal(a(images), b(images))
    metric = ImageFID()
    assert list(metric.parameters()) == [] and metric.state_dict() == {}
    module = nn.ModuleDict({"fid": metric})  # as OFAModule holds it: nothing to optimise
    assert list(module.parameters()) == [] and not module.state_dict()


def test_fid_accepts_an_injected_extractor():
    class MeanColour(nn.Module):
        num_features = 3

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.dtype] = []

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            self.seen.append(images.dtype)
            return images.float().mean(dim=(2, 3))  # (N, 3)

    extractor = MeanColour()
    metric = ImageFID(extractor)
    assert metric.num_features == 3
    real, fake = _images(20, 0), _images(20, 1, 0.5)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert extractor.seen == [torch.uint8, torch.uint8]  # the images Inception would get
    mean_gap = (real.clamp(-1, 1) - fake).mean(dim=(0, 2, 3)) * 127.5
    assert metric.compute().item() >= float(mean_gap.square().sum()) * 0.9
    task = ImageInfillingTask(tokenizer="unused.pt", fid_feature=MeanColour())
    assert task.metrics()["fid"].num_features == 3


def test_fid_with_too_few_images_is_nan_with_a_warning():
    metric = ImageFID()
    metric.update(_images(1, 0), real=True)
    metric.update(_images(1, 1), real=False)
    with pytest.warns(UserWarning, match="at least 2 images"):
        assert torch.isnan(metric.compute())


# ---------------------------------------------------------------------- DDP
def _metric_values(rank: int | None, world: int = 2) -> dict[str, float]:
    """Both metrics over uneven shards (rank 1 sees one batch, rank 0 the rest); all data
    when ``rank`` is None."""
    g = torch.Generator().manual_seed(3)
    preds, target = torch.randint(0, 5, (2, 9, 4, 4), generator=g)
    real, fake = _images(9, 0), _images(9, 1, 0.2)
    accuracy, fid = CodeAccuracy(), ImageFID()
    for i, part in enumerate((slice(0, 4), slice(4, 6), slice(6, 9))):
        if rank is None or (i == 1) == (rank == 1):
            accuracy.update(preds[part], target[part])
            fid.update(real[part], real=True)
            fid.update(fake[part], real=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 9 images < 32 features
        return {"accuracy": accuracy.compute().item(), "fid": fid.compute().item()}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save(_metric_values(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metrics_under_two_process_ddp_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = _metric_values(None)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-12)
        assert got["fid"] == pytest.approx(expected["fid"], rel=1e-6)
