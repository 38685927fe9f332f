"""Generation: beam search, greedy, sampling, constraints and all-candidate scoring.

Two oracles. The official generations in the reference fixtures (exact tokens, scores within
1e-4), and, for settings the fixtures do not cover, a plain one-sentence-at-a-time
transcription of the official algorithm run against a small fake decoder whose logits
depend on the whole prefix and on the source, so that a wrong cache reorder, a mixed-up row
or a missed constraint changes the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ofa_lightning.generation import (
    GenerationConfig,
    Trie,
    block_repeated_ngrams,
    generate,
    score_candidates,
)
from ofa_lightning.generation.config import BOS, EOS, PAD, UNK

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ofa_reference"
NEG_INF = float("-inf")


# --- a small deterministic decoder ------------------------------------------------------------
class FakeEncoderOutput:
    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias  # (B, V)

    def index_select(self, order: torch.Tensor) -> "FakeEncoderOutput":
        return FakeEncoderOutput(self.bias.index_select(0, order))


class FakeCache:
    """Holds what a real KV cache would: the source term and a running summary of the prefix."""

    def __init__(self) -> None:
        self.length = 0
        self.bias: torch.Tensor | None = None  # (n, V)
        self.total: torch.Tensor | None = None  # (n,) sum of the prefix tokens so far

    def reorder(self, order: torch.Tensor, same_sources: bool = False) -> None:
        # like DecoderCache: source-side state moves only when rows change source
        if not same_sources:
            self.bias = self.bias.index_select(0, order)
        self.total = self.total.index_select(0, order)


class FakeModel:
    """logits(prefix) = f(last token) + g(sum of prefix mod 13) + h(source) [+ code term]."""

    def __init__(self, vocab: int = 48, seed: int = 0, eos_bias: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=vocab, pad_id=PAD, max_positions=64,
                                      code_grid_size=4)
        self.by_last = torch.randn(vocab, vocab, generator=g) * 2.0
        self.by_sum = torch.randn(13, vocab, generator=g)
        self.by_src = torch.randn(vocab, vocab, generator=g)
        self.code = torch.randn(vocab, generator=g) * 3.0
        self.by_last[:, EOS] += eos_bias
        self.decode_calls: list[tuple[tuple[int, ...], torch.Tensor | None]] = []

    def encode(self, src_tokens, patch_images=None, patch_masks=None) -> FakeEncoderOutput:
        bias = self.by_src[src_tokens].mean(1)  # (B, V)
        if patch_images is not None:
            bias = bias + patch_images.flatten(1).mean(1, keepdim=True)
        return FakeEncoderOutput(bias)

    def decode(self, prev, encoder_out, code_masks=None, cache=None) -> torch.Tensor:
        self.decode_calls.append((tuple(prev.shape), code_masks))
        start = cache.length if cache is not None else 0
        if cache is not None and start == 0:
            cache.bias, cache.total = encoder_out.bias, prev.new_zeros(prev.size(0))
        bias = cache.bias if cache is not None else encoder_out.bias
        base = cache.total if cache is not None else prev.new_zeros(prev.size(0))
        sums = base.unsqueeze(1) + prev[:, start:].cumsum(1)  # (n, Tn)
        logits = (self.by_last[prev[:, start:]] + self.by_sum[sums % 13]
                  + bias.unsqueeze(1))  # (n, Tn, V)
        if code_masks is not None:
            logits = logits + code_masks.float().view(-1, 1, 1) * self.code
        if cache is not None:
            cache.length, cache.total = prev.size(1), sums[:, -1]
        return logits


def fake_generate(model: FakeModel, src: torch.Tensor, **kw):
    return generate(model, src, cache_factory=FakeCache, **kw)


def sources(batch: int = 3, width: int = 6, seed: int = 1, vocab: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, width), generator=g)


# --- a one-sentence transcription of the official algorithm -----------------------------------
def _banned_ngrams(seq: list[int], n: int) -> set[int]:
    if n == 0 or len(seq) < n:
        return set()
    context = seq[len(seq) - n + 1:]
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i: i + n - 1] == context}


def _reference_lprobs(model, enc, seq, step, cfg, max_len, trie, prefix, batch_prefix_width):
    code_masks = torch.ones(1, dtype=torch.bool) if cfg.gen_code else None
    x = model.decode(torch.tensor([seq]), enc, code_masks)[0, -1].float() / cfg.temperature
    plen = sum(t != PAD for t in prefix)
    if trie is not None and step >= plen:
        allowed = torch.zeros_like(x, dtype=torch.bool)
        allowed[trie.next_tokens(seq[1 + plen:])] = True
        x = x.masked_fill(~allowed, NEG_INF)
    if cfg.constraint_range is not None:
        lo, hi = cfg.constraint_range
        x[4:lo] = NEG_INF
        x[hi:] = NEG_INF
    lp = torch.log_softmax(x, -1)
    if step < batch_prefix_width and step < max_len:
        if step < len(prefix) and prefix[step] != PAD:
            keep = lp[prefix[step]].clone()
            lp[:] = NEG_INF
            lp[prefix[step]] = keep
    elif step < cfg.min_len:
        lp[EOS] = NEG_INF
    lp[lp.isnan()] = NEG_INF
    lp[PAD] = NEG_INF
    lp[UNK] -= cfg.unkpen
    if cfg.gen_code and step < max_len:
        lp[:4] = NEG_INF
    if step >= max_len:
        eos = lp[EOS].clone()
        lp[:] = NEG_INF
        lp[EOS] = eos
    for token in _banned_ngrams(seq, cfg.no_repeat_ngram_size):
        lp[token] = NEG_INF
    return lp


def reference_search(model, src_row, cfg: GenerationConfig, max_len: int, trie=None,
                     prefix=(), batch_prefix_width: int = 0):
    """One sentence, full recompute, python lists: the official loop without the batching."""
    enc = model.encode(src_row.unsqueeze(0))
    k, vocab = cfg.beam, model.config.vocab_size
    beams = [([BOS], [])]  # (tokens with bos, cumulative scores)
    ignore = [False] * k
    finished = []
    for step in range(max_len + 1):
        rows = beams[:1] if step == 0 else beams
        lps = []
        for seq, cum in rows:
            lp = _reference_lprobs(model, enc, seq, step, cfg, max_len, trie, list(prefix),
                                   batch_prefix_width)
            lps.append(lp + cum[-1] if step > 0 else lp)
        flat = torch.stack(lps).view(-1)
        top_scores, top_index = flat.topk(min(2 * k, flat.numel() - 1))
        cands = [(float(s), int(i) % vocab, int(i) // vocab) for s, i in zip(top_scores, top_index)]
        eos = [tok == EOS and s != NEG_INF for s, tok, _ in cands]
        for c in range(k):
            if eos[c] and not ignore[c] and len(finished) < k:
                s, _, b = cands[c]
                seq, cum = rows[b]
                cum_all = torch.tensor(cum + [s])
                positional = torch.cat([cum_all[:1], cum_all[1:] - cum_all[:-1]])
                score = s / (step + 1) ** cfg.lenpen if cfg.normalize_scores else s
                finished.append((seq[1:] + [EOS], score, positional))
        if len(finished) == k or step == max_len:
            break
        blocked = [eos[c] or (c < k and ignore[c]) for c in range(len(cands))]
        order = sorted(range(len(cands)), key=lambda c: (blocked[c], c))[:k]
        ignore = [blocked[c] for c in order]
        beams = [(rows[cands[c][2]][0] + [cands[c][1]], rows[cands[c][2]][1] + [cands[c][0]])
                 for c in order]
    return sorted(finished, key=lambda h: h[1], reverse=True)


def assert_same_nbest(ours, reference, atol: float = 1e-5) -> None:
    assert [h.tokens.tolist() for h in ours] == [r[0] for r in reference]
    for hyp, (_, score, positional) in zip(ours, reference):
        assert hyp.score == pytest.approx(score, abs=atol)
        torch.testing.assert_close(hyp.positional_scores, positional, atol=atol, rtol=0)


# --- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("beam", 0), ("max_len_a", -1.0), ("max_len_b", -2), ("min_len", -1), ("temperature", 0.0),
    ("no_repeat_ngram_size", -1), ("constraint_range", (2, 10)), ("constraint_range", (9, 9)),
    ("constraint_range", "5;9"), ("top_k", 5), ("top_p", 0.9), ("max_len", 0),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**{field: value})


def test_config_parses_official_range_and_rejects_unknown_settings():
    assert GenerationConfig(constraint_range="58457,59457").constraint_range == (58457, 59457)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(sampling=True, top_k=5, top_p=0.5)
    with pytest.raises(ValueError, match="unknown generation setting.*beams"):
        GenerationConfig().replace(beams=3)


def test_min_len_above_length_budget_is_refused():
    with pytest.raises(ValueError, match="min_len=5 exceeds the length budget 4"):
        fake_generate(FakeModel(), sources(), min_len=5, max_len_b=4)


def test_length_budget_uses_padded_source_width():
    cfg = GenerationConfig(max_len_a=0.5, max_len_b=2)
    assert cfg.resolve_max_len(src_len=10) == 7
    assert cfg.resolve_max_len(src_len=10, limit=5) == 5
    assert cfg.replace(max_len=3).resolve_max_len(src_len=10) == 3


# --- constraints ------------------------------------------------------------------------------
def test_trie_vectorised_lookups_match_walking_the_tree():
    answers = [[10, 11], [10, 12, 13], [14], [10, 11, 15]]
    trie = Trie(answers)
    assert trie.next_tokens([]) == [10, 14]
    assert trie.next_tokens([10, 11]) == [EOS, 15]
    assert trie.next_tokens([10, 11, EOS]) == []
    assert trie.next_tokens([99]) == [EOS]  # off the trie: only eos, as in the official Trie
    prefixes = [[], [10], [10, 11], [10, 12], [14], [14, EOS], [7], [10, 12, 13], [10, 3]]
    for prefix in prefixes:
        node = trie.walk(torch.tensor([prefix], dtype=torch.long).view(1, -1))[0, -1]
        mask = trie.allowed_mask(node.view(1), 20)[0]
        assert mask.nonzero().view(-1).tolist() == trie.next_tokens(prefix), prefix


def test_trie_without_candidates_is_refused():
    with pytest.raises(ValueError, match="at least one candidate"):
        Trie([])


def test_block_repeated_ngrams_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        for length in range(1, 12):
            seq = torch.randint(0, 4, (6, length), generator=g)
            lprobs = torch.zeros(6, 6)
            block_repeated_ngrams(lprobs, seq, n, pad=5)
            for row in range(6):
                banned = _banned_ngrams(seq[row].tolist(), n)
                assert set(lprobs[row, :5].eq(NEG_INF).nonzero().view(-1).tolist()) == banned


# --- the search against the transcription -----------------------------------------------------
SETTINGS = [
    dict(beam=5, max_len_b=8, min_len=1, no_repeat_ngram_size=3),
    dict(beam=1, max_len_b=8, min_len=1),
    dict(beam=3, max_len_b=6, min_len=4, lenpen=0.6, unkpen=0.5, temperature=0.7),
    dict(beam=4, max_len_a=0.5, max_len_b=2, no_repeat_ngram_size=1, normalize_scores=False),
    dict(beam=5, max_len_b=5, min_len=2, constraint_range=(20, 30), no_repeat_ngram_size=2),
    dict(beam=2, max_len_b=7, min_len=7, gen_code=True, constraint_range=(30, 48)),
]


@pytest.mark.parametrize("eos_bias", [0.0, 4.0])  # 4.0: sentences finish early, at different steps
@pytest.mark.parametrize("settings", SETTINGS)
def test_batched_search_matches_one_sentence_transcription(settings, eos_bias):
    model, src = FakeModel(eos_bias=eos_bias), sources(batch=4)
    cfg = GenerationConfig(**settings)
    ours = fake_generate(model, src, config=cfg)
    max_len = cfg.resolve_max_len(src.size(1))
    for i in range(src.size(0)):
        assert_same_nbest(ours[i], reference_search(model, src[i], cfg, max_len))


def test_cache_and_full_recompute_agree():
    model, src = FakeModel(eos_bias=2.0), sources(batch=5)
    for settings in SETTINGS:
        cached = fake_generate(model, src, **settings)
        full = generate(model, src, use_cache=False, **settings)
        for a, b in zip(cached, full):
            assert [h.tokens.tolist() for h in a] == [h.tokens.tolist() for h in b]
            assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-6)


def test_decoder_sees_one_new_position_per_step_and_one_row_per_input_at_step_0():
    model, src = FakeModel(), sources(batch=3)
    fake_generate(model, src, beam=4, max_len_b=5)
    shapes = [shape for shape, _ in model.decode_calls]
    assert shapes[0] == (3, 1)
    assert all(rows == 12 and t == i + 2 for i, (rows, t) in enumerate(shapes[1:]))


def test_greedy_is_the_argmax_path():
    model, src = FakeModel(), sources(batch=3)
    hyps = fake_generate(model, src, beam=1, max_len_b=6, min_len=1)
    enc = model.encode(src)
    for i in range(src.size(0)):
        seq, total = [BOS], []
        for step in range(7):
            lp = torch.log_softmax(model.decode(torch.tensor([seq]), enc.index_select(
                torch.tensor([i])))[0, -1], -1)
            lp[PAD] = NEG_INF
            if step == 0:
                lp[EOS] = NEG_INF
            if step == 6:
                lp[torch.arange(lp.numel()) != EOS] = NEG_INF
            token = int(lp.argmax())
            seq.append(token)
            total.append(float(lp[token]))
            if token == EOS:
                break
        assert hyps[i][0].tokens.tolist() == seq[1:]
        assert hyps[i][0].score == pytest.approx(sum(total) / len(total), abs=1e-5)


def test_batch_results_do_not_depend_on_batch_companions():
    model, src = FakeModel(eos_bias=3.0), sources(batch=4)
    batched = fake_generate(model, src, beam=3, max_len_b=6, no_repeat_ngram_size=2)
    for i in range(src.size(0)):
        alone = fake_generate(model, src[i: i + 1], beam=3, max_len_b=6, no_repeat_ngram_size=2)
        assert [h.tokens.tolist() for h in alone[0]] == [h.tokens.tolist() for h in batched[i]]


def test_hypotheses_respect_length_limits():
    model, src = FakeModel(eos_bias=3.0), sources(batch=4)
    for min_len, max_len_b in [(0, 3), (2, 5), (5, 5)]:
        for sample in fake_generate(model, src, beam=3, min_len=min_len, max_len_b=max_len_b):
            for hyp in sample:
                assert min_len + 1 <= len(hyp) <= max_len_b + 1
                assert hyp.tokens[-1] == EOS and EOS not in hyp.tokens[:-1].tolist()


def test_constraint_range_keeps_tokens_in_range():
    model, src = FakeModel(), sources(batch=3)
    for sample in fake_generate(model, src, beam=5, max_len_b=6, constraint_range=(25, 35)):
        for hyp in sample:
            assert all(25 <= t < 35 or t in (BOS, UNK) for t in hyp.tokens[:-1].tolist())


def test_no_repeat_ngram_really_blocks():
    model, src = FakeModel(), sources(batch=3)
    plain = fake_generate(model, src, beam=3, max_len_b=12)
    assert any(_has_repeat([BOS] + h.tokens.tolist(), 2) for s in plain for h in s)  # needed
    for sample in fake_generate(model, src, beam=3, max_len_b=12, no_repeat_ngram_size=2):
        for hyp in sample:
            assert not _has_repeat([BOS] + hyp.tokens.tolist(), 2)


def _has_repeat(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i: i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def test_gen_code_feeds_code_masks_and_bans_specials_until_the_end():
    model, src = FakeModel(eos_bias=5.0), sources(batch=2)
    hyps = fake_generate(model, src, beam=1, min_len=0, max_len_b=6, gen_code=True,
                         constraint_range=(30, 48))
    assert all(masks is not None and masks.all() for _, masks in model.decode_calls)
    for sample in hyps:
        assert len(sample[0]) == 7 and all(30 <= t < 48 for t in sample[0].tokens[:-1].tolist())


# --- tries and prefixes -----------------------------------------------------------------------
ANSWERS = [[10, 11], [10, 12, 13], [14], [10, 11, 15], [20, 21, 22, 23]]


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_trie_keeps_hypotheses_inside_the_candidates(beam):
    model, src, trie = FakeModel(), sources(batch=3), Trie(ANSWERS)
    hyps = fake_generate(model, src, trie=trie, beam=beam, max_len_b=6, min_len=1)
    cfg = GenerationConfig(beam=beam, max_len_b=6, min_len=1)
    for i, sample in enumerate(hyps):
        assert sample and all(h.tokens[:-1].tolist() in ANSWERS for h in sample)
        assert_same_nbest(sample, reference_search(model, src[i], cfg, 6, trie=trie))


def test_prefix_is_forced_and_the_trie_applies_after_it():
    model, src, trie = FakeModel(), sources(batch=3), Trie(ANSWERS)
    prefix = [[30, 31, 32], [33], [34, 35]]
    cfg = GenerationConfig(beam=3, max_len_b=10, normalize_scores=False)
    hyps = fake_generate(model, src, config=cfg, trie=trie, prefix_tokens=prefix)
    for i, sample in enumerate(hyps):
        p = prefix[i]
        for hyp in sample:
            assert hyp.tokens[: len(p)].tolist() == p and hyp.tokens[len(p): -1].tolist() in ANSWERS
            assert hyp.score == pytest.approx(float(hyp.positional_scores.sum()), abs=1e-5)
        padded = p + [PAD] * (3 - len(p))
        assert_same_nbest(sample, reference_search(model, src[i], cfg, 10, trie=trie,
                                                   prefix=padded, batch_prefix_width=3))


def test_prefix_is_forced_and_the_constraint_range_applies_after_it():
    """A text prompt before bins (grounding in the prev_output layout): the prefix lies
    outside the range, no token after it does (ids 0-3 stay allowed, as officially)."""
    model, src = FakeModel(eos_bias=-5.0), sources(batch=3)
    prefix = [[5, 6, 7], [8], [9, 10]]
    hyps = fake_generate(model, src, beam=3, max_len_b=7, constraint_range=(30, 48),
                         prefix_tokens=prefix)
    for p, sample in zip(prefix, hyps):
        assert sample
        for hyp in sample:
            tokens = hyp.tokens.tolist()
            assert tokens[: len(p)] == p and tokens[-1] == EOS
            assert len(tokens) > len(p) + 1 and not any(4 <= t < 30 for t in tokens[len(p):])


# --- sampling ---------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_generator():
    model, src = FakeModel(), sources(batch=2)

    def run(seed: int, **kw):
        g = torch.Generator().manual_seed(seed)
        out = fake_generate(model, src, sampling=True, beam=6, max_len_b=8, generator=g, **kw)
        return [[h.tokens.tolist() for h in s] for s in out]

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(3, top_k=3) == run(3, top_k=3)
    assert all(len(s) == 6 for s in run(0))


@pytest.mark.parametrize("restriction", [dict(top_k=2), dict(top_p=0.5)])
def test_samples_come_from_the_restricted_set(restriction):
    model, src = FakeModel(), sources(batch=2)
    hyps = fake_generate(model, src, sampling=True, beam=8, max_len_b=6, min_len=6,
                         generator=torch.Generator().manual_seed(0), **restriction)
    cfg = GenerationConfig(max_len_b=6, min_len=6)
    enc = model.encode(src)
    for i, sample in enumerate(hyps):
        for hyp in sample:
            seq = [BOS]
            for step, token in enumerate(hyp.tokens.tolist()):
                lp = _reference_lprobs(model, enc.index_select(torch.tensor([i])), seq, step, cfg,
                                       6, None, [], 0)
                ranked = lp.argsort(descending=True).tolist()
                if "top_k" in restriction:
                    assert token in ranked[: restriction["top_k"]]
                else:
                    probs = lp.exp()[ranked]
                    before = float(probs[: ranked.index(token)].sum())
                    assert before < restriction["top_p"]
                assert float(hyp.positional_scores[step]) == pytest.approx(float(lp[token]),
                                                                            abs=1e-5)
                seq.append(token)


# --- all-candidate scoring --------------------------------------------------------------------
def _teacher_forced(model, src, i, prefix, answer, trie):
    enc = model.encode(src).index_select(torch.tensor([i]))
    prev = torch.tensor([[BOS] + prefix + answer])
    logits = model.decode(prev, enc)[0]  # (T, V)
    total = 0.0
    for j, target in enumerate(answer + [EOS]):
        x = logits[len(prefix) + j].clone()
        if trie is not None:
            allowed = torch.zeros_like(x, dtype=torch.bool)
            allowed[trie.next_tokens(answer[:j])] = True
            x[~allowed] = NEG_INF
        total += float(torch.log_softmax(x, -1)[target])
    return total


@pytest.mark.parametrize("constrain", [True, False])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_candidate_scores_equal_teacher_forced_log_likelihoods(constrain, with_prefix):
    model, src = FakeModel(), sources(batch=3)
    prefixes = [[30, 31, 32], [33], [34, 35]] if with_prefix else None
    scores = score_candidates(model, src, ANSWERS, constrain=constrain, prefix_tokens=prefixes,
                              chunk_size=2)
    trie = Trie(ANSWERS) if constrain else None
    assert scores.shape == (3, len(ANSWERS))
    for i in range(3):
        prefix = prefixes[i] if prefixes else []
        expected = [_teacher_forced(model, src, i, prefix, a, trie) for a in ANSWERS]
        torch.testing.assert_close(scores[i], torch.tensor(expected), atol=1e-5, rtol=0)


def test_candidate_scores_do_not_depend_on_chunking():
    model, src = FakeModel(), sources(batch=2)
    one = score_candidates(model, src, ANSWERS, chunk_size=1)
    torch.testing.assert_close(one, score_candidates(model, src, ANSWERS, chunk_size=20))


# --- parity with the official generator -------------------------------------------------------
@pytest.fixture(scope="module")
def official():
    """The fixture model in this implementation, with the official inputs and outputs."""
    pytest.importorskip("ofa_lightning.model")
    from ofa_lightning.config import OFAConfig
    from ofa_lightning.model import OFAModel

    args = json.loads((FIXTURES / "config.json").read_text())["all_args"]
    model = OFAModel(OFAConfig.from_official_args(args))
    state = torch.load(FIXTURES / "ofa_tiny_random.pt", weights_only=True)
    derived = ("version", "rp_bucket", "image_position_idx")
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith(derived)})
    model.eval()
    inputs = torch.load(FIXTURES / "inputs.pt", weights_only=True)
    outputs = torch.load(FIXTURES / "outputs.pt", weights_only=True)
    return model, inputs, outputs


def _official_case(name: str, inputs) -> dict:
    if name == "generate_greedy_codes":
        return dict(src_tokens=inputs["code_src_tokens"])  # text-to-image: no image at all
    src = inputs["grounding_src_tokens"] if name == "generate_beam5_grounding" else inputs[
        "src_tokens"]
    return dict(src_tokens=src, patch_images=inputs["patch_images"],
                patch_masks=inputs["patch_masks"])


@pytest.mark.parametrize("name", ["generate_beam5", "generate_greedy", "generate_beam5_grounding",
                                  "generate_greedy_codes"])
def test_official_generations_are_reproduced(official, name):
    model, inputs, outputs = official
    settings = dict(outputs[name]["settings"])
    hyps = generate(model, **_official_case(name, inputs), **settings)
    for ours, theirs in zip(hyps, outputs[name]["hypos"], strict=True):
        assert [h.tokens.tolist() for h in ours] == [t["tokens"].tolist() for t in theirs]
        torch.testing.assert_close(torch.tensor([h.score for h in ours]),
                                   torch.stack([t["score"] for t in theirs]), atol=1e-4, rtol=1e-4)
        for h, t in zip(ours, theirs):
            torch.testing.assert_close(h.positional_scores, t["positional_scores"], atol=1e-4,
                                       rtol=1e-4)


def test_official_grounding_boxes(official):
    model, inputs, outputs = official
    case = outputs["generate_beam5_grounding"]
    hyps = generate(model, **_official_case("generate_beam5_grounding", inputs), **case["settings"])
    bins = torch.stack([sample[0].tokens[:-1] for sample in hyps]) - 58457
    assert torch.equal(bins, case["top_boxes_bins"])


def test_official_model_cache_matches_recompute(official):
    model, inputs, outputs = official
    settings = dict(outputs["generate_beam5"]["settings"])
    case = _official_case("generate_beam5", inputs)
    cached, full = generate(model, **case, **settings), generate(model, **case, use_cache=False,
                                                                 **settings)
    for a, b in zip(cached, full):
        assert [h.tokens.tolist() for h in a] == [h.tokens.tolist() for h in b]
        for x, y in zip(a, b):
            torch.testing.assert_close(x.positional_scores, y.positional_scores, atol=1e-4,
                                       rtol=1e-4)


def test_official_model_candidate_scores_match_forward(official):
    model, inputs, _ = official
    case = _official_case("generate_beam5", inputs)
    answers = [[10, 11], [10, 12, 13], [14], [58457, 58458]]
    prefixes = [[99, 473], [5]]
    scores = score_candidates(model, **case, candidates=answers, prefix_tokens=prefixes)
    trie = Trie(answers)
    for i in range(2):
        for j, answer in enumerate(answers):
            prev = torch.tensor([[BOS] + prefixes[i] + answer])
            with torch.no_grad():
                logits = model(case["src_tokens"][i: i + 1], case["patch_images"][i: i + 1],
                               case["patch_masks"][i: i + 1], prev_output_tokens=prev).logits[0]
            expected = 0.0
            for k, target in enumerate(answer + [EOS]):
                x = logits[len(prefixes[i]) + k].clone()
                allowed = torch.zeros_like(x, dtype=torch.bool)
                allowed[trie.next_tokens(answer[:k])] = True
                expected += float(torch.log_softmax(x.masked_fill(~allowed, NEG_INF), -1)[target])
            assert float(scores[i, j]) == pytest.approx(expected, abs=1e-4)


def test_official_model_text_to_image_sampling_recipe(official):
    """Top-k 256 sampling of image codes (the recipe, shortened): codes only, reproducible."""
    model, inputs, _ = official
    settings = dict(sampling=True, top_k=256, beam=4, min_len=20, max_len_b=20, gen_code=True,
                    constraint_range="50265,58457")

    def run(seed: int):
        g = torch.Generator().manual_seed(seed)
        return generate(model, inputs["code_src_tokens"], generator=g, **settings)[0]

    first, again = run(42), run(42)
    assert len(first) == 4
    assert [h.tokens.tolist() for h in first] == [h.tokens.tolist() for h in again]
    for hyp in first:
        assert len(hyp) == 21 and hyp.tokens[-1] == EOS
        assert hyp.tokens[:-1].ge(50265).all() and hyp.tokens[:-1].lt(58457).all()
