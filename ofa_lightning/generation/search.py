"""Batched beam search and sampling, step for step the official OFA ``SequenceGenerator``.

The search is written against a ``Stepper`` (give it the prefixes, get next-token logits;
reorder its rows), so it knows nothing about the network. What it reproduces, per step:

1. logits of the last position / temperature; trie mask and ``constraint_range`` to -inf;
   ``log_softmax`` in float32;
2. forced prefix tokens, else eos banned while ``step < min_len``; NaN -> -inf; pad banned;
   ``unkpen``; ids 0-3 banned before ``max_len`` when ``gen_code``; only eos at ``max_len``;
   n-gram blocking;
3. beam: the best ``2 * beam`` (hypothesis, token) pairs by cumulative log-prob (at step 0
   only the first hypothesis, all being equal); sampling: one draw per hypothesis (at step 0,
   ``beam`` draws from the first);
4. candidates among the first ``beam`` that end in eos are finished, with score
   ``cumulative / len ** lenpen`` (len counts eos); a sentence is done once it has ``beam``
   finished hypotheses or at ``max_len``, and leaves the batch;
5. the first ``beam`` non-eos candidates continue.

Two things differ from the official loop in how, not what: step 0 runs the decoder on one row
per sentence (all beams are identical there) and the cache is expanded afterwards, and rows
are always gathered in one go (finished sentences dropped in the same index_select).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ofa_lightning.generation.config import (
    NUM_SPECIALS,
    GenerationConfig,
    Hypothesis,
    SpecialTokens,
)
from ofa_lightning.generation.constraints import (
    NEG_INF,
    Trie,
    apply_constraint_range,
    block_repeated_ngrams,
)


class Stepper(Protocol):
    """What the search needs from a decoder."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (n, V) for prefixes ``tokens`` (n, t) that start with bos."""

    def reorder(self, order: torch.Tensor, same_sources: bool) -> None:
        """Keep the rows ``order`` (new n,) of the decoder state, in that order.

        ``same_sources``: every row still belongs to the input it belonged to (beams of one
        sentence were permuted; none expanded or dropped), so state that depends only on the
        input, such as cross-attention keys/values, is unchanged.
        """


