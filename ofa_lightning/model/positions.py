"""Position index tables of OFA: relative buckets for text and image, and image grid ids.

These are pure functions of the configuration. Official checkpoints store them as buffers;
we rebuild them instead of loading them, so a checkpoint can never disagree with the config.
"""

from __future__ import annotations

import math

import torch


def token_relative_buckets(bucket_size: int, max_positions: int) -> torch.Tensor:
    """Bucket index of every (query, key) text position pair, shape (max_positions, max_positions).

    Distances within ``bucket_size // 2`` keep their own bucket; longer ones share
    logarithmically wider buckets, so the 2*bucket_size-1 learned biases cover 1024 positions.
    The arithmetic runs in float32, as in the official code, so the ceil lands identically.
    """
    positions = torch.arange(max_positions)
    relative = positions[:, None] - positions[None, :]  # (L, L), query minus key
    sign = torch.sign(relative)
    mid = bucket_size // 2
    # distances inside +-mid are replaced by mid-1 only to keep log() finite; they are not used
    distance = torch.where((relative < mid) & (relative > -mid), torch.full_like(relative, mid - 1),
                           relative.abs())
    log_bucket = torch.ceil(torch.log(distance / mid) / math.log((max_positions - 1) / mid)
                            * (mid - 1)) + mid
    log_bucket = log_bucket.int()
    bucket = torch.where(distance.le(mid), relative, log_bucket * sign).long()
    return bucket + bucket_size - 1


def num_token_buckets(bucket_size: int) -> int:
    return 2 * bucket_size - 1


def num_image_buckets(bucket_size: int) -> int:
    """All 2-D offsets on a bucket_size grid, plus three entries for the reserved position 0."""
    return (2 * bucket_size - 1) ** 2 + 3


def image_relative_buckets(bucket_size: int) -> torch.Tensor:
    """Bucket index between image position ids, shape (bucket_size**2 + 1,) * 2.

    Id ``r * bucket_size + c + 1`` is grid cell (r, c); id 0 is a reserved position (the
    decoder's bos) with its own three buckets: query 0, key 0, and both.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size),
                                        indexing="ij")).flatten(1)  # (2, N) rows, cols
    offset = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    span = 2 * bucket_size - 1
    index = (offset[..., 0] + bucket_size - 1) * span + (offset[..., 1] + bucket_size - 1)
    n = bucket_size * bucket_size
    total = num_image_buckets(bucket_size)
    buckets = torch.zeros(n + 1, n + 1, dtype=torch.long)
    buckets[1:, 1:] = index
    buckets[0, :] = total - 3
    buckets[:, 0] = total - 2
    buckets[0, 0] = total - 1
    return buckets


def image_grid_position_ids(height: int, width: int, bucket_size: int) -> torch.Tensor:
    """Position ids of a row-major height x width patch grid: ``r * bucket_size + c + 1``."""
    if height > bucket_size or width > bucket_size:
        raise ValueError(
            f"image patch grid {height}x{width} exceeds the {bucket_size}x{bucket_size} position "
            f"table (image_bucket_size); use smaller images or a larger image_bucket_size")
    rows = torch.arange(height)[:, None] * bucket_size
    cols = torch.arange(width)[None, :]
    return (rows + cols + 1).flatten()


# The official decoder pads its image-code positions to a fixed length with this id.
_CODE_TAIL_ID = 1024
_CODE_TAIL_LENGTH = 769


def code_position_ids(code_grid_size: int, bucket_size: int) -> torch.Tensor:
    """Image position id of each decoder step in image-code mode: bos, then the code grid.

    Step 0 (bos) gets the reserved id 0; code k sits at grid cell (k // W, k % W). The tail
    of constant ids reproduces the official buffer, so lengths past the grid behave the same.
    """
    grid = image_grid_position_ids(code_grid_size, code_grid_size, bucket_size)
    tail = torch.full((_CODE_TAIL_LENGTH,), _CODE_TAIL_ID, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), grid, tail])
