"""Pre-LN Transformer layers with OFA's NormFormer extras.

Each sub-block is ``x + drop_path(post_ln(block(pre_ln(x))))``; the optional post-LNs
(``attn_ln``, ``self_attn_ln``, ``cross_attn_ln``) and the LN inside the FFN
(``ffn_layernorm``) are NormFormer's and are present in every released checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ofa_lightning.config import OFAConfig
from ofa_lightning.model.attention import OFAAttention


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def drop_path_rates(rate: float, num_layers: int) -> list[float]:
    """Linearly increasing rates, 0 for the first layer, as the official code schedules them."""
    if num_layers < 2:
        return [0.0] * num_layers
    return [rate * i / (num_layers - 1) for i in range(num_layers)]


def _optional_norm(enabled: bool, dim: int, eps: float) -> nn.LayerNorm | None:
    return nn.LayerNorm(dim, eps=eps) if enabled else None


def _apply_optional(norm: nn.LayerNorm | None, x: torch.Tensor) -> torch.Tensor:
    return norm(x) if norm is not None else x


def _feed_forward(layer: "EncoderLayer | DecoderLayer", x: torch.Tensor) -> torch.Tensor:
    """The FFN branch; fc1/fc2 and its norms live on the layer to keep the checkpoint keys."""
    h = F.gelu(layer.fc1(layer.final_layer_norm(x)))
    h = _apply_optional(layer.ffn_layernorm, layer.activation_dropout(h))
    return layer.dropout(layer.fc2(h))


class EncoderLayer(nn.Module):
    def __init__(self, config: OFAConfig, drop_path: float) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layer_norm_eps
        self.self_attn = OFAAttention(dim, config.attention_heads, config.attn_scale_factor,
                                      config.attention_dropout, config.scale_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.attn_ln = _optional_norm(config.scale_attn, dim, eps)
        self.fc1 = nn.Linear(dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, dim)
        self.ffn_layernorm = _optional_norm(config.scale_fc, config.ffn_dim, eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)
        h = _apply_optional(self.attn_ln, self.self_attn(h, k, v, bias))
        x = x + self.drop_path(self.dropout(h))
        return x + self.drop_path(_feed_forward(self, x))


class DecoderLayer(nn.Module):
    def __init__(self, config: OFAConfig, drop_path: float) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layer_norm_eps

        def attention() -> OFAAttention:
            return OFAAttention(dim, config.attention_heads, config.attn_scale_factor,
                                config.attention_dropout, config.scale_heads)

        self.self_attn = attention()
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attn_ln = _optional_norm(config.scale_attn, dim, eps)
        self.encoder_attn = attention()
        self.encoder_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_ln = _optional_norm(config.scale_attn, dim, eps)
        self.fc1 = nn.Linear(dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, dim)
        self.ffn_layernorm = _optional_norm(config.scale_fc, config.ffn_dim, eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor,
                cross_kv: tuple[torch.Tensor, torch.Tensor], cross_bias: torch.Tensor,
                past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the new positions ``x`` (B, Tn, D); ``past_kv`` holds the earlier positions'
        self-attention keys/values. Returns the output and the keys/values of all positions."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)  # (B, H, Tn, dh)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        h = self.self_attn(h, k, v, self_bias)
        x = x + self.drop_path(self.dropout(_apply_optional(self.self_attn_ln, h)))
        h = self.encoder_attn(self.encoder_attn_layer_norm(x), *cross_kv, cross_bias)
        x = x + self.drop_path(self.dropout(_apply_optional(self.cross_attn_ln, h)))
        return x + self.drop_path(_feed_forward(self, x)), (k, v)
