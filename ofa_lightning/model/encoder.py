"""The OFA encoder: [image patches | text] with TUPE-style absolute and relative position biases.

Positions are attention biases, computed once per forward (absolute) or once per layer
(relative tables) and shared by every head row; they enter the token embeddings too only with
``entangle_position_embedding`` (off in every released checkpoint), the text's only with
``entangle_source_text`` as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ofa_lightning.config import OFAConfig
from ofa_lightning.model.image_trunk import build_image_trunk
from ofa_lightning.model.layers import EncoderLayer, drop_path_rates
from ofa_lightning.model.positions import (image_grid_position_ids, image_relative_buckets,
                                           num_image_buckets, num_token_buckets,
                                           token_relative_buckets)

TEXT_TYPE, IMAGE_TYPE = 0, 1


@dataclass
class EncoderOutput:
    """What the decoder needs from the encoder; batch-first."""

    hidden: torch.Tensor  # (B, S, D) after the final LayerNorm
    padding_mask: torch.Tensor  # (B, S) bool, True = pad (text pad or an absent image)
    position_embeddings: torch.Tensor  # (B, S, D) normalised positions, keys of the cross bias
    states: list[torch.Tensor] = field(default_factory=list)  # embeddings + each layer, if asked

    def index_select(self, order: torch.Tensor) -> "EncoderOutput":
        """Rows in ``order`` (e.g. each sample repeated once per beam)."""
        return EncoderOutput(self.hidden.index_select(0, order),
                             self.padding_mask.index_select(0, order),
                             self.position_embeddings.index_select(0, order),
                             [s.index_select(0, order) for s in self.states])


def padding_bias(padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) bool -> (B, 1, 1, S) additive mask with -inf on padded keys."""
    bias = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
    return bias.masked_fill(padding_mask, float("-inf"))[:, None, None, :]


