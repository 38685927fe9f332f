"""Metrics for tasks whose decoder writes image codes (image infilling, text-to-image).

- :class:`CodeAccuracy`: the fraction of predicted VQGAN codes equal to the target codes,
  position by position. Two integer sums are the only state, so DDP sums them.
- :class:`ImageFID`: torchmetrics' ``FrechetInceptionDistance`` over decoded images, with an
  injectable feature extractor and an offline default.

About the default FID features
------------------------------
The official evaluation (``run_scripts/image_gen``, ``reference/ofa_spec.md`` §5.4) computes
FID with Inception-v3 features of 299 px images. Inception weights are a download, and this
project must evaluate offline, so the default extractor is :class:`RandomConvFeatures`: a
small convolutional net whose weights are drawn once from a fixed seed and never trained.
Random convolutional features do separate image distributions (colour, contrast, edges and
layout all move them), FID over them is 0 for identical sets and grows as two sets drift
apart, but **its values are not comparable with published (Inception) FID**: use them to
compare checkpoints and settings of the same project. For paper-comparable numbers pass a
real Inception, e.g. ``NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
feature_extractor_weights_path=<local pt_inception-2015-12-05 file>)`` from torchmetrics
(needs ``torch-fidelity``), as ``feature=``; it reads the same uint8 images this metric feeds.

The default has 32 features: FID estimates a ``d x d`` covariance per set, which is
rank-deficient (and the score biased) until a set has more than ``d`` images. 32 keeps
ShapesWorld-sized evaluation sets (a few hundred images) well above that, where Inception's
2048 would need thousands. :meth:`ImageFID.compute` warns when a set is that small, and
returns NaN (with a warning, instead of raising) when a set has fewer than 2 images, so a
``fast_dev_run`` validation of one tiny batch does not crash a run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ["CodeAccuracy", "ImageFID", "RandomConvFeatures", "to_uint8_images"]

DEFAULT_FID_FEATURES = 32


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in the VQGAN's [-1, 1] scale -> uint8 in [0, 255], clamped first
    (what the official pipeline does with decoded images); uint8 input is returned as is."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [-1, 1] or uint8, got dtype {images.dtype}")
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor of shape (N, 3, H, W), got "
                        f"{type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")


class RandomConvFeatures(nn.Module):
    """An offline stand-in for Inception: fixed random convolutional features.

    uint8 images (N, 3, H, W) in [0, 255] (as torchmetrics' Inception takes them; float
    images are read as [-1, 1]) are mapped to [-1, 1], resized to ``input_size`` square
    (bilinear, antialiased, so any image size gives comparable features), and pass through
    three stride-2 3x3 convolutions (3 -> 16 -> 32 -> ``num_features`` channels) with ReLU,
    then a global average pool: (N, num_features).

    The weights are He-normal draws from ``torch.Generator().manual_seed(seed)``, held as
    non-persistent buffers: they are never trained, never enter an optimiser (they are not
    parameters) nor a checkpoint, and the same seed gives the same features everywhere.
    """

    def __init__(self, num_features: int = DEFAULT_FID_FEATURES, seed: int = 0,
                 input_size: int = 64) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("input_size", input_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RandomConvFeatures: {name} must be a positive integer, "
                                 f"got {value!r}")
        self.num_features = num_features  # read by FrechetInceptionDistance
        self.input_size = input_size
        generator = torch.Generator().manual_seed(seed)
        widths = (3, 16, 32, num_features)
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            std = math.sqrt(2.0 / (c_in * 9))
            weight = torch.randn(c_out, c_in, 3, 3, generator=generator) * std  # (out, in, 3, 3)
            self.register_buffer(f"weight{i}", weight, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False, antialias=True)  # (N, 3, s, s)
        for i in range(3):
            x = F.relu(F.conv2d(x, getattr(self, f"weight{i}").float(), stride=2, padding=1))
        return x.mean(dim=(2, 3))  # (N, num_features)


class CodeAccuracy(Metric):
    """Fraction of predicted image codes equal to the target codes, over all processes.

    ``update(preds, target)``: integer tensors of one shape (a code grid (h, w), a batch of
    them (N, h, w), or flat codes); every position counts once. ``compute()`` -> a scalar.
    Raises if no code was seen anywhere.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        for name, value in (("preds", preds), ("target", target)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"CodeAccuracy: {name} must be a tensor of codes, got "
                                f"{type(value).__name__}")
            if value.is_floating_point() or value.is_complex():
                raise TypeError(f"CodeAccuracy: {name} must hold integer codes, got {value.dtype}")
        if preds.shape != target.shape:
            raise ValueError(f"CodeAccuracy: preds has shape {tuple(preds.shape)} but target "
                             f"{tuple(target.shape)}; they must match position for position")
        target = target.to(preds.device)
        self.correct += preds.eq(target).sum().to(self.correct.device)
        self.total += preds.numel()

    def compute(self) -> torch.Tensor:
        if self.total.item() == 0:
            raise ValueError("CodeAccuracy.compute() has no codes: call update(...) with at least "
                             "one prediction first")
        return self.correct.to(torch.float64) / self.total


