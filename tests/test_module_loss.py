"""OFAModule's training loss: token normalisation (fairseq's) and per-sample normalisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from datamodules.multitask import MultiTaskDataModule
from datamodules.sources import ShapesWorldSource
from ofa_lightning.data import Sample, collate
from ofa_lightning.module import OFAModule
from tasks.caption import CaptionTask
from tasks.vqa import VQATask

TINY = {"encoder_layers": 1, "decoder_layers": 1, "embed_dim": 32, "ffn_dim": 64}


def caption_vqa_datamodule() -> MultiTaskDataModule:
    tasks = [CaptionTask(ShapesWorldSource("caption")), VQATask(ShapesWorldSource("vqa"))]
    dm = MultiTaskDataModule(tasks, image_size=32, vocab_size=300, tokenizer_texts=50,
                             batch_size=12)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def mixed_samples() -> tuple[MultiTaskDataModule, list[Sample]]:
    """Caption and VQA samples (targets of very different lengths), every third one with
    loss weight 0.5 (as a VQA answer of confidence 0.5 would have)."""
    dm = caption_vqa_datamodule()
    stream = dm.train_dataloader().dataset
    samples = [stream.sample(g) for g in range(12)]
    return dm, [dataclasses.replace(s, weight=0.5) if i % 3 == 0 else s
                for i, s in enumerate(samples)]


def tiny_module(dm: MultiTaskDataModule, **kwargs) -> OFAModule:
    torch.manual_seed(0)
    module = OFAModule("nano", model_overrides=TINY, vocab=dm.vocab, tasks=dm.tasks, **kwargs)
    module.configure_model()
    return module.eval()


def test_samples_normalisation_is_the_mean_of_each_samples_token_mean(mixed_samples) -> None:
    dm, samples = mixed_samples
    batch = collate(samples, dm.vocab.pad)
    lengths = batch.target.ne(dm.vocab.pad).sum(1)
    assert lengths.min() < lengths.max() and batch.weights.min() < 1  # the case that matters
    module = tiny_module(dm)
    with torch.no_grad():
        loss_sum, _, count = module._loss(batch, per_sample=True)
        per_sample = []
        for sample in samples:
            # weighted, summed over its own tokens
            one_sum, _, tokens = module._loss(collate([sample], dm.vocab.pad))
            per_sample.append(one_sum / tokens)
    assert count == len(batch)
    torch.testing.assert_close(loss_sum / count, torch.stack(per_sample).mean(), rtol=1e-4,
                               atol=1e-5)


def test_tokens_normalisation_weighs_samples_by_their_target_length(mixed_samples) -> None:
    dm, samples = mixed_samples
    batch = collate(samples, dm.vocab.pad)
    module = tiny_module(dm)
    with torch.no_grad():
        loss_sum, _, count = module._loss(batch)
        sums, _, tokens = zip(*(module._loss(collate([s], dm.vocab.pad)) for s in samples))
    assert count == sum(tokens) == int(batch.target.ne(dm.vocab.pad).sum())
    torch.testing.assert_close(loss_sum / count, torch.stack(sums).sum() / count, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["tokens", "samples"])
def test_a_fit_step_logs_the_loss_divided_by_the_chosen_count(mode: str, tmp_path) -> None:
    """A real one-step fit: the logged training loss is the summed loss over the tokens,
    or over the samples, of the first training batch."""
    import lightning.pytorch as pl

    dm = caption_vqa_datamodule()
    first = next(iter(dm.train_dataloader()))
    module = tiny_module(dm, loss_normalization=mode).train()
    with torch.no_grad():
        loss_sum, _, count = module._loss(first, per_sample=mode == "samples")
    assert count == (len(first) if mode == "samples" else int(first.target.ne(dm.vocab.pad).sum()))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    torch.testing.assert_close(trainer.callback_metrics["train/loss"], loss_sum / count)


def test_unknown_loss_normalisation_is_refused(mixed_samples) -> None:
    dm, _ = mixed_samples
    with pytest.raises(ValueError, match="loss_normalization must be 'tokens' or 'samples', "
                                         "got 'sentences'"):
        OFAModule("nano", model_overrides=TINY, vocab=dm.vocab, loss_normalization="sentences")


def test_task_loss_weights_scale_that_tasks_samples_only(mixed_samples) -> None:
    """{"vqa": 3.0} is the same loss as tripling each VQA sample's own weight (0.5 stays a
    factor too); caption samples and the token count are untouched, and the unweighted
    (validation) loss does not move."""
    dm, samples = mixed_samples
    assert {s.task for s in samples} == {"caption", "vqa"}
    tripled = [dataclasses.replace(s, weight=s.weight * 3) if s.task == "vqa" else s
               for s in samples]
    batch, by_hand = collate(samples, dm.vocab.pad), collate(tripled, dm.vocab.pad)
    plain, scaled = tiny_module(dm), tiny_module(dm, task_loss_weights={"vqa": 3.0})
    with torch.no_grad():
        expected_sum, _, expected_count = plain._loss(by_hand)
        got_sum, _, got_count = scaled._loss(batch)
        unscaled_sum, _, _ = plain._loss(batch)
        assert not torch.allclose(got_sum, unscaled_sum)
        torch.testing.assert_close(scaled._loss(batch, weighted=False)[0],
                                   plain._loss(batch, weighted=False)[0])
    assert got_count == expected_count
    torch.testing.assert_close(got_sum, expected_sum)


@pytest.mark.parametrize("factors, message", [
    ({"captioning": 2.0}, "names 'captioning', which is not a task of this run; its tasks: "
                          "caption, vqa"),
    ({"vqa": -1.0}, r"task_loss_weights\['vqa'\] must be a finite number >= 0, got -1.0"),
    ({"vqa": float("nan")}, r"task_loss_weights\['vqa'\] must be a finite number >= 0"),
])
def test_bad_task_loss_weights_are_refused(mixed_samples, factors, message) -> None:
    dm, _ = mixed_samples
    with pytest.raises(ValueError, match=message):
        OFAModule("nano", model_overrides=TINY, vocab=dm.vocab, tasks=dm.tasks,
                  task_loss_weights=factors)
