"""Decoding for OFA: beam search, greedy, sampling, constraints and all-candidate scoring.

- ``generate(model, src_tokens, ...)``: what ``OFAModel.generate`` calls; reproduces the
  official ``SequenceGenerator`` (see ``search.py`` for the exact per-step recipe).
- ``Trie``: candidate answers as a constraint (VQA, SNLI-VE, classification).
- ``score_candidates``: per-sample log-likelihood of every candidate (VQA all-candidate).
"""

from ofa_lightning.generation.config import GenerationConfig, Hypothesis, SpecialTokens
from ofa_lightning.generation.constraints import Trie, apply_constraint_range, block_repeated_ngrams
from ofa_lightning.generation.decoding import ModelStepper, generate
from ofa_lightning.generation.scoring import score_candidates
from ofa_lightning.generation.search import Stepper, beam_search

__all__ = [
    "GenerationConfig",
    "Hypothesis",
    "ModelStepper",
    "SpecialTokens",
    "Stepper",
    "Trie",
    "apply_constraint_range",
    "beam_search",
    "block_repeated_ngrams",
    "generate",
    "score_candidates",
]
