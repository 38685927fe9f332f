"""OFAModel: the encoder-decoder with one shared token embedding, as a plain nn.Module."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ofa_lightning.config import OFAConfig
from ofa_lightning.model.decoder import DecoderCache, OFADecoder
from ofa_lightning.model.encoder import EncoderOutput, OFAEncoder


@dataclass
class OFAOutput:
    logits: torch.Tensor  # (B, T, V), or (N, V) when a logits_mask was given
    features: torch.Tensor  # (B, T, D) decoder output after its final LayerNorm
    encoder_out: EncoderOutput
    decoder_states: list[torch.Tensor]  # embeddings + each decoder layer, when asked for


class OFAModel(nn.Module):
    """The unified OFA network. Parameter names are the official checkpoint keys."""

    def __init__(self, config: OFAConfig) -> None:
        super().__init__()
        self.config = config
        # one table for encoder input, decoder input and (tied) output projection
        embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_id)
        self.encoder = OFAEncoder(config, embed_tokens)
        self.decoder = OFADecoder(config, embed_tokens)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT-style init of every Linear and Embedding (std ``config.init_std``), as the
        official model starts. The trunk keeps its own init (see ``build_image_trunk``)."""
        trunk = set(self.encoder.embed_images.modules())
        for module in self.modules():
            if module in trunk:
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()

    def rebuild_derived_buffers(self) -> None:
        """Recompute the position index tables in place, e.g. after materialising a model
        that was built on the meta device (FSDP), where buffers hold no data."""
        for part in (self.encoder, self.decoder):
            for name, value in part.derived_buffers().items():
                current = getattr(part, name)
                setattr(part, name, value.to(current.device if current.device.type != "meta"
                                             else "cpu"))

    # --- the three entry points -------------------------------------------------------------
    def encode(self, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
               patch_masks: torch.Tensor | None = None, return_states: bool = False
               ) -> EncoderOutput:
        """Encode [image patches | text]; ``patch_images`` None means a text-only source."""
        return self.encoder(src_tokens, patch_images, patch_masks, return_states)

    def decode(self, prev_output_tokens: torch.Tensor, encoder_out: EncoderOutput,
               code_masks: torch.Tensor | None = None, cache: DecoderCache | None = None
               ) -> torch.Tensor:
        """Logits (B, Tn, V) of the positions of ``prev_output_tokens`` not yet in ``cache``."""
        return self.decoder(prev_output_tokens, encoder_out, code_masks, cache).logits

    def forward(self, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
                patch_masks: torch.Tensor | None = None,
                prev_output_tokens: torch.Tensor | None = None,
                code_masks: torch.Tensor | None = None, return_states: bool = False,
                logits_mask: torch.Tensor | None = None) -> OFAOutput:
        """``logits_mask`` (B, T) bool: logits only for these positions, flattened (N, V)."""
        if prev_output_tokens is None:
            raise ValueError("OFAModel.forward needs prev_output_tokens (bos + target tokens)")
        encoder_out = self.encode(src_tokens, patch_images, patch_masks, return_states)
        decoded = self.decoder(prev_output_tokens, encoder_out, code_masks,
                               return_states=return_states, logits_mask=logits_mask)
        return OFAOutput(decoded.logits, decoded.features, encoder_out, decoded.states)

    @torch.no_grad()
    def generate(self, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
                 patch_masks: torch.Tensor | None = None, **settings: Any) -> list[list[torch.Tensor]]:
        """Beam search / greedy / sampling; ``settings`` are ``GenerationConfig`` fields.

        Returns, per sample, its hypotheses best first, each a 1-D token tensor ending in eos.
        """
        from ofa_lightning.generation import generate

        hypotheses = generate(self, src_tokens, patch_images, patch_masks, **settings)
        return [[hyp.tokens for hyp in sample] for sample in hypotheses]

    # --- construction from files ----------------------------------------------------------------
    @classmethod
    def from_official(cls, path: str | os.PathLike, use_ema: bool = False,
                      **overrides: Any) -> "OFAModel":
        """Build and load an official fairseq checkpoint, a bare state dict (official or HF
        key names) or this project's own file. ``overrides`` replace config fields."""
        from ofa_lightning.checkpoint import load_checkpoint, load_state_dict_strict

        loaded = load_checkpoint(path, use_ema=use_ema, **overrides)
        model = cls(loaded.config)
        load_state_dict_strict(model, loaded.state_dict, source=path)
        return model
