"""The OFA decoder: text or image-code rows, position biases, and incremental decoding.

A row decodes either text (``layernorm_embedding``, text positions, token buckets) or image
codes (``code_layernorm_embedding``, 2-D code-grid positions, image buckets); mixed batches
choose per row. Everything that depends only on positions is computed for the new positions
alone and cached, so a decoding step costs O(1) projections, not O(t).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ofa_lightning.config import OFAConfig
from ofa_lightning.model.encoder import EncoderOutput, padding_bias
from ofa_lightning.model.layers import DecoderLayer, drop_path_rates
from ofa_lightning.model.positions import (code_position_ids, image_relative_buckets,
                                           num_image_buckets, num_token_buckets,
                                           token_relative_buckets)

TEXT, CODE = "text", "code"
KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DecoderCache:
    """Incremental-decoding state. Start empty; ``OFAModel.decode`` fills it.

    Everything with a batch dimension is reordered by ``reorder`` (beam search), so the
    caller never has to touch the encoder output again after the first step.
    """

    length: int = 0
    self_kv: list[KeyValue] = field(default_factory=list)  # per layer, (B, H, t, dh)
    cross_kv: list[KeyValue] = field(default_factory=list)  # per layer, (B, H, S, dh)
    cross_pos_k: torch.Tensor | None = None  # (B, H, S, dh)
    encoder_padding: torch.Tensor | None = None  # (B, S) bool
    self_pos_k: dict[str, torch.Tensor] = field(default_factory=dict)  # mode -> (H, t, dh)

    def reorder(self, order: torch.Tensor, same_sources: bool = False) -> None:
        """Keep rows ``order`` of every batched tensor, in that order.

        ``same_sources``: each new row reads the same source as the old row it replaces
        (beams of one sentence swapping places), so the encoder-side state is already right
        and is not copied, which is most of the cache for long sources.
        """
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, order)

        self.self_kv = [(pick(k), pick(v)) for k, v in self.self_kv]
        if same_sources:
            return
        self.cross_kv = [(pick(k), pick(v)) for k, v in self.cross_kv]
        if self.cross_pos_k is not None:
            self.cross_pos_k = pick(self.cross_pos_k)
        if self.encoder_padding is not None:
            self.encoder_padding = pick(self.encoder_padding)


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, Tn, V), or (N, V) for the positions of a logits_mask
    features: torch.Tensor  # (B, Tn, D) after the final LayerNorm
    states: list[torch.Tensor] = field(default_factory=list)  # embeddings + each layer, if asked


def _select_rows(code_rows: torch.Tensor | None, per_mode: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pick each batch row's tensor from the text or the code variant (leading dim = batch)."""
    if len(per_mode) == 1:
        return next(iter(per_mode.values()))
    code, text = per_mode[CODE], per_mode[TEXT]
    shape = (-1,) + (1,) * (max(code.dim(), text.dim()) - 1)
    return torch.where(code_rows.view(shape), code, text)


