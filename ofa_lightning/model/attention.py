"""Multi-head attention as OFA defines it: biased scores, a wider scaling, NormFormer head scale.

All position information reaches attention as an additive bias, so one fused
``scaled_dot_product_attention`` call with the bias as ``attn_mask`` does the whole job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OFAAttention(nn.Module):
    """Attention with scores ``(q k^T) * (scale_factor * head_dim) ** -0.5 + bias``.

    Module and parameter names (``q_proj``, ..., ``c_attn``) are the official checkpoint keys.
    """

    def __init__(self, embed_dim: int, num_heads: int, scale_factor: float, dropout: float,
                 scale_heads: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = (self.head_dim * scale_factor) ** -0.5
        self.dropout = dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # NormFormer: a learned scale per head, applied to each head's context vector
        self.c_attn = nn.Parameter(torch.ones(num_heads)) if scale_heads else None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, dh)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``source``, split into heads; cached once for cross-attention."""
        return self.split_heads(self.k_proj(source)), self.split_heads(self.v_proj(source))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """``query`` (B, Tq, D); ``key``/``value`` already split, (B, H, Tk, dh).

        ``bias`` (B or 1, H, Tq, Tk) carries position biases, causal and padding masks (-inf).
        """
        q = self.split_heads(self.q_proj(query))  # (B, H, Tq, dh)
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype != torch.float32:
            context = self._explicit_attention(q, key, value, bias, dropout)
        else:
            context = F.scaled_dot_product_attention(q, key, value, attn_mask=bias,
                                                     dropout_p=dropout, scale=self.scaling)
        if self.c_attn is not None:
            context = context * self.c_attn.to(context.dtype)[None, :, None, None]
        batch, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, length, -1)  # (B, Tq, D)
        return self.out_proj(context)

    def _explicit_attention(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            bias: torch.Tensor | None, dropout: float) -> torch.Tensor:
        """Two matmuls and a float32 softmax. On CPU in bf16 this measured 1.6x (271 keys) to
        7x (one query, the decoding step) faster than the fused SDPA kernel."""
        scores = (q @ key.transpose(-1, -2)) * self.scaling  # (B, H, Tq, Tk)
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return F.dropout(probs, dropout, self.training) @ value  # (B, H, Tq, dh)
