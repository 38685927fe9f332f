"""``generate``: run an ``OFAModel`` through the search with its incremental-decoding cache."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ofa_lightning.generation.config import GenerationConfig, Hypothesis, SpecialTokens
from ofa_lightning.generation.constraints import Trie
from ofa_lightning.generation.search import beam_search


class ModelStepper:
    """Feeds the decoder the growing prefixes; the encoder output is computed once, outside.

    With a cache only the newest position is decoded each step, and ``reorder`` moves the
    cached keys/values (self-attention per step, cross-attention computed once) with the beams.
    The model's cache contract: once filled, decoding no longer reads ``encoder_out``, so
    the encoder output is reordered only when decoding without a cache.
    """

    def __init__(self, model: Any, encoder_out: Any, gen_code: bool = False,
                 cache: Any | None = None) -> None:
        self.model, self.encoder_out = model, encoder_out
        self.gen_code, self.cache = gen_code, cache

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        code_masks = (torch.ones(tokens.size(0), dtype=torch.bool, device=tokens.device)
                      if self.gen_code else None)
        logits = self.model.decode(tokens, self.encoder_out, code_masks=code_masks,
                                   cache=self.cache)  # (n, t_new, V)
        return logits[:, -1]

    def reorder(self, order: torch.Tensor, same_sources: bool = False) -> None:
        if self.cache is None:
            if not same_sources:  # otherwise each row's encoder output is already right
                self.encoder_out = self.encoder_out.index_select(order)
        else:
            self.cache.reorder(order, same_sources)


def decoder_limit(model_config: Any, gen_code: bool) -> int:
    """Most tokens the decoder can generate after bos.

    Text positions stop at ``max_positions``; in image-code mode a whole code grid always fits
    (the official text-to-image recipe generates 32 x 32 = 1024 codes).
    """
    limit = model_config.max_positions - 1
    if gen_code:
        limit = max(limit, model_config.code_grid_size ** 2)
    return limit


def collate_prefix(prefix_tokens: torch.Tensor | Sequence[Sequence[int]] | None, batch_size: int,
                   pad: int, device: torch.device) -> torch.Tensor | None:
    """Per-sample decoder prefixes (tokens after bos) as one right-padded (B, P) tensor."""
    if prefix_tokens is None:
        return None
    if isinstance(prefix_tokens, torch.Tensor):
        prefix = prefix_tokens.to(device=device, dtype=torch.long)
        if prefix.dim() != 2:
            raise ValueError(f"prefix_tokens must be (B, P), got shape {tuple(prefix.shape)}")
    else:
        rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prefix_tokens]
        width = max((r.numel() for r in rows), default=0)
        prefix = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            prefix[i, : row.numel()] = row
        prefix = prefix.to(device)
    if prefix.size(0) != batch_size:
        raise ValueError(f"prefix_tokens has {prefix.size(0)} rows for a batch of {batch_size}")
    return prefix


def _check_inputs(config: GenerationConfig, trie: Trie | None, prefix: torch.Tensor | None,
                  vocab_size: int, special: SpecialTokens) -> None:
    if config.beam >= vocab_size:
        raise ValueError(f"GenerationConfig.beam={config.beam} must be below the vocabulary "
                         f"size {vocab_size}")
    if config.constraint_range is not None and config.constraint_range[1] > vocab_size:
        raise ValueError(f"GenerationConfig.constraint_range={config.constraint_range} ends past "
                         f"the vocabulary (size {vocab_size})")
    if trie is not None and trie.max_token >= vocab_size:
        raise ValueError(f"the trie holds token id {trie.max_token}, outside the vocabulary "
                         f"(size {vocab_size})")
    if prefix is not None and prefix.eq(special.eos).any():
        raise ValueError("prefix_tokens must not contain eos: a prefix is forced before the "
                         "generated answer")


@torch.no_grad()
def generate(model: Any, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
             patch_masks: torch.Tensor | None = None, config: GenerationConfig | None = None,
             trie: Trie | None = None, *,
             prefix_tokens: torch.Tensor | Sequence[Sequence[int]] | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             cache_factory: Callable[[], Any] | None = None,
             **settings: Any) -> list[list[Hypothesis]]:
    """Beam search, greedy (``beam=1``) or sampling (``sampling=True``) for a batch.

    ``settings`` are ``GenerationConfig`` fields and override ``config``. ``trie`` restricts
    the output to its candidates (after ``prefix_tokens``, if given). ``generator`` makes
    sampling reproducible. Returns, per sample, up to ``beam`` hypotheses best first (on the
    CPU). The model is used as it is: call ``model.eval()`` first for deterministic output.
    """
    config = (config or GenerationConfig()).replace(**settings) if settings else (
        config or GenerationConfig())
    model_config = model.config
    special = SpecialTokens(pad=model_config.pad_id)
    batch_size, src_len = src_tokens.shape[:2]
    max_len = config.resolve_max_len(src_len, decoder_limit(model_config, config.gen_code))
    prefix = collate_prefix(prefix_tokens, batch_size, special.pad, src_tokens.device)
    _check_inputs(config, trie, prefix, model_config.vocab_size, special)

    encoder_out = model.encode(src_tokens, patch_images, patch_masks)
    cache = None
    if use_cache:
        if cache_factory is None:
            from ofa_lightning.model import DecoderCache
            cache_factory = DecoderCache
        cache = cache_factory()
    stepper = ModelStepper(model, encoder_out, config.gen_code, cache)
    return beam_search(stepper, batch_size, max_len, config, device=src_tokens.device,
                       special=special, trie=trie, prefix_tokens=prefix, generator=generator)
