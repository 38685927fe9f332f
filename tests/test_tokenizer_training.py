"""Training a small image tokenizer: the YAML runs through the CLI and its checkpoint loads
back as a GumbelVQ; the loss falls on a fixed batch; the image datamodule's stream is
deterministic and shards across ranks."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from PIL import Image

from datamodules.images import ImageDataModule, ImageStream, record_image
from datamodules.shapes_world import ShapesWorld
from datamodules.sources import MemorySource, ShapesWorldSource
from ofa_lightning.cli import main
from ofa_lightning.task import RecordError
from ofa_lightning.tokenizer import GumbelVQ, VQGANConfig, load_image_tokenizer
from ofa_lightning.tokenizer.training import CodebookUsage, VQTokenizerModule, cosine_anneal

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tokenizer" / "shapes_vq.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """These networks and batches are tiny: a second thread only adds synchronisation, which
    on a loaded 2-core machine made 40 steps take minutes instead of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logged(run_dir: Path, key: str) -> list[float]:
    (metrics,) = run_dir.rglob("metrics.csv")
    return [float(row[key]) for row in csv.DictReader(metrics.open()) if row.get(key)]


def test_the_config_trains_through_the_cli_and_its_checkpoint_loads(tmp_path, monkeypatch):
    assert CONFIG.read_text().startswith("# ofa-lightning fit --config configs/tokenizer/")
    monkeypatch.chdir(tmp_path)  # the config writes under runs/tokenizer, relative
    main(["fit", "--config", str(CONFIG), "--trainer.max_steps=3",
          "--trainer.val_check_interval=3", "--trainer.num_sanity_val_steps=0",
          "--trainer.log_every_n_steps=1", "--data.init_args.batch_size=4",
          "--data.init_args.eval_batch_size=4", "--data.init_args.max_eval_samples=8"])
    run = tmp_path / "runs" / "tokenizer"
    assert len(logged(run, "train/loss")) == 3
    for key in ("val/psnr", "val/ssim", "val/codebook_perplexity", "val/codebook_used"):
        (value,) = logged(run, key)
        assert math.isfinite(value), key

    checkpoint = run / "checkpoints" / "last.ckpt"
    tokenizer = load_image_tokenizer(checkpoint)
    assert isinstance(tokenizer, GumbelVQ)
    assert tokenizer.config == VQGANConfig.from_name("shapes_f8")
    trained = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(value, trained[f"tokenizer.{key}"]), key

    source = ShapesWorldSource(kind="image")
    images = torch.stack([record_image(source, "val", i, 64) for i in range(2)])
    codes = tokenizer.encode_codes(images)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < tokenizer.n_embed == 512
    decoded = tokenizer.decode_codes(codes)
    assert decoded.shape == (2, 3, 64, 64) and torch.isfinite(decoded).all()


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_loss_falls_on_a_fixed_batch(tmp_path):
    """Four ShapesWorld images (at 32x32: 4x4 codes), one batch, seen 40 times: the
    reconstruction must improve a lot (an untrained decoder is far off; 40 Adam steps get
    at least the flat background right)."""
    world = ShapesWorld(seed=5)
    source = MemorySource({"train": [{"id": i, "image": world.scene(i).image} for i in range(4)]})
    data = ImageDataModule(source, image_size=32, batch_size=4)
    module = VQTokenizerModule(model="shapes_f8", optimizer=lambda p: torch.optim.Adam(p, 2e-3))
    torch.manual_seed(0)
    recorder = LossRecorder()
    trainer = Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[recorder], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    losses = recorder.losses
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_the_module_needs_max_steps_for_its_schedules(tmp_path):
    data = ImageDataModule(ShapesWorldSource(kind="image"), batch_size=2)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="needs trainer.max_steps"):
        trainer.fit(VQTokenizerModule(), datamodule=data)


def test_temperature_anneals_from_start_to_end():
    values = [cosine_anneal(step, 100, 1.0, 0.1) for step in range(0, 121, 10)]
    assert values[0] == 1.0
    assert values[10] == pytest.approx(0.1) and values[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values[:11], values[1:11]))
    assert cosine_anneal(50, 100, 1.0, 0.1) == pytest.approx(0.55)


def test_codebook_usage_counts_codes():
    usage = CodebookUsage(num_codes=8)
    usage.update(torch.tensor([[0, 1], [2, 3]]))
    usage.update(torch.tensor([0, 1, 2, 3]))
    result = usage.compute()
    assert result["perplexity"] == pytest.approx(4.0)  # four codes, equally often
    assert result["used_fraction"] == pytest.approx(0.5)
    usage.reset()
    usage.update(torch.zeros(10, dtype=torch.long))
    assert usage.compute()["perplexity"] == pytest.approx(1.0)


# ========================================================================= the datamodule
def images_source(sizes: list[tuple[int, int]]) -> MemorySource:
    records = [{"id": f"img{i}", "image": Image.new("RGB", size, (i * 20, 0, 255 - i * 20))}
               for i, size in enumerate(sizes)]
    return MemorySource({"train": records, "val": records[:3]}, name="images")


def test_stream_is_deterministic_and_ranks_split_the_global_batch():
    source = images_source([(16, 16)] * 10)
    single = ImageStream(source, size=8, batch_size=4)
    ranks = [ImageStream(source, size=8, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    for batch in range(4):  # 4 batches of 4 cross the pass boundary of 10 records
        together = torch.cat([ranks[0].batch(batch), ranks[1].batch(batch)])
        assert torch.equal(single.batch(batch), together)
    # each pass visits every record once, in a new order
    first_pass = [single.record_index(g) for g in range(10)]
    second_pass = [single.record_index(g) for g in range(10, 20)]
    assert sorted(first_pass) == sorted(second_pass) == list(range(10))
    assert first_pass != second_pass


def test_images_are_cropped_square_and_scaled_to_minus_one_one():
    """A 40x20 image with green 10-pixel bands left and right of a blue 20x20 centre: the
    centre square is kept, nothing is squashed in."""
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    image.paste((0, 0, 255), (10, 0, 30, 20))
    source = MemorySource({"train": [{"id": "wide", "image": image}]})
    tensor = record_image(source, "train", 0, 8)
    assert tensor.shape == (3, 8, 8)
    assert torch.equal(tensor, torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 8, 8))


def test_records_without_an_image_are_named():
    source = MemorySource({"train": [{"id": "x1", "text": "no picture"}]}, name="texts")
    with pytest.raises(RecordError, match=r"texts\) train record 0: record 'x1' has no 'image'"):
        record_image(source, "train", 0, 8)


def test_evaluation_reads_the_first_images_of_val():
    data = ImageDataModule(images_source([(16, 16)] * 5), image_size=8, batch_size=2,
                           eval_batch_size=2, max_eval_samples=3)
    batches = list(data.val_dataloader())
    assert [len(b) for b in batches] == [2, 1]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ImageDataModule(images_source([(16, 16)]), batch_size=0)
