"""VQTokenizerModule: train a (small) GumbelVQ image tokenizer from scratch.

The released tokenizer was trained with perceptual and adversarial losses on OpenImages;
neither can be had offline, so this trains on reconstruction alone:

    loss = l1_weight * |x - x'| + mse_weight * (x - x')^2 + kl_weight * KL(q || uniform)

where x' decodes straight-through Gumbel-softmax codes (one-hot forward, soft gradient, as
the release did) at a temperature annealed from ``temperature_start`` to
``temperature_end`` over ``temperature_steps`` (cosine), and the KL term keeps the code
distribution spread over the codebook. Validation tokenizes and decodes exactly as tasks do
(``encode_codes`` -> ``decode_codes``) and logs ``val/psnr``, ``val/ssim`` and codebook usage.

The network is the same ``GumbelVQ`` as the released one, only narrower; checkpoints carry its
config, so ``load_image_tokenizer(".../last.ckpt")`` rebuilds it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ofa_lightning.schedules import optimizers_with_schedule
from ofa_lightning.tokenizer.loading import STATE_DICT_PREFIX, TOKENIZER_CHECKPOINT_KEY
from ofa_lightning.tokenizer.vqgan import GumbelVQ, VQGANConfig

__all__ = ["VQTokenizerModule", "CodebookUsage", "cosine_anneal"]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)


def cosine_anneal(step: int, total: int, start: float, end: float) -> float:
    """``start`` at step 0, ``end`` from step ``total`` on, a half cosine in between."""
    progress = min(1.0, step / total) if total > 0 else 1.0
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CodebookUsage(Metric):
    """How much of the codebook the codes use: the perplexity of the code histogram (the
    number of equally used codes with the same entropy) and the fraction of codes seen.
    A tokenizer whose perplexity collapses has learnt only a few "words" for all images."""

    full_state_update = False

    def __init__(self, num_codes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_codes = num_codes
        self.add_state("counts", default=torch.zeros(num_codes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        self.counts += torch.bincount(codes.flatten(), minlength=self.num_codes)

    def compute(self) -> dict[str, Tensor]:
        p = self.counts.double() / self.counts.sum().clamp_min(1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        return {"perplexity": entropy.exp().float(),
                "used_fraction": (self.counts > 0).float().mean()}


class VQTokenizerModule(LightningModule):
    def __init__(
        self,
        model: str = "shapes_f8",
        model_overrides: dict[str, Any] | None = None,
        l1_weight: float = 1.0,
        mse_weight: float = 1.0,
        kl_weight: float = 1e-3,
        temperature_start: float = 1.0,
        temperature_end: float = 0.1,
        temperature_steps: int | None = None,
        straight_through: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.02,
        end_lr_factor: float = 0.1,
    ) -> None:
        """
        Args:
            model: a ``VQGANConfig`` preset, refined by ``model_overrides``.
            l1_weight, mse_weight: weights of the two reconstruction terms (pixels in [-1, 1]).
            kl_weight: weight of KL(code distribution || uniform) per position.
            temperature_start, temperature_end: Gumbel-softmax temperature at the first
                step and from ``temperature_steps`` on (default: the trainer's max_steps).
            straight_through: one-hot codes in the forward pass (as at inference) with soft
                gradients; False trains on the soft mixture of code vectors.
            lr_scheduler: replaces the default warm-up + linear decay over ``max_steps``.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.config = VQGANConfig.from_name(model, **(model_overrides or {}))
        for name, value in (("temperature_start", temperature_start),
                            ("temperature_end", temperature_end)):
            if not value > 0:
                raise ValueError(f"VQTokenizerModule: {name} must be > 0, got {value}")
        if temperature_steps is not None and temperature_steps < 1:
            raise ValueError(f"VQTokenizerModule: temperature_steps must be >= 1 or null (the "
                             f"trainer's max_steps), got {temperature_steps}")
        self.l1_weight, self.mse_weight, self.kl_weight = l1_weight, mse_weight, kl_weight
        self.temperature_start, self.temperature_end = temperature_start, temperature_end
        self.temperature_steps = temperature_steps
        self.straight_through = straight_through
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.warmup_ratio, self.end_lr_factor = warmup_ratio, end_lr_factor
        self.tokenizer: GumbelVQ | None = None
        # one metric instance per stage; pixels compared on the [0, 1] scale
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_usage = CodebookUsage(self.config.n_embed)
        self.test_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.test_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.test_usage = CodebookUsage(self.config.n_embed)

    # --- building ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = GumbelVQ(self.config)

    def _max_steps(self) -> int:
        steps = self.trainer.max_steps
        if steps is None or steps < 1:
            raise ValueError("VQTokenizerModule needs trainer.max_steps (the training image "
                             "stream is endless, so epochs do not end the run): set "
                             "--trainer.max_steps")
        return steps

    def configure_optimizers(self) -> Any:
        return optimizers_with_schedule(
            self.trainer.model.parameters(), self.optimizer_factory, self.scheduler_factory,
            self._max_steps, self.warmup_ratio, self.end_lr_factor)

    # --- training ---------------------------------------------------------------------------
    def temperature(self) -> float:
        total = self.temperature_steps or self._max_steps()
        return cosine_anneal(self.global_step, total, self.temperature_start, self.temperature_end)

    def training_step(self, images: Tensor, batch_idx: int) -> Tensor:
        temperature = self.temperature()
        out = self.tokenizer(images, temperature=temperature, hard=self.straight_through)
        error = out.reconstruction.float() - images
        l1, mse = error.abs().mean(), error.pow(2).mean()
        loss = self.l1_weight * l1 + self.mse_weight * mse + self.kl_weight * out.kl
        batch = len(images)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch)
        self.log_dict({"train/l1": l1.detach(), "train/mse": mse.detach(),
                       "train/kl": out.kl.detach(), "train/temperature": temperature},
                      batch_size=batch)
        return loss

    # --- evaluation -------------------------------------------------------------------------
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Tokenize and decode as a task does; returns (codes, images clamped to [-1, 1])."""
        codes = self.tokenizer.encode_codes(images)
        return codes, self.tokenizer.decode_codes(codes).float().clamp(-1.0, 1.0)

    def _evaluate(self, images: Tensor, stage: str) -> None:
        codes, decoded = self.reconstruct(images)
        target, output = (images + 1) / 2, (decoded + 1) / 2
        psnr, ssim, usage = (getattr(self, f"{stage}_{name}") for name in ("psnr", "ssim", "usage"))
        psnr.update(output, target)
        ssim.update(output, target)
        usage.update(codes)
        self.log(f"{stage}/l1", (decoded - images).abs().mean(), batch_size=len(images),
                 sync_dist=True)

    def _log_metrics(self, stage: str) -> None:
        psnr, ssim, usage = (getattr(self, f"{stage}_{name}") for name in ("psnr", "ssim", "usage"))
        if not psnr.update_called:
            return
        self.log(f"{stage}/psnr", psnr.compute(), prog_bar=True)
        self.log(f"{stage}/ssim", ssim.compute(), prog_bar=True)
        used = usage.compute()
        self.log(f"{stage}/codebook_perplexity", used["perplexity"])
        self.log(f"{stage}/codebook_used", used["used_fraction"])
        for metric in (psnr, ssim, usage):
            metric.reset()

    def validation_step(self, images: Tensor, batch_idx: int) -> None:
        self._evaluate(images, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, images: Tensor, batch_idx: int) -> None:
        self._evaluate(images, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, images: Tensor, batch_idx: int) -> Tensor:
        """The code grid of each image (B, h, w)."""
        return self.tokenizer.encode_codes(images)

    # --- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TOKENIZER_CHECKPOINT_KEY] = {"config": self.config.to_dict(),
                                                "prefix": STATE_DICT_PREFIX}
