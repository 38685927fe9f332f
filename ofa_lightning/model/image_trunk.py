"""The convolutional image stem: a timm backbone cut at the stride that makes the patch grid.

The official sizes use the first three stages of resnet50/101/152 (stride 16). timm's
ResNets are the same v1.5 network with the same parameter names (``conv1``, ``bn1``,
``layer1.0.conv1`` ...), so official weights load into them unchanged.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

from ofa_lightning.model.layers import DropPath, drop_path_rates


def _feature_index(name: str, stride: int) -> tuple[int, int]:
    """(out index, channels) of ``name``'s feature map at ``stride``; built on the meta device."""
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    if stride not in reductions:
        raise ValueError(
            f"timm model {name!r} has feature maps at strides {reductions}, not at trunk_stride="
            f"{stride}; choose one of those strides")
    index = reductions.index(stride)
    return index, probe.feature_info.channels()[index]


def _schedule_drop_path(trunk: nn.Module, rate: float) -> None:
    """Per stage, block i gets linspace(0, rate, n_blocks)[i], as the official ResNet does."""
    for name, stage in trunk.named_children():
        if not name.startswith("layer"):
            continue
        blocks = list(stage.children())
        for block, block_rate in zip(blocks, drop_path_rates(rate, len(blocks))):
            if hasattr(block, "drop_path"):
                block.drop_path = DropPath(block_rate) if block_rate > 0 else None


def build_image_trunk(name: str, stride: int, drop_path_rate: float = 0.0,
                      freeze_bn: bool = False) -> tuple[nn.Module, int]:
    """The trunk module and its output channels.

    The module is timm's feature extractor itself, not a wrapper, so its parameter names are
    the official ``encoder.embed_images.*`` keys. Calling it returns a one-element list: the
    (B, C, H/stride, W/stride) feature map.
    """
    index, channels = _feature_index(name, stride)
    options = {"pretrained": False, "features_only": True, "out_indices": (index,)}
    try:
        # The official ResNet starts its residual branches at kaiming init (zero_init_residual
        # off); timm's ResNets zero each branch's last BN by default, which leaves a trunk
        # trained from scratch close to a strided projection of its stem for hundreds of steps.
        trunk = timm.create_model(name, zero_init_last=False, **options)
    except TypeError:  # a timm family without that option keeps its own init
        trunk = timm.create_model(name, **options)
    if drop_path_rate > 0:
        _schedule_drop_path(trunk, drop_path_rate)
    if freeze_bn:
        trunk = freeze_batch_norm_2d(trunk)
    # NHWC convolutions are ~15-25% faster on CPU (oneDNN) and use tensor cores on GPU.
    return trunk.to(memory_format=torch.channels_last), channels
