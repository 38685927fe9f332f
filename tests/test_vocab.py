"""UnifiedVocab: official OFA ids from the fixtures, trained vocabularies, persistence."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ofa_lightning.vocab import UnifiedVocab

# Read at collection time so that each case is its own test; without the fixtures the
# parametrised test is skipped like the others (see ``ofa_fixtures`` in conftest.py).
_CASES_FILE = Path(__file__).resolve().parents[2] / "shared/fixtures/ofa_reference/bpe_cases.json"
BPE_CASES = json.loads(_CASES_FILE.read_text(encoding="utf-8")) if _CASES_FILE.is_file() else []

CORPUS = [
    " a red circle left of a blue square",
    " two green triangles above a yellow circle",
    " what color is the circle?",
    " how many squares are there?",
    " which region does the text \" a red circle \" describe?",
] * 20


@pytest.fixture(scope="module")
def bpe_dir(ofa_fixtures: Path) -> Path:
    return ofa_fixtures / "bpe"


@pytest.fixture(scope="module")
def official(bpe_dir: Path) -> UnifiedVocab:
    return UnifiedVocab.from_bpe_dir(bpe_dir)


@pytest.fixture(scope="module")
def inputs(reference_inputs: dict) -> dict:
    return reference_inputs


@pytest.fixture(scope="module")
def trained() -> UnifiedVocab:
    return UnifiedVocab.train(CORPUS, vocab_size=300, num_codes=16, num_bins=10)


def _source(vocab: UnifiedVocab, text: str) -> list[int]:
    return [vocab.bos, *vocab.encode(text), vocab.eos]


def _copy_gpt2_files(bpe_dir: Path, target: Path) -> None:
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(bpe_dir / name, target / name)


def _unpad(row: torch.Tensor, pad: int = 1) -> list[int]:
    return [t for t in row.tolist() if t != pad]


# ---------------------------------------------------------------- official layout
def test_official_layout(official: UnifiedVocab) -> None:
    assert len(official) == 59457
    assert (official.bos, official.pad, official.eos, official.unk) == (0, 1, 2, 3)
    assert official.mask == 50264
    assert official.text_range == (4, 50264)
    assert official.code_range == (50265, 58457)
    assert official.bin_range == (58457, 59457)
    assert (official.num_codes, official.num_bins) == (8192, 1000)
    assert official.code_id(0) == 50265 and official.code_id(8191) == 58456
    assert official.bin_id(0) == 58457 and official.bin_id(999) == 59456


def test_official_symbols(official: UnifiedVocab) -> None:
    expected = {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>", 4: ".", 5: "Ġthe",
                50261: "madeupword0000", 50263: "madeupword0002", 50264: "<mask>",
                50265: "<code_0>", 58456: "<code_8191>", 58457: "<bin_0>", 59456: "<bin_999>"}
    for i, token in expected.items():
        assert official.id_to_token(i) == token
        assert official.token_to_id(token) == i


@pytest.mark.parametrize("case", BPE_CASES, ids=lambda c: repr(c["text"][:20]))
def test_bpe_cases_match_official_ids(official: UnifiedVocab, case: dict) -> None:
    assert official.encode(case["text"]) == case["dict_ids"]
    assert official.decode(case["dict_ids"]) == case["decoded"]


def test_caption_sources_and_targets_match_fixture(official: UnifiedVocab, inputs: dict) -> None:
    assert _source(official, inputs["src_texts"][0]) == _unpad(inputs["src_tokens"][0])
    for row, caption in enumerate(inputs["tgt_texts"]):
        tokens = official.encode(caption)
        assert [official.bos, *tokens] == _unpad(inputs["prev_output_tokens"][row])
        assert [*tokens, official.eos] == _unpad(inputs["target"][row])


def test_region_source_with_bins_matches_fixture(official: UnifiedVocab, inputs: dict) -> None:
    parts = inputs["src_texts_parts"][1]
    bins = [official.token_to_id(t) for t in parts["raw_tokens_no_bpe"].split()]
    source = [official.bos, *official.encode(parts["bpe_text"]), *bins, official.eos]
    assert bins == [official.bin_id(k) for k in (12, 345, 678, 901)]
    assert source == inputs["src_tokens"][1].tolist()


def test_grounding_and_image_gen_sources_match_fixture(official: UnifiedVocab,
                                                       inputs: dict) -> None:
    for row, text in enumerate(inputs["grounding_src_texts"]):
        assert _source(official, text) == _unpad(inputs["grounding_src_tokens"][row])
    assert _source(official, inputs["code_src_texts"][0]) == inputs["code_src_tokens"][0].tolist()
    codes = official.code_id(inputs["code_ids"][0])
    assert [official.bos, *codes.tolist()] == inputs["code_prev_output_tokens"][0].tolist()
    assert [*codes.tolist(), official.eos] == inputs["code_target"][0].tolist()


def test_bin_text_is_bpe_text_not_a_bin(official: UnifiedVocab) -> None:
    assert official.bin_id(12) not in official.encode("<bin_12>")
    assert official.decode(official.encode("<bin_12>")) == "<bin_12>"


# ---------------------------------------------------------------- decode
def test_decode_skips_structure_and_names_other_symbols(official: UnifiedVocab) -> None:
    ids = [0, *official.encode(" region:"), official.bin_id(3), official.bin_id(997),
           official.mask, official.unk, official.code_id(5), *official.encode(" done"), 2, 1, 1]
    assert official.decode(ids) == " region:<bin_3><bin_997><mask><unk><code_5> done"
    assert official.decode(torch.tensor(ids)) == official.decode(ids)


def test_decode_joins_multibyte_characters_across_tokens(official: UnifiedVocab) -> None:
    ids = official.encode(" 图片")
    assert len(ids) > 2  # the characters are split into byte pieces
    assert official.decode([0, *ids, 2]) == " 图片"


def test_decode_rejects_ids_outside_vocabulary_and_batches(official: UnifiedVocab) -> None:
    with pytest.raises(ValueError, match=r"59457 is outside the vocabulary \[0, 59457\)"):
        official.decode([0, 59457])
    with pytest.raises(ValueError, match=r"one sequence; got a tensor of shape \(2, 3\)"):
        official.decode(torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------- bins and codes
def test_bin_and_code_round_trips(official: UnifiedVocab) -> None:
    for k in (0, 1, 500, 999):
        assert official.bin_index(official.bin_id(k)) == k
        assert official.is_bin(official.bin_id(k)) and not official.is_code(official.bin_id(k))
    for k in (0, 4096, 8191):
        assert official.code_index(official.code_id(k)) == k
        assert official.is_code(official.code_id(k)) and not official.is_bin(official.code_id(k))
    assert not official.is_bin(official.mask) and not official.is_code(official.mask)


def test_tensor_arguments_are_elementwise(official: UnifiedVocab) -> None:
    bins = torch.tensor([[0, 12], [345, 999]])
    tokens = official.bin_id(bins)
    assert tokens.tolist() == [[58457, 58469], [58802, 59456]]
    assert torch.equal(official.bin_index(tokens), bins)
    mixed = torch.tensor([5, 50264, 50265, 58456, 58457, 59456])
    assert official.is_bin(mixed).tolist() == [False, False, False, False, True, True]
    assert official.is_code(mixed).tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize("call, message", [
    (lambda v: v.bin_id(1000), r"^1000 is not a valid bin index; valid: 0 <= k < 1000$"),
    (lambda v: v.bin_id(-1), r"^-1 is not a valid bin index; valid: 0 <= k < 1000$"),
    (lambda v: v.code_id(8192), r"^8192 is not a valid code index; valid: 0 <= k < 8192$"),
    (lambda v: v.bin_index(58456), r"58456 is not a valid bin token; valid: 58457 <= id < 59457"),
    (lambda v: v.code_index(50264), r"50264 is not a valid code token; valid: 50265 <= id < 58457"),
    (lambda v: v.bin_index(torch.tensor([58457, 5])), r"^5 is not a valid bin token"),
    (lambda v: v.bin_id(torch.tensor([1.0])), r"integer tensor"),
    (lambda v: v.bin_id(2.0), r"bin index must be an integer, got 2.0"),
    (lambda v: v.token_to_id("<bin_1000>"), r"1000 is not a valid bin index"),
    (lambda v: v.token_to_id("<nonsense>"), r"'<nonsense>' is not a token"),
])
def test_bad_arguments_name_value_and_range(official: UnifiedVocab, call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(official)


# ---------------------------------------------------------------- BPE directory handling
def test_missing_bpe_file_names_it_and_the_expected_three(bpe_dir: Path, tmp_path: Path) -> None:
    _copy_gpt2_files(bpe_dir, tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        UnifiedVocab.from_bpe_dir(tmp_path)
    message = str(info.value)
    assert "lacks dict.txt" in message
    assert "encoder.json, vocab.bpe, dict.txt" in message


def test_gpt2_id_missing_from_dict_maps_to_unk(bpe_dir: Path, tmp_path: Path) -> None:
    _copy_gpt2_files(bpe_dir, tmp_path)
    lines = (bpe_dir / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert lines[1].startswith("262 ")  # GPT-2 "Ġthe"
    (tmp_path / "dict.txt").write_text("\n".join(lines[:1] + lines[2:]) + "\n", encoding="utf-8")
    vocab = UnifiedVocab.from_bpe_dir(tmp_path)
    assert vocab.encode(" the.") == [vocab.unk, 4]
    assert len(vocab) == 59456 and vocab.mask == 50263


def test_malformed_dict_line_names_file_and_line(bpe_dir: Path, tmp_path: Path) -> None:
    _copy_gpt2_files(bpe_dir, tmp_path)
    (tmp_path / "dict.txt").write_text("13 100\n262\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dict.txt:2: expected '<symbol> <count>', got '262'"):
        UnifiedVocab.from_bpe_dir(tmp_path)


# ---------------------------------------------------------------- persistence
def test_official_state_round_trips_through_json_and_torch_save(official: UnifiedVocab) -> None:
    state = json.loads(json.dumps(official.to_state()))
    from_json = UnifiedVocab.from_state(state)
    buffer = io.BytesIO()
    torch.save({"vocab": official.to_state()}, buffer)  # as inside a Lightning checkpoint
    buffer.seek(0)
    from_ckpt = UnifiedVocab.from_state(torch.load(buffer, weights_only=True)["vocab"])
    for vocab in (from_json, from_ckpt):
        assert vocab == official
        assert len(vocab) == 59457 and vocab.bin_range == (58457, 59457)
        for case in BPE_CASES:
            assert vocab.encode(case["text"]) == case["dict_ids"]
            assert vocab.decode(case["dict_ids"]) == case["decoded"]


def test_save_and_load(official: UnifiedVocab, trained: UnifiedVocab, tmp_path: Path) -> None:
    for name, vocab in (("official", official), ("trained", trained)):
        path = vocab.save(tmp_path / name)
        assert path.is_file()
        loaded = UnifiedVocab.load(tmp_path / name)
        assert loaded == vocab
        assert loaded.encode(CORPUS[0]) == vocab.encode(CORPUS[0])


def test_pickles_for_dataloader_workers(trained: UnifiedVocab) -> None:
    copy = pickle.loads(pickle.dumps(trained))
    assert copy == trained and copy.encode(CORPUS[1]) == trained.encode(CORPUS[1])


def test_load_without_file_says_what_save_writes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="unified_vocab.json"):
        UnifiedVocab.load(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"format": "something else"}, "not a UnifiedVocab state"),
    ({"version": 99}, "version 99 is not supported"),
    ({"entries": None}, "lacks entries"),
])
def test_bad_state_is_rejected(trained: UnifiedVocab, change: dict, message: str) -> None:
    state = trained.to_state()
    state.update(change)
    state = {k: v for k, v in state.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        UnifiedVocab.from_state(state)


# ---------------------------------------------------------------- trained vocabularies
def test_trained_layout_follows_its_size(trained: UnifiedVocab) -> None:
    text_lo, text_hi = trained.text_range
    assert text_lo == 4 and 256 <= text_hi - text_lo <= 300
    assert trained.mask == text_hi
    assert trained.code_range == (trained.mask + 1, trained.mask + 17)
    assert trained.bin_range == (trained.mask + 17, trained.mask + 27)
    assert len(trained) == trained.bin_range[1]


def test_trained_round_trips_seen_and_unseen_text(trained: UnifiedVocab) -> None:
    for text in (CORPUS[0], CORPUS[4], " zebra café 图片\tand\nnewlines  ", ""):
        ids = trained.encode(text)
        assert all(trained.text_range[0] <= i < trained.text_range[1] for i in ids)
        assert trained.decode([trained.bos, *ids, trained.eos]) == text
    assert len(trained.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2  # merges were learnt


def test_training_is_deterministic(trained: UnifiedVocab) -> None:
    again = UnifiedVocab.train(iter(CORPUS), vocab_size=300, num_codes=16, num_bins=10)
    assert again == trained
    assert again.to_state() == trained.to_state()


def test_trained_state_round_trip(trained: UnifiedVocab) -> None:
    rebuilt = UnifiedVocab.from_state(json.loads(json.dumps(trained.to_state())))
    assert rebuilt == trained
    assert rebuilt.encode(CORPUS[2]) == trained.encode(CORPUS[2])
    assert (rebuilt.num_codes, rebuilt.num_bins, len(rebuilt)) == (16, 10, len(trained))


def test_vocabularies_of_different_kinds_differ(official: UnifiedVocab,
                                                trained: UnifiedVocab) -> None:
    assert official != trained


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 100}, r"vocab_size must be at least 256 .*got 100"),
    ({"min_frequency": 0}, r"min_frequency must be >= 1, got 0"),
    ({"num_bins": 1}, r"num_bins must be >= 2, got 1"),
    ({"num_codes": -1}, r"num_codes must be >= 0, got -1"),
])
def test_bad_training_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UnifiedVocab.train(CORPUS[:2], **kwargs)