class OFAEncoder(nn.Module):
    def __init__(self, config: OFAConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        dim, eps, heads = config.embed_dim, config.layer_norm_eps, config.attention_heads
        self.config = config
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(dim, eps=eps)
        self.type_embedding = nn.Embedding(2, dim)
        self.embed_images, trunk_channels = build_image_trunk(
            config.resnet_type, config.trunk_stride, config.resnet_drop_path_rate, config.freeze_bn)
        self.image_proj = nn.Linear(trunk_channels, dim)
        self.patch_layernorm_embedding = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(config.dropout)
        # absolute positions (attention bias only): text and 2-D image tables
        self.embed_positions = nn.Embedding(config.max_positions + 2, dim)
        self.embed_image_positions = nn.Embedding(config.num_image_positions, dim)
        self.pos_ln = nn.LayerNorm(dim, eps=eps)
        self.image_pos_ln = nn.LayerNorm(dim, eps=eps)
        self.pos_q_linear = nn.Linear(dim, dim)
        self.pos_k_linear = nn.Linear(dim, dim)
        self.pos_scaling = (config.head_dim * config.attn_scale_factor) ** -0.5
        rates = drop_path_rates(config.encoder_drop_path_rate, config.encoder_layers)
        self.layers = nn.ModuleList(EncoderLayer(config, rate) for rate in rates)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        # relative positions: one bias table per layer (heads columns)
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(num_token_buckets(config.token_bucket_size), heads)
            for _ in range(config.encoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(num_image_buckets(config.image_bucket_size), heads)
            for _ in range(config.encoder_layers))
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """Index tables that follow from the config; rebuilt, never loaded from checkpoints."""
        with torch.device("cpu"):
            return {"token_rp_bucket": token_relative_buckets(self.config.token_bucket_size,
                                                              self.config.max_positions),
                    "image_rp_bucket": image_relative_buckets(self.config.image_bucket_size)}

    # --- embeddings ------------------------------------------------------------------------
    def embed_text(self, src_tokens: torch.Tensor, text_positions: torch.Tensor) -> torch.Tensor:
        """(B, Lt) tokens and their raw (Lt, D) position embeddings -> (B, Lt, D)."""
        x = self.embed_tokens(src_tokens) + self.type_embedding.weight[TEXT_TYPE]
        if self.config.entangle_position_embedding and self.config.entangle_source_text:
            x = x + text_positions
        return self.dropout(self.layernorm_embedding(x))

    def embed_image(self, patch_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings (B, N, D) and the grid position ids (N,) of the patches."""
        patch_images = patch_images.contiguous(memory_format=torch.channels_last)
        features = self.embed_images(patch_images)[-1]  # (B, C, h, w)
        height, width = features.shape[-2:]
        position_ids = image_grid_position_ids(height, width, self.config.image_bucket_size)
        position_ids = position_ids.to(features.device)
        x = self.image_proj(features.flatten(2).transpose(1, 2))
        x = x + self.type_embedding.weight[IMAGE_TYPE]
        if self.config.entangle_position_embedding:
            x = x + self.embed_image_positions(position_ids)
        x = self.dropout(self.patch_layernorm_embedding(x))
        return x, position_ids

    # --- biases ------------------------------------------------------------------------------
    def absolute_bias(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, S, D) normalised positions -> (B, H, S, S) bias shared by all layers."""
        heads = self.config.attention_heads
        q = self.pos_q_linear(positions).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = self.pos_k_linear(positions).unflatten(-1, (heads, -1)).transpose(1, 2)
        return (q * self.pos_scaling) @ k.transpose(-1, -2)

    def relative_bias(self, layer: int, num_text: int, image_ids: torch.Tensor | None
                      ) -> torch.Tensor:
        """(H, S, S) relative bias of one layer: text buckets on the text block, 2-D image
        buckets on the image block, nothing between text and image."""
        text = self.token_rel_pos_table_list[layer](
            self.token_rp_bucket[:num_text, :num_text]).permute(2, 0, 1)  # (H, Lt, Lt)
        if image_ids is None:
            return text
        buckets = self.image_rp_bucket[image_ids][:, image_ids]
        image = self.image_rel_pos_table_list[layer](buckets).permute(2, 0, 1)  # (H, N, N)
        return _block_diagonal(image, text)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
                patch_masks: torch.Tensor | None = None, return_states: bool = False
                ) -> EncoderOutput:
        batch, num_text = src_tokens.shape
        if num_text > self.config.max_positions:
            raise ValueError(f"source has {num_text} tokens, more than max_positions="
                             f"{self.config.max_positions}; truncate the input or raise the limit")
        text_positions = self.embed_positions(torch.arange(num_text, device=src_tokens.device))
        x = self.embed_text(src_tokens, text_positions)
        padding_mask = src_tokens.eq(self.config.pad_id)
        positions = self.pos_ln(text_positions).expand(batch, -1, -1)
        image_ids = None
        if patch_images is not None:
            image_x, image_ids = self.embed_image(patch_images)
            image_padding = torch.zeros(image_x.shape[:2], dtype=torch.bool, device=x.device)
            if patch_masks is not None:
                image_padding |= ~patch_masks.bool()[:, None]
            image_positions = self.image_pos_ln(self.embed_image_positions(image_ids))
            x = torch.cat([image_x, x], dim=1)
            padding_mask = torch.cat([image_padding, padding_mask], dim=1)
            positions = torch.cat([image_positions.expand(batch, -1, -1), positions], dim=1)
        x = x * (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, S, D), pads zeroed

        shared_bias = self.absolute_bias(positions) + padding_bias(padding_mask, positions.dtype)
        states = [x] if return_states else []
        for index, layer in enumerate(self.layers):
            bias = shared_bias + self.relative_bias(index, num_text, image_ids)
            x = layer(x, bias)
            if return_states:
                states.append(x)
        return EncoderOutput(self.layer_norm(x), padding_mask, positions, states)


def _block_diagonal(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two (H, a, a) and (H, b, b) bias blocks on the diagonal of a zero (H, a+b, a+b) tensor."""
    heads, a, b = first.shape[0], first.shape[-1], second.shape[-1]
    out = first.new_zeros(heads, a + b, a + b)
    out[:, :a, :a] = first
    out[:, a:, a:] = second
    return out