class ImageFID(FrechetInceptionDistance):
    """FID between generated and real images, offline by default.

    ``update(images, real)``: (N, 3, H, W) images, float in the VQGAN's [-1, 1] scale
    (clamped, then mapped to uint8 as the official pipeline saves them) or uint8 already;
    the extractor always receives uint8 (N, 3, H, W), like torchmetrics' Inception.

    Args:
        feature: the feature extractor, an ``nn.Module`` mapping uint8 (N, 3, H, W) to
            (N, d) (give it a ``num_features`` attribute, or it is probed with one
            ``input_img_size`` image); None: :class:`RandomConvFeatures` with
            ``feature_dim`` features and ``seed`` (see the module docstring: offline, not
            comparable with published FID).
        feature_dim, seed: the default extractor's size and weights.
        reset_real_features: as in torchmetrics (True: ``reset()`` also forgets real images).
        input_img_size: the probe image's size for an extractor without ``num_features``.
    """

    higher_is_better = False

    def __init__(self, feature: nn.Module | None = None, feature_dim: int = DEFAULT_FID_FEATURES,
                 seed: int = 0, reset_real_features: bool = True,
                 input_img_size: tuple[int, int, int] = (3, 299, 299), **kwargs: Any) -> None:
        if feature is None:
            feature = RandomConvFeatures(feature_dim, seed)
        elif not isinstance(feature, nn.Module):
            raise TypeError(f"ImageFID: feature must be an nn.Module mapping uint8 (N, 3, H, W) "
                            f"images to (N, d) features, or None for the offline default; got "
                            f"{type(feature).__name__}")
        super().__init__(feature=feature, reset_real_features=reset_real_features,
                         normalize=False, input_img_size=input_img_size, **kwargs)
        self.inception.requires_grad_(False)  # never trained, and DDP must not wait for grads
        self.orig_dtype = torch.float32  # the parent sets it on update; compute() casts to it

    @property
    def num_features(self) -> int:
        return int(self.real_features_sum.numel())

    def update(self, imgs: torch.Tensor, real: bool) -> None:  # type: ignore[override]
        _check_images(imgs)
        if imgs.shape[0] == 0:
            return
        if self.inception.training:  # a real Inception has BatchNorm and dropout
            self.inception.eval()
        # features in float32 even inside a bf16/fp16 autocast region (validation under
        # mixed precision): FID is a small difference of large sums
        with torch.no_grad(), torch.autocast(imgs.device.type, enabled=False):
            super().update(to_uint8_images(imgs), real=real)

    def compute(self) -> torch.Tensor:
        counts = {"real": int(self.real_features_num_samples), "generated":
                  int(self.fake_features_num_samples)}
        if min(counts.values()) < 2:
            warnings.warn(f"ImageFID needs at least 2 images per set, got {counts}; returning NaN "
                          f"(evaluate more samples)", stacklevel=2)
            return torch.tensor(float("nan"), device=self.real_features_sum.device)
        if min(counts.values()) <= self.num_features:
            warnings.warn(f"ImageFID over {counts} images with {self.num_features} features: the "
                          f"covariances are rank-deficient and the score is biased; evaluate more "
                          f"than {self.num_features} images per set or use fewer features",
                          stacklevel=2)
        return super().compute()
