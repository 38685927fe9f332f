"""Run callbacks in real Lightning fits on the CPU: the weight EMA."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from datamodules.multitask import TaskDataModule
from datamodules.sources import ShapesWorldSource
from ofa_lightning.callbacks import EMAWeights
from ofa_lightning.module import OFAModule
from tasks.vqa import VQATask

TINY = {"encoder_layers": 1, "decoder_layers": 1, "embed_dim": 32, "ffn_dim": 64}
WATCHED = "model.decoder.layers.0.fc1.weight"


class WeightRecorder(Callback):
    """A copy of one parameter after every optimizer step (runs before the EMA update)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(pl_module.get_parameter(WATCHED).detach().clone())


def fit_with_ema(root: Path, steps: int, ema: EMAWeights, recorder: Callback | None = None,
                 ckpt_path: Path | None = None) -> OFAModule:
    pl.seed_everything(0)  # the same initial weights in every run
    dm = TaskDataModule(VQATask(ShapesWorldSource("vqa", val_size=4), decode_mode="trie"),
                        batch_size=4, eval_batch_size=4, image_size=32, vocab_size=300,
                        tokenizer_texts=30, num_bins=16)
    # a constant learning rate: the schedule must not depend on where a resumed leg ends
    module = OFAModule("nano", model_overrides=TINY, vocab=dm.vocab, tasks=dm.tasks,
                       warmup_ratio=0.0, end_lr_factor=1.0)
    callbacks = [c for c in (recorder, ema) if c is not None]
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                         limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[*callbacks, ModelCheckpoint(dirpath=root / "ckpt",
                                                                save_last=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few workers; configure_model is not sharded here
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def expected_ema(seen: list[torch.Tensor], decay: float, start_step: int) -> torch.Tensor:
    average = seen[start_step].clone()  # the first update copies the weights
    for weights in seen[start_step + 1:]:
        average.lerp_(weights, 1.0 - decay)
    return average


def test_ema_is_what_checkpoints_hold_and_the_trained_weights_travel_beside(tmp_path):
    recorder = WeightRecorder()
    module = fit_with_ema(tmp_path, 4, EMAWeights(decay=0.6, start_step=1), recorder)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)

    average = expected_ema(recorder.seen, 0.6, start_step=1)
    assert not torch.allclose(average, recorder.seen[-1])  # the test can tell them apart
    torch.testing.assert_close(checkpoint["state_dict"][WATCHED], average)
    torch.testing.assert_close(checkpoint["current_model_state"][WATCHED], recorder.seen[-1])
    # after fit the module holds the average too (what `predict` right after fit uses)
    torch.testing.assert_close(module.get_parameter(WATCHED), average)
    # integer buffers are copied, never blended
    for name, value in checkpoint["state_dict"].items():
        if not torch.is_floating_point(value):
            assert torch.equal(value, checkpoint["current_model_state"][name]), name


def test_resumed_run_continues_the_average(tmp_path):
    whole = WeightRecorder()
    fit_with_ema(tmp_path / "whole", 4, EMAWeights(decay=0.6), whole)
    fit_with_ema(tmp_path / "split", 2, EMAWeights(decay=0.6))
    fit_with_ema(tmp_path / "split", 4, EMAWeights(decay=0.6),
                 ckpt_path=tmp_path / "split" / "ckpt" / "last.ckpt")
    resumed = torch.load(tmp_path / "split" / "ckpt" / "last.ckpt", weights_only=False)
    torch.testing.assert_close(resumed["state_dict"][WATCHED],
                               expected_ema(whole.seen, 0.6, start_step=0))


@pytest.mark.parametrize("kwargs, message", [({"decay": 1.0}, "decay must be in"),
                                             ({"start_step": -1}, "start_step must be")])
def test_bad_ema_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMAWeights(**kwargs)