def beam_search(stepper: Stepper, batch_size: int, max_len: int, config: GenerationConfig, *,
                device: torch.device | str = "cpu", special: SpecialTokens = SpecialTokens(),
                trie: Trie | None = None, prefix_tokens: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
    """Search (or sample) ``batch_size`` inputs; per input, finished hypotheses best first.

    ``max_len``: generated tokens before eos is forced (``GenerationConfig.resolve_max_len``).
    ``prefix_tokens`` (B, P), right-padded with pad: tokens forced after bos (a decoder
    prompt); they are part of the returned tokens and scores, as in the official generator,
    and a trie applies only after them. The stepper must start with one row per input.
    Hypotheses are returned on the CPU.
    """
    search = _Search(stepper, batch_size, max_len, config, torch.device(device), special, trie,
                     prefix_tokens, generator)
    return search.run()


class _Search:
    """The state of one search; ``run`` is the step loop."""

    def __init__(self, stepper: Stepper, batch_size: int, max_len: int, config: GenerationConfig,
                 device: torch.device, special: SpecialTokens, trie: Trie | None,
                 prefix: torch.Tensor | None, generator: torch.Generator | None) -> None:
        self.stepper, self.cfg, self.sp, self.trie = stepper, config, special, trie
        self.max_len, self.generator, self.k = max_len, generator, config.beam
        rows = batch_size * self.k
        self.tokens = torch.full((rows, max_len + 2), special.pad, dtype=torch.long, device=device)
        self.tokens[:, 0] = special.bos
        self.cum = torch.zeros(rows, max_len + 1, device=device)  # cumulative log-probs
        self.sent = list(range(batch_size))  # original index of each active sentence
        self.ignore = torch.zeros(batch_size, self.k, dtype=torch.bool, device=device)
        self.nodes = torch.zeros(rows, dtype=torch.long, device=device) if trie else None
        self.prefix = prefix  # (bsz, P) or None
        self.prefix_len = prefix.ne(special.pad).sum(1) if prefix is not None else None  # (bsz,)
        self.finalized: list[list[Hypothesis]] = [[] for _ in range(batch_size)]

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> list[list[Hypothesis]]:
        for step in range(self.max_len + 1):
            per_sent = 1 if step == 0 else self.k  # decoder rows per sentence at this step
            seq = (self.tokens[:: self.k] if step == 0 else self.tokens)[:, : step + 1]
            lprobs = self._next_lprobs(self.stepper.step(seq), step, seq, per_sent)  # (n, V)
            bsz = len(self.sent)
            scores, tokens, beams = self._candidates(lprobs.view(bsz, per_sent, -1), step)
            rows = beams + torch.arange(bsz, device=beams.device).unsqueeze(1) * self.k  # (bsz, C)
            eos = tokens.eq(self.sp.eos) & scores.ne(NEG_INF)  # (bsz, C)
            eos[:, : self.k] &= ~self.ignore
            done = self._finalize(step, eos[:, : self.k], rows[:, : self.k], scores[:, : self.k])
            if step == self.max_len or all(done):
                break
            if any(done):
                keep = torch.tensor([not d for d in done], device=rows.device)
                scores, tokens, rows, eos = scores[keep], tokens[keep], rows[keep], eos[keep]
                self._drop_sentences(keep)
            self._advance(step, scores, tokens, rows, eos, same_sources=not any(done))
        for hyps in self.finalized:
            hyps.sort(key=lambda h: h.score, reverse=True)
        return self.finalized

    # --- 1-2: next-token log-probs ------------------------------------------------------------
    def _next_lprobs(self, logits: torch.Tensor, step: int, seq: torch.Tensor,
                     per_sent: int) -> torch.Tensor:
        cfg, sp = self.cfg, self.sp
        x = logits.float()  # (n, V); a full pass over V costs as much as a decoder step on CPU,
        owned = x is not logits  # so copies are made only when something changes the logits
        if cfg.temperature != 1.0:
            x, owned = x / cfg.temperature, True
        in_prefix = None  # (n,) True while a row's forced prefix is still being emitted
        if self.prefix_len is not None:
            in_prefix = (step < self.prefix_len).repeat_interleave(per_sent)
        if self.trie is not None or cfg.constraint_range is not None:
            x = self._constrain(x, owned, per_sent, in_prefix)
        lprobs = torch.log_softmax(x, dim=-1)
        # NaN comes in whole rows (every logit masked, or a NaN logit), so one column tells.
        # The official loop clears NaN after the prefix/min_len rule; for a row that is NaN
        # throughout, clearing it first gives the same all -inf row.
        bad = lprobs[:, 0].isnan()
        if bool(bad.any()):
            lprobs[bad] = NEG_INF

        if self.prefix is not None and step < self.prefix.size(1) and step < self.max_len:
            self._force_prefix(lprobs, self.prefix[:, step].repeat_interleave(per_sent))
        elif step < cfg.min_len:  # (the official loop skips this while any prefix is forced)
            lprobs[:, sp.eos] = NEG_INF
        lprobs[:, sp.pad] = NEG_INF
        if cfg.unkpen:
            lprobs[:, sp.unk] -= cfg.unkpen
        if cfg.gen_code and step < self.max_len:
            lprobs[:, :NUM_SPECIALS] = NEG_INF
        if step >= self.max_len:
            lprobs[:, : sp.eos] = NEG_INF
            lprobs[:, sp.eos + 1:] = NEG_INF
        block_repeated_ngrams(lprobs, seq, cfg.no_repeat_ngram_size, pad=sp.pad)
        return lprobs

    def _constrain(self, x: torch.Tensor, owned: bool, per_sent: int,
                   in_prefix: torch.Tensor | None) -> torch.Tensor:
        """The trie and the constraint range on the logits (n, V) of rows past their forced
        prefix. A prefix is exempt from both: a grounding prompt is text while the range
        holds bins (the official loop would kill such a beam)."""
        exempt = x[in_prefix] if in_prefix is not None else None
        if self.trie is not None:
            nodes = self.nodes[:: self.k] if per_sent == 1 else self.nodes
            x = x.masked_fill(~self.trie.allowed_mask(nodes, x.size(1)), NEG_INF)
        elif not owned:
            x = x.clone()
        if self.cfg.constraint_range is not None:
            apply_constraint_range(x, *self.cfg.constraint_range)
        if exempt is not None:
            x[in_prefix] = exempt
        return x

    def _force_prefix(self, lprobs: torch.Tensor, forced: torch.Tensor) -> None:
        """Rows whose prefix token (n,) is not pad keep only that token's log-prob."""
        kept = lprobs.gather(1, forced.unsqueeze(1))  # (n, 1)
        lprobs.masked_fill_(forced.ne(self.sp.pad).unsqueeze(1), NEG_INF)
        lprobs.scatter_(1, forced.unsqueeze(1), kept)  # pad rows get their own value back

    # --- 3: candidates ------------------------------------------------------------------------
    def _candidates(self, lprobs: torch.Tensor, step: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, tokens, beams), each (bsz, C): cumulative score, token id, source beam."""
        if self.cfg.sampling:
            return self._sample(lprobs, step)
        bsz, per_sent, vocab = lprobs.shape
        width = min(2 * self.k, per_sent * vocab - 1)  # (-1: as the official, never all of V)
        # The best `width` of each hypothesis first, then the best `width` of those: the same
        # candidates as one top-k over all (hypothesis, token) pairs, without a pass that adds
        # the cumulative score to every one of the K * V entries.
        row_scores, row_tokens = lprobs.topk(min(width, vocab), dim=-1)  # (bsz, per_sent, w)
        if step > 0:
            row_scores = row_scores + self.cum.view(bsz, per_sent, -1)[:, :, step - 1: step]
        scores, index = row_scores.reshape(bsz, -1).topk(width)  # (bsz, width)
        tokens = row_tokens.reshape(bsz, -1).gather(1, index)
        return scores, tokens, torch.div(index, row_scores.size(-1), rounding_mode="floor")

    def _sample(self, lprobs: torch.Tensor, step: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw per hypothesis (``beam`` draws from the single row at step 0)."""
        bsz, per_sent, _ = lprobs.shape
        probs, ids = _restrict(lprobs, self.cfg.top_k, self.cfg.top_p)  # (bsz, per_sent, V')
        flat = probs.reshape(bsz * per_sent, -1)
        # A row with no mass left (e.g. an ignored, finished sample) draws index 0 at -inf.
        empty = flat.sum(-1, keepdim=True).le(0)
        flat = torch.where(empty, torch.nn.functional.one_hot(
            torch.zeros_like(empty[:, 0], dtype=torch.long), flat.size(1)).to(flat), flat)
        draws = self.k if step == 0 else 1
        pick = torch.multinomial(flat, draws, replacement=True, generator=self.generator)
        pick = pick.view(bsz, self.k, 1)
        scores = probs.expand(bsz, self.k, -1).gather(2, pick).log().squeeze(2)  # (bsz, K)
        tokens = pick.squeeze(2) if ids is None else ids.expand(bsz, self.k, -1).gather(
            2, pick).squeeze(2)
        if step == 0:
            beams = torch.zeros_like(tokens)
        else:
            beams = torch.arange(self.k, device=tokens.device).expand(bsz, self.k)
            scores = scores + self.cum.view(bsz, self.k, -1)[:, :, step - 1]
        return scores, tokens, beams

    # --- 4: finished hypotheses ---------------------------------------------------------------
    def _finalize(self, step: int, eos: torch.Tensor, rows: torch.Tensor,
                  scores: torch.Tensor) -> list[bool]:
        """Store hypotheses that end in eos; per active sentence, is it done?"""
        if bool(eos.any()):
            picked = rows[eos]  # (m,) row-major: sentence, then candidate rank
            local = torch.arange(eos.size(0), device=eos.device).unsqueeze(1).expand_as(eos)[eos]
            tokens = self.tokens[picked, 1: step + 2].clone()  # (m, step + 1)
            tokens[:, step] = self.sp.eos
            cum = self.cum[picked, : step + 1].clone()
            cum[:, step] = scores[eos]
            positional = torch.cat([cum[:, :1], cum[:, 1:] - cum[:, :-1]], dim=1)
            final = scores[eos]
            if self.cfg.normalize_scores:
                final = final / (step + 1) ** self.cfg.lenpen
            tokens, positional, final = tokens.cpu(), positional.cpu(), final.tolist()
            for i, j in enumerate(local.tolist()):
                hyps = self.finalized[self.sent[j]]
                if len(hyps) < self.k:
                    hyps.append(Hypothesis(tokens[i], final[i], positional[i]))
        return [step == self.max_len or len(self.finalized[s]) == self.k for s in self.sent]

    def _drop_sentences(self, keep: torch.Tensor) -> None:
        """Forget per-sentence state of finished sentences (``keep`` (bsz,) bool)."""
        self.sent = [s for s, k in zip(self.sent, keep.tolist()) if k]
        self.ignore = self.ignore[keep]
        if self.prefix is not None:
            self.prefix, self.prefix_len = self.prefix[keep], self.prefix_len[keep]

    # --- 5: the hypotheses that continue ------------------------------------------------------
    def _advance(self, step: int, scores: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
                 eos: torch.Tensor, same_sources: bool) -> None:
        """Keep, per sentence, the first ``beam`` candidates that neither end nor are ignored."""
        width = scores.size(1)
        blocked = eos.clone()
        blocked[:, : self.k] |= self.ignore
        rank = blocked.long() * width + torch.arange(width, device=scores.device)  # (bsz, C)
        rank, active = rank.topk(self.k, dim=1, largest=False)  # (bsz, K)
        self.ignore = rank >= width  # slots filled by finished or ignored candidates
        source = rows.gather(1, active).view(-1)  # (bsz * K,) rows of the previous buffers
        new_tokens = tokens.gather(1, active).view(-1)
        self.tokens = self.tokens[source]
        self.tokens[:, step + 1] = new_tokens
        self.cum = self.cum[source]
        self.cum[:, step] = scores.gather(1, active).view(-1)
        if self.nodes is not None:
            nodes = self.nodes[source]
            advanced = self.trie.advance(nodes, new_tokens)
            if self.prefix_len is not None:  # tokens of the forced prefix do not walk the trie
                advanced = torch.where((step >= self.prefix_len).repeat_interleave(self.k),
                                       advanced, nodes)
            self.nodes = advanced
        if step == 0:  # the decoder held one row per sentence: expand it to the beams
            self.stepper.reorder(torch.div(source, self.k, rounding_mode="floor"), False)
        else:
            self.stepper.reorder(source, same_sources)


def _restrict(lprobs: torch.Tensor, top_k: int | None, top_p: float | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities to sample from (..., V') and their token ids (None: all V, in order).

    Probabilities are not renormalised: the score of a draw is its log-prob under the model.
    """
    if top_p is not None:
        probs, ids = lprobs.exp().sort(dim=-1, descending=True)
        below = probs.cumsum(-1).lt(top_p)  # a prefix of each sorted row
        count = below.sum(-1, keepdim=True).clamp_(max=probs.size(-1) - 1)  # + the crossing one
        width = int(count.max()) + 1
        keep = torch.arange(width, device=probs.device) <= count
        return probs[..., :width].masked_fill(~keep, 0.0), ids[..., :width]
    if top_k is not None:
        values, ids = lprobs.topk(min(top_k, lprobs.size(-1)), dim=-1)
        return values.exp(), ids
    return lprobs.exp(), None
