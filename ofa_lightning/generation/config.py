"""Generation settings and results.

``GenerationConfig`` holds the knobs of the official ``SequenceGenerator`` (fairseq names in
the comments) so that a task's decoding recipe (``reference/ofa_spec.md`` §5.4) is one object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

# The four special ids every OFA vocabulary starts with. ``constraint_range`` never masks them,
# and ``gen_code`` bans all four until the last step.
BOS, PAD, EOS, UNK = 0, 1, 2, 3
NUM_SPECIALS = 4


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the search treats specially; ``pad`` follows the model's ``config.pad_id``."""

    bos: int = BOS
    pad: int = PAD
    eos: int = EOS
    unk: int = UNK


@dataclass
class GenerationConfig:
    """One decoding recipe. Defaults are fairseq's generation defaults.

    The length budget is ``max_len = max_len_a * src_len + max_len_b`` generated tokens (eos
    not counted), where ``src_len`` is the padded width of ``src_tokens`` (text only; image
    patches do not count), as in the official generator; it is capped by ``max_len`` and by
    what the decoder can position.
    """

    # --- search ------------------------------------------------------------------------------
    beam: int = 5  # beam width; the number of samples per input when sampling
    sampling: bool = False  # sample each step instead of beam search (--sampling)
    top_k: int | None = None  # sample from the k most likely tokens only (--sampling-topk)
    top_p: float | None = None  # sample from the smallest set with mass > p (--sampling-topp)

    # --- length ------------------------------------------------------------------------------
    max_len_a: float = 0.0
    max_len_b: int = 200
    max_len: int | None = None  # hard cap on generated tokens (--max-len); None: decoder limit
    min_len: int = 1  # eos is banned while fewer tokens than this have been generated

    # --- scoring -----------------------------------------------------------------------------
    lenpen: float = 1.0  # score = sum log p / len ** lenpen (len counts eos)
    normalize_scores: bool = True  # False: score = sum log p (--unnormalized, VQA beam)
    unkpen: float = 0.0  # subtracted from log p(unk)
    temperature: float = 1.0  # logits are divided by it before the softmax

    # --- constraints -------------------------------------------------------------------------
    no_repeat_ngram_size: int = 0  # 0 = off; n > 0 bans tokens that would repeat an n-gram
    constraint_range: tuple[int, int] | None = None  # allowed [lo, hi) besides ids 0-3
    gen_code: bool = False  # image-code decoding: code_masks on, ids 0-3 banned until max_len

    def __post_init__(self) -> None:
        if isinstance(self.constraint_range, str):  # the official "START,END" form
            parts = self.constraint_range.split(",")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise ValueError(f"GenerationConfig.constraint_range must be 'lo,hi' or (lo, hi), "
                                 f"got {self.constraint_range!r}")
            self.constraint_range = (int(parts[0]), int(parts[1]))
        elif self.constraint_range is not None:
            self.constraint_range = tuple(int(v) for v in self.constraint_range)  # type: ignore
        self._validate()

    def _validate(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ValueError(f"GenerationConfig.{field} must be {expected}, "
                             f"got {getattr(self, field)!r}")

        if not isinstance(self.beam, int) or self.beam < 1:
            fail("beam", "a positive integer")
        if self.max_len_a < 0:
            fail("max_len_a", ">= 0")
        if not isinstance(self.max_len_b, int) or self.max_len_b < 0:
            fail("max_len_b", "a non-negative integer")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 1):
            fail("max_len", "None or a positive integer")
        if not isinstance(self.min_len, int) or self.min_len < 0:
            fail("min_len", "a non-negative integer")
        if self.temperature <= 0:
            fail("temperature", "> 0")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            fail("no_repeat_ngram_size", "a non-negative integer (0 = off)")
        if self.unkpen != self.unkpen:
            fail("unkpen", "a number")
        if self.constraint_range is not None:
            if len(self.constraint_range) != 2:
                fail("constraint_range", "None, 'lo,hi' or a pair (lo, hi)")
            lo, hi = self.constraint_range
            if not NUM_SPECIALS <= lo < hi:
                fail("constraint_range", f"a range [lo, hi) with {NUM_SPECIALS} <= lo < hi "
                     "(ids 0-3 are always kept)")
        if self.top_k is not None:
            if not isinstance(self.top_k, int) or self.top_k < 1:
                fail("top_k", "None or a positive integer")
            if not self.sampling:
                fail("top_k", "None unless sampling=True")
        if self.top_p is not None:
            if not 0.0 < self.top_p <= 1.0:
                fail("top_p", "None or in (0, 1]")
            if not self.sampling:
                fail("top_p", "None unless sampling=True")
            if self.top_k is not None:
                fail("top_p", "None when top_k is set (the official sampler uses one of them)")

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed; an unknown field name is an error that lists them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown generation setting(s) {unknown}; settings are "
                             f"{sorted(known)}")
        return dataclasses.replace(self, **changes)

    def resolve_max_len(self, src_len: int, limit: int | None = None) -> int:
        """Generated tokens allowed (eos excluded) for a source of padded width ``src_len``."""
        max_len = int(self.max_len_a * src_len + self.max_len_b)
        for cap in (self.max_len, limit):
            if cap is not None:
                max_len = min(max_len, cap)
        if self.min_len > max_len:
            raise ValueError(
                f"GenerationConfig.min_len={self.min_len} exceeds the length budget {max_len} "
                f"(max_len_a={self.max_len_a} * src_len={src_len} + max_len_b={self.max_len_b}"
                f", capped by max_len={self.max_len} and the decoder limit {limit}); lower "
                "min_len or raise max_len_b")
        return max_len


@dataclass
class Hypothesis:
    """One finished output: the official generator's ``tokens``/``score``/``positional_scores``."""

    tokens: torch.Tensor  # (L,) long, no leading bos, ends with eos (prefix tokens included)
    score: float  # sum of positional_scores / L ** lenpen (or the plain sum if unnormalised)
    positional_scores: torch.Tensor  # (L,) float, log p of each token as searched

    def __len__(self) -> int:
        return self.tokens.numel()
