"""Weights trained under one model config and loaded under another are named, not hidden."""

from __future__ import annotations

import warnings

import pytest
import torch

from datamodules.multitask import MultiTaskDataModule
from datamodules.sources import ShapesWorldSource
from ofa_lightning.config import OFAConfig
from ofa_lightning.module import OFAModule
from tasks.caption import CaptionTask

TINY = {"encoder_layers": 1, "decoder_layers": 1, "embed_dim": 32, "ffn_dim": 64}


@pytest.fixture(scope="module")
def datamodule() -> MultiTaskDataModule:
    dm = MultiTaskDataModule([CaptionTask(ShapesWorldSource("caption"))], image_size=32,
                             vocab_size=300, tokenizer_texts=50, batch_size=4)
    dm.setup("fit")
    return dm


def module(dm: MultiTaskDataModule, **kwargs) -> OFAModule:
    overrides = {**TINY, **kwargs.pop("model_overrides", {})}
    built = OFAModule("nano", model_overrides=overrides, vocab=dm.vocab, tasks=dm.tasks, **kwargs)
    built.configure_model()
    return built


def saved_checkpoint(trained: OFAModule) -> dict:
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    return checkpoint


def test_function_differences_name_what_changes_the_computation_only():
    nano = OFAConfig.from_name("nano")
    assert nano.function_differences(nano.replace(dropout=0.1, init_std=0.02)) == []
    assert nano.function_differences(nano.replace(entangle_source_text=True, embed_dim=64)) == [
        "embed_dim: 128 -> 64", "entangle_source_text: False -> True"]


def test_resuming_under_a_changed_preset_warns_with_the_field(datamodule):
    """A checkpoint from before nano stopped entangling the source text resumes into today's
    nano with a warning that names the field and both values."""
    old = module(datamodule, model_overrides={"entangle_source_text": True})
    checkpoint = saved_checkpoint(old)
    with pytest.warns(UserWarning, match=r"the resumed checkpoint .*entangle_source_text: "
                                         r"True -> False"):
        module(datamodule).on_load_checkpoint(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(datamodule, model_overrides={"entangle_source_text": True, "dropout": 0.1}
               ).on_load_checkpoint(checkpoint)  # dropout does not change what weights compute


def test_init_from_a_checkpoint_of_another_config_warns_and_still_loads(datamodule, tmp_path):
    old = module(datamodule, model_overrides={"entangle_source_text": True})
    path = tmp_path / "old.ckpt"
    torch.save(saved_checkpoint(old), path)
    with pytest.warns(UserWarning, match=rf"init_from={path} .*entangle_source_text"):
        new = module(datamodule, init_from=str(path))
    for name, value in old.model.state_dict().items():
        assert torch.equal(new.model.state_dict()[name], value), name
