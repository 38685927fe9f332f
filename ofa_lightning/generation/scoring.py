"""All-candidate scoring: the log-likelihood of every candidate answer for every sample.

This is OFA's default VQA evaluation (and SNLI-VE, ImageNet): each candidate's score is the
sum over its tokens and the closing eos of log p, where, at each answer position, logits of
tokens the candidate trie does not allow there are set to -inf before the log-softmax.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ofa_lightning.generation.config import BOS, EOS
from ofa_lightning.generation.constraints import NEG_INF, Trie
from ofa_lightning.generation.decoding import collate_prefix


def _pad_rows(rows: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    """Right-pad 1-D long tensors into (n, max_len)."""
    out = torch.full((len(rows), max(r.numel() for r in rows)), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


@torch.no_grad()
def score_candidates(model: Any, src_tokens: torch.Tensor,
                     candidates: Sequence[Sequence[int]],
                     patch_images: torch.Tensor | None = None,
                     patch_masks: torch.Tensor | None = None, *,
                     trie: Trie | None = None, constrain: bool = True,
                     prefix_tokens: torch.Tensor | Sequence[Sequence[int]] | None = None,
                     chunk_size: int = 20) -> torch.Tensor:
    """(B, n_candidates) float32 log-likelihoods; ``argmax(1)`` is the predicted answer.

    ``candidates``: token ids of each answer (no bos, no eos). ``constrain`` applies the
    trie mask (built from ``candidates`` unless ``trie`` is given); ``constrain=False`` scores
    under the full softmax. ``prefix_tokens``: an optional per-sample decoder prefix (tokens
    after bos, e.g. the question for VQA's ``prompt_type=prev_output``); it is fed to the
    decoder but not scored. The encoder runs once; candidates go through the decoder
    ``chunk_size`` at a time for all samples together.
    """
    if not candidates:
        raise ValueError("score_candidates needs at least one candidate")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    vocab, pad = model.config.vocab_size, model.config.pad_id
    answers = [torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in candidates]
    for i, answer in enumerate(answers):
        if answer.numel() and (answer.min() < 0 or answer.max() >= vocab):
            raise ValueError(f"candidate {i} has token ids outside [0, {vocab})")
    if constrain and trie is None:
        trie = Trie(candidates, eos=EOS)
    if not constrain:
        trie = None

    device, batch = src_tokens.device, src_tokens.size(0)
    prefix = collate_prefix(prefix_tokens, batch, pad, device)
    prefixes = ([row[row.ne(pad)] for row in prefix] if prefix is not None
                else [src_tokens.new_zeros(0)] * batch)
    encoder_out = model.encode(src_tokens, patch_images, patch_masks)
    scores = torch.empty(batch, len(answers), device=device)
    for lo in range(0, len(answers), chunk_size):
        chunk = answers[lo: lo + chunk_size]
        scores[:, lo: lo + len(chunk)] = _score_chunk(model, encoder_out, prefixes, chunk, trie,
                                                      vocab, pad)
    return scores


def _score_chunk(model: Any, encoder_out: Any, prefixes: list[torch.Tensor],
                 answers: list[torch.Tensor], trie: Trie | None, vocab: int,
                 pad: int) -> torch.Tensor:
    """(B, n) scores of ``n`` answers for every sample, in one decoder call."""
    batch, n, device = len(prefixes), len(answers), prefixes[0].device
    bos = torch.tensor([BOS])
    prev = _pad_rows([torch.cat([bos, p.cpu(), a]) for p in prefixes for a in answers],
                     pad).to(device)  # (B*n, T)
    targets = _pad_rows([torch.cat([a, torch.tensor([EOS])]) for a in answers],
                        pad).to(device)  # (n, A): each answer, then eos
    width = targets.size(1)
    lengths = torch.tensor([a.numel() + 1 for a in answers], device=device)
    scored = torch.arange(width, device=device) < lengths.unsqueeze(1)  # (n, A)
    # Row b*n+j predicts answer j's token i at decoder position len(prefix_b) + i.
    starts = torch.tensor([p.numel() for p in prefixes], device=device).repeat_interleave(n)
    positions = (starts.unsqueeze(1) + torch.arange(width, device=device)).clamp_(
        max=prev.size(1) - 1)  # (B*n, A)

    rows = torch.arange(batch, device=device).repeat_interleave(n)
    logits = model.decode(prev, encoder_out.index_select(rows))  # (B*n, T, V)
    logits = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
    logits = logits.float().view(batch, n, width, -1)  # (B, n, A, V)
    if trie is not None:
        nodes = trie.walk(targets)[:, :width]  # (n, A): node before i
        logits.masked_fill_(~trie.allowed_mask(nodes, vocab).unsqueeze(0), NEG_INF)
    lprobs = torch.log_softmax(logits, dim=-1).gather(
        -1, targets.expand(batch, n, width).unsqueeze(-1)).squeeze(-1)  # (B, n, A)
    return lprobs.masked_fill(~scored, 0.0).sum(-1)