class OFADecoder(nn.Module):
    def __init__(self, config: OFAConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        dim, eps, heads = config.embed_dim, config.layer_norm_eps, config.attention_heads
        self.config = config
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(dim, eps=eps)
        self.code_layernorm_embedding = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(config.dropout)
        self.embed_positions = nn.Embedding(config.max_positions + 2, dim)
        self.embed_image_positions = nn.Embedding(config.num_image_positions, dim)
        self.pos_ln = nn.LayerNorm(dim, eps=eps)
        self.image_pos_ln = nn.LayerNorm(dim, eps=eps)
        self.self_pos_q_linear = nn.Linear(dim, dim)
        self.self_pos_k_linear = nn.Linear(dim, dim)
        self.cross_pos_q_linear = nn.Linear(dim, dim)
        self.cross_pos_k_linear = nn.Linear(dim, dim)
        self.pos_scaling = (config.head_dim * config.attn_scale_factor) ** -0.5
        rates = drop_path_rates(config.decoder_drop_path_rate, config.decoder_layers)
        self.layers = nn.ModuleList(DecoderLayer(config, rate) for rate in rates)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.output_projection = nn.Linear(dim, config.vocab_size, bias=False)
        self.output_projection.weight = embed_tokens.weight
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(num_token_buckets(config.token_bucket_size), heads)
            for _ in range(config.decoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(num_image_buckets(config.image_bucket_size), heads)
            for _ in range(config.decoder_layers))
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """Index tables that follow from the config; rebuilt, never loaded from checkpoints."""
        config = self.config
        with torch.device("cpu"):
            return {"token_rp_bucket": token_relative_buckets(config.token_bucket_size,
                                                              config.max_positions),
                    "image_rp_bucket": image_relative_buckets(config.image_bucket_size),
                    "image_position_idx": code_position_ids(config.code_grid_size,
                                                            config.image_bucket_size)}

    # --- positions ------------------------------------------------------------------------------
    def raw_position_embeddings(self, mode: str, positions: torch.Tensor) -> torch.Tensor:
        """Absolute position embeddings (Tn, D) of decoder steps ``positions``, before their
        LayerNorm (what ``entangle_position_embedding`` adds to the tokens)."""
        if mode == TEXT:
            return self.embed_positions(positions)
        return self.embed_image_positions(self.image_position_idx[positions])

    def position_embeddings(self, mode: str, raw: torch.Tensor) -> torch.Tensor:
        """Normalised absolute position embeddings: the keys/queries of the position biases."""
        return (self.pos_ln if mode == TEXT else self.image_pos_ln)(raw)

    def relative_bias(self, mode: str, layer: int, start: int, end: int) -> torch.Tensor:
        """(H, end-start, end) relative bias of queries start..end-1 against keys 0..end-1."""
        if mode == TEXT:
            buckets = self.token_rp_bucket[start:end, :end]
            table = self.token_rel_pos_table_list[layer]
        else:
            ids = self.image_position_idx[:end]
            buckets = self.image_rp_bucket[ids[start:]][:, ids]
            table = self.image_rel_pos_table_list[layer]
        return table(buckets).permute(2, 0, 1)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.config.attention_heads, -1)).transpose(-3, -2)  # (.., H, T, dh)

    def _check_length(self, length: int, modes: list[str]) -> None:
        # Image-code rows take their positions from the code grid, not the text table, so
        # text-to-image at code_image_size=256 (1 + 1024 steps) is within limits.
        if TEXT in modes and length > self.config.max_positions:
            raise ValueError(f"target has {length} tokens, more than max_positions="
                             f"{self.config.max_positions}")
        if CODE in modes and length > self.image_position_idx.numel():
            raise ValueError(
                f"image-code target has {length} tokens; code_image_size="
                f"{self.config.code_image_size} allows at most {self.image_position_idx.numel()}")

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, prev_output_tokens: torch.Tensor, encoder_out: EncoderOutput,
                code_masks: torch.Tensor | None = None, cache: DecoderCache | None = None,
                return_states: bool = False, logits_mask: torch.Tensor | None = None
                ) -> DecoderOutput:
        """Decode the positions of ``prev_output_tokens`` (B, T) not yet in ``cache``.

        ``logits_mask`` (B, T) bool: project only these positions to the vocabulary (the
        logits come back flattened, (N, V)); training uses it to skip padded targets, which
        saves most of the output projection and softmax when lengths differ across tasks.
        """
        batch, length = prev_output_tokens.shape
        start = cache.length if cache is not None else 0
        code_rows = code_masks.bool() if code_masks is not None else None
        modes = [TEXT] if code_rows is None or not code_rows.any() else (
            [CODE] if code_rows.all() else [TEXT, CODE])
        self._check_length(length, modes)
        steps = torch.arange(start, length, device=prev_output_tokens.device)

        # Position-only terms, per mode: normalised embeddings of the new steps and of all keys.
        raw_pos = {m: self.raw_position_embeddings(m, steps) for m in modes}  # (Tn, D)
        new_pos = {m: self.position_embeddings(m, raw_pos[m]) for m in modes}
        self_pos_k = {}
        for m in modes:
            k = self._split(self.self_pos_k_linear(new_pos[m]))  # (H, Tn, dh)
            if cache is not None and m in cache.self_pos_k:
                k = torch.cat([cache.self_pos_k[m], k], dim=1)
            self_pos_k[m] = k
        self_abs = {m: (self._split(self.self_pos_q_linear(new_pos[m])) * self.pos_scaling)
                    @ self_pos_k[m].transpose(-1, -2) for m in modes}  # (H, Tn, T)

        # Cross-attention: keys are the encoder's normalised positions, computed once.
        if cache is not None and cache.cross_pos_k is not None:
            cross_pos_k, encoder_padding = cache.cross_pos_k, cache.encoder_padding
        else:
            cross_pos_k = self._split(self.cross_pos_k_linear(encoder_out.position_embeddings))
            encoder_padding = encoder_out.padding_mask
        cross_bias = _select_rows(code_rows, {
            m: (self._split(self.cross_pos_q_linear(new_pos[m])) * self.pos_scaling)
            @ cross_pos_k.transpose(-1, -2) for m in modes})  # (B, H, Tn, S)
        cross_bias = cross_bias + padding_bias(encoder_padding, cross_bias.dtype)

        # Causal and key-padding masks over all keys 0..T-1.
        causal = torch.full((length - start, length), float("-inf"), device=steps.device)
        causal = torch.triu(causal, diagonal=start + 1)
        self_mask = causal + padding_bias(prev_output_tokens.eq(self.config.pad_id), causal.dtype)

        tokens = prev_output_tokens[:, start:]
        embedded = self.embed_tokens(tokens)  # (B, Tn, D)
        norms = {TEXT: self.layernorm_embedding, CODE: self.code_layernorm_embedding}
        entangle = self.config.entangle_position_embedding
        x = _select_rows(code_rows, {m: norms[m](embedded + raw_pos[m] if entangle else embedded)
                                     for m in modes})
        x = self.dropout(x)

        states = [x] if return_states else []
        new_self_kv, new_cross_kv = [], []
        for index, layer in enumerate(self.layers):
            self_bias = _select_rows(code_rows, {
                m: (self_abs[m] + self.relative_bias(m, index, start, length)).unsqueeze(0)
                for m in modes}) + self_mask  # (B or 1, H, Tn, T)
            if cache is not None and len(cache.cross_kv) > index:
                cross_kv = cache.cross_kv[index]
            else:
                cross_kv = layer.encoder_attn.project_kv(encoder_out.hidden)
            past = cache.self_kv[index] if cache is not None and cache.self_kv else None
            x, self_kv = layer(x, self_bias, cross_kv, cross_bias, past)
            new_self_kv.append(self_kv)
            new_cross_kv.append(cross_kv)
            if return_states:
                states.append(x)

        if cache is not None:
            cache.length = length
            cache.self_kv = new_self_kv
            cache.cross_kv = new_cross_kv
            cache.cross_pos_k = cross_pos_k
            cache.encoder_padding = encoder_padding
            cache.self_pos_k.update(self_pos_k)
        features = self.layer_norm(x)
        projected = features if logits_mask is None else features[logits_mask]
        return DecoderOutput(self.output_projection(projected), features, states)
