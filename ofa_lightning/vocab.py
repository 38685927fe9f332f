"""The unified OFA vocabulary: the one place that knows which id means what.

Every token the model reads or writes lives in one id space, laid out like this
(the numbers are those of OFA's own ``utils/BPE`` files)::

    0 <s> (bos) | 1 <pad> | 2 </s> (eos) | 3 <unk>       4 specials
    4 ... 50263                                          text entries (dict.txt order)
    50264 <mask>                                         1
    50265 ... 58456  <code_0> ... <code_8191>            num_codes VQGAN image codes
    58457 ... 59456  <bin_0>  ... <bin_999>              num_bins location bins
    total 59457

Text takes two steps, as in fairseq: a byte-level BPE turns text into BPE ids, then each
id, written as a decimal string, is looked up in the table of text entries (``dict.txt``,
entry ``n`` gets id ``4 + n``). Keeping both steps, instead of folding them into one
table, is what makes the official files give the official ids, so released checkpoints
load unchanged. A vocabulary trained from data uses the same two steps with an identity
table, so the rest of the code never needs to know which kind it has.

Call sites ask this class (``vocab.bin_id(k)``, ``vocab.is_code(i)``, ``vocab.bin_range``)
and never add offsets themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["UnifiedVocab", "BPE_FILES"]

SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_SYMBOL = "<mask>"
NUM_SPECIALS = len(SPECIAL_SYMBOLS)

# The three files of OFA's ``utils/BPE``: GPT-2's vocabulary and merges, then fairseq's table.
BPE_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
STATE_FORMAT = "ofa_lightning.UnifiedVocab"
STATE_VERSION = 1
SAVE_FILENAME = "unified_vocab.json"
# An id or index, or a tensor of them (answered elementwise).
Index = int | torch.Tensor
# GPT-2's byte alphabet: a trained BPE smaller than this could not spell every byte.
_BYTE_ALPHABET_SIZE = 256


class UnifiedVocab:
    """Text BPE entries, ``<mask>``, image codes and location bins in one id space.

    Build it with :meth:`from_bpe_dir` (OFA's files, official ids), :meth:`train` (data
    without BPE files) or :meth:`from_state` / :meth:`load` (a checkpoint or a saved run).
    The constructor is the low-level path that all of them share.

    Args:
        tokenizer: a byte-level BPE ``tokenizers.Tokenizer`` mapping text to BPE ids.
        entries: the text entries in id order; entry ``n`` gets id ``4 + n``. An entry that
            is a decimal number names a BPE id of ``tokenizer``; any other string (such as
            fairseq's ``madeupword0000``) is a placeholder that no text encodes to.
        num_codes: number of ``<code_i>`` image-code tokens (VQGAN codebook size).
        num_bins: number of ``<bin_i>`` location tokens.
    """

    def __init__(self, tokenizer: Tokenizer, entries: Sequence[str], *, num_codes: int = 8192,
                 num_bins: int = 1000) -> None:
        _check_sizes(num_codes, num_bins)
        self._tokenizer = tokenizer
        self._entries = list(entries)
        self._num_codes = num_codes
        self._num_bins = num_bins
        # BPE id -> unified id; BPE ids with no entry fall back to <unk>, as fairseq does.
        self._bpe_to_id = _bpe_lookup(self._entries, tokenizer.get_vocab_size())
        # unified text id - 4 -> BPE id, or None for a placeholder entry.
        self._entry_bpe_ids = _entry_bpe_ids(self._entries, tokenizer.get_vocab_size())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bpe_dir(cls, directory: str | Path, num_codes: int = 8192,
                     num_bins: int = 1000) -> "UnifiedVocab":
        """Builds the vocabulary from OFA's ``encoder.json``, ``vocab.bpe`` and ``dict.txt``.

        With OFA's own files this gives exactly the official 59,457 ids.
        """
        directory = Path(directory)
        missing = [name for name in BPE_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} lacks {', '.join(missing)}; a BPE directory must hold "
                f"{', '.join(BPE_FILES)} (GPT-2 vocabulary, GPT-2 merges, fairseq dictionary)")
        tokenizer = _byte_level_tokenizer(
            models.BPE.from_file(str(directory / "encoder.json"), str(directory / "vocab.bpe")))
        entries = _read_dict_txt(directory / "dict.txt")
        return cls(tokenizer, entries, num_codes=num_codes, num_bins=num_bins)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, num_codes: int = 8192,
              num_bins: int = 1000, min_frequency: int = 2) -> "UnifiedVocab":
        """Trains a byte-level BPE on ``texts`` for data that comes without BPE files.

        ``vocab_size`` bounds the number of text entries (the BPE vocabulary, at least the
        256 byte symbols); the unified vocabulary adds the specials, ``<mask>``, codes and
        bins on top. Training stops earlier when no pair occurs ``min_frequency`` times.
        The pre-tokenisation is GPT-2's, so prompts behave as with the official files
        (a leading space belongs to the following word).
        """
        if vocab_size < _BYTE_ALPHABET_SIZE:
            raise ValueError(f"UnifiedVocab.train: vocab_size must be at least "
                             f"{_BYTE_ALPHABET_SIZE} (one entry per byte), got {vocab_size}")
        if min_frequency < 1:
            raise ValueError(f"UnifiedVocab.train: min_frequency must be >= 1, got {min_frequency}")
        tokenizer = _byte_level_tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tokenizer.train_from_iterator(texts, trainer)
        entries = [str(i) for i in range(tokenizer.get_vocab_size())]
        return cls(tokenizer, entries, num_codes=num_codes, num_bins=num_bins)

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """A JSON-serialisable, self-contained description (BPE model included).

        It goes into every checkpoint so that ``predict`` can rebuild the exact
        vocabulary from the checkpoint alone, without the files it was built from.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "num_codes": self._num_codes,
            "num_bins": self._num_bins,
            "entries": list(self._entries),
            # The tokenizers library's own JSON, kept as one string: a checkpoint loads it
            # far faster than 100k nested lists (torch.load with weights_only=True).
            "tokenizer": self._tokenizer.to_str(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "UnifiedVocab":
        """Rebuilds the vocabulary written by :meth:`to_state`."""
        _check_state(state)
        tokenizer = Tokenizer.from_str(state["tokenizer"])
        return cls(tokenizer, state["entries"], num_codes=state["num_codes"],
                   num_bins=state["num_bins"])

    def save(self, directory: str | Path) -> Path:
        """Writes :meth:`to_state` to ``directory/unified_vocab.json`` and returns the path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SAVE_FILENAME
        path.write_text(json.dumps(self.to_state(), ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "UnifiedVocab":
        """Reads a vocabulary written by :meth:`save`."""
        path = Path(directory) / SAVE_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; UnifiedVocab.save(dir) writes "
                                    f"{SAVE_FILENAME} into dir")
        return cls.from_state(json.loads(path.read_text(encoding="utf-8")))

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """BPE-encodes plain text, without bos/eos.

        Strings such as ``"<bin_12>"`` are text here, as they are for the official BPE;
        build location and code tokens with :meth:`bin_id` / :meth:`code_id`.
        """
        bpe_ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self._bpe_to_id[i] for i in bpe_ids]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Turns ids back into text, for predictions and logs.

        bos, pad and eos are structure, not content, and are skipped. ``<unk>``, ``<mask>``,
        codes and bins are written as their symbols (``<bin_12>``) right where they occur,
        with no added spaces, as the official decoder does.
        """
        if isinstance(ids, torch.Tensor):
            if ids.ndim > 1:
                raise ValueError(f"decode takes one sequence; got a tensor of shape "
                                 f"{tuple(ids.shape)} (decode each row)")
            ids = ids.tolist()
        pieces: list[str] = []
        run: list[int] = []  # consecutive BPE ids, decoded together so multi-byte chars survive
        for i in ids:
            bpe_id = self._text_bpe_id(int(i))
            if bpe_id is not None:
                run.append(bpe_id)
                continue
            pieces.append(self._decode_run(run))
            run = []
            if int(i) not in (self.bos, self.pad, self.eos):
                pieces.append(self.id_to_token(int(i)))
        pieces.append(self._decode_run(run))
        return "".join(pieces)

    def id_to_token(self, i: int) -> str:
        """The symbol of one id: a BPE piece such as ``"Ġthe"``, or ``<s>``, ``<bin_3>``, ..."""
        self._check_id(i)
        if i < NUM_SPECIALS:
            return SPECIAL_SYMBOLS[i]
        lo, hi = self.text_range
        if i < hi:
            bpe_id = self._entry_bpe_ids[i - lo]
            return self._entries[i - lo] if bpe_id is None else self._tokenizer.id_to_token(bpe_id)
        if i == self.mask:
            return MASK_SYMBOL
        if self.is_code(i):
            return f"<code_{self.code_index(i)}>"
        return f"<bin_{self.bin_index(i)}>"

    def token_to_id(self, token: str) -> int:
        """The id of one symbol, the inverse of :meth:`id_to_token`.

        This is the path for symbols that must not go through BPE (fairseq's
        ``use_bpe=False``): ``"<bin_12>"``, ``"<code_7>"``, ``"<mask>"``, ``"</s>"``.
        """
        if token in SPECIAL_SYMBOLS:
            return SPECIAL_SYMBOLS.index(token)
        if token == MASK_SYMBOL:
            return self.mask
        for prefix, make in (("<bin_", self.bin_id), ("<code_", self.code_id)):
            number = token[len(prefix):-1]
            if token.startswith(prefix) and token.endswith(">") and _is_decimal(number):
                return make(int(number))
        bpe_id = self._tokenizer.token_to_id(token)
        if bpe_id is not None and self._bpe_to_id[bpe_id] != self.unk:
            return self._bpe_to_id[bpe_id]
        if token in self._entries:  # a placeholder entry such as madeupword0000
            return NUM_SPECIALS + self._entries.index(token)
        raise ValueError(f"{token!r} is not a token of this vocabulary")

    # ------------------------------------------------------------------ layout
    def __len__(self) -> int:
        return self.bin_range[1]

    def __eq__(self, other: object) -> bool:
        """Same ids for the same text: same layout, same entries, same BPE model."""
        if not isinstance(other, UnifiedVocab):
            return NotImplemented
        return (self._num_codes, self._num_bins, self._entries) == (
            other._num_codes, other._num_bins, other._entries) and (
            self._tokenizer.to_str() == other._tokenizer.to_str())

    def __repr__(self) -> str:
        return (f"UnifiedVocab(size={len(self)}, text_entries={len(self._entries)}, "
                f"mask={self.mask}, codes={self.code_range}, bins={self.bin_range})")

    @property
    def bos(self) -> int:
        return 0

    @property
    def pad(self) -> int:
        return 1

    @property
    def eos(self) -> int:
        return 2

    @property
    def unk(self) -> int:
        return 3

    @property
    def mask(self) -> int:
        return NUM_SPECIALS + len(self._entries)

    @property
    def num_codes(self) -> int:
        return self._num_codes

    @property
    def num_bins(self) -> int:
        return self._num_bins

    @property
    def text_range(self) -> tuple[int, int]:
        """Half-open id range of the text entries."""
        return NUM_SPECIALS, self.mask

    @property
    def code_range(self) -> tuple[int, int]:
        """Half-open id range of ``<code_0>`` ... ``<code_{num_codes-1}>``."""
        return self.mask + 1, self.mask + 1 + self._num_codes

    @property
    def bin_range(self) -> tuple[int, int]:
        """Half-open id range of ``<bin_0>`` ... ``<bin_{num_bins-1}>``."""
        lo = self.code_range[1]
        return lo, lo + self._num_bins

    def code_id(self, k: Index) -> Index:
        """The id of ``<code_k>``; elementwise for a tensor."""
        return _check_index("code index", k, self._num_codes) + self.code_range[0]

    def bin_id(self, k: Index) -> Index:
        """The id of ``<bin_k>``; elementwise for a tensor."""
        return _check_index("bin index", k, self._num_bins) + self.bin_range[0]

    def is_code(self, i: Index) -> bool | torch.Tensor:
        """Whether ``i`` is a code token; elementwise for a tensor."""
        return _in_range(i, self.code_range)

    def is_bin(self, i: Index) -> bool | torch.Tensor:
        """Whether ``i`` is a bin token; elementwise for a tensor."""
        return _in_range(i, self.bin_range)

    def code_index(self, token: Index) -> Index:
        """``k`` for the id of ``<code_k>``; elementwise for a tensor."""
        return _range_index("code token", token, self.code_range)

    def bin_index(self, token: Index) -> Index:
        """``k`` for the id of ``<bin_k>``; elementwise for a tensor."""
        return _range_index("bin token", token, self.bin_range)

    # ------------------------------------------------------------------ internals
    def _check_id(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self)})")

    def _text_bpe_id(self, i: int) -> int | None:
        self._check_id(i)
        lo, hi = self.text_range
        return self._entry_bpe_ids[i - lo] if lo <= i < hi else None

    def _decode_run(self, bpe_ids: list[int]) -> str:
        return self._tokenizer.decode(bpe_ids, skip_special_tokens=False) if bpe_ids else ""


# ---------------------------------------------------------------------- helpers
def _byte_level_tokenizer(model: models.BPE) -> Tokenizer:
    """GPT-2's setup: byte-level pieces, GPT-2's split regex, no prefix space added."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _read_dict_txt(path: Path) -> list[str]:
    """The symbols of a fairseq dictionary file, one ``<symbol> <count>`` per line."""
    entries: list[str] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        symbol, _, count = line.rstrip().rpartition(" ")
        if not symbol or not count.lstrip("-").isdigit():
            raise ValueError(f"{path}:{line_no}: expected '<symbol> <count>', got {line!r}")
        if symbol in seen:
            raise ValueError(f"{path}:{line_no}: symbol {symbol!r} repeats line {seen[symbol]}")
        seen[symbol] = line_no
        entries.append(symbol)
    return entries


def _is_decimal(entry: str) -> bool:
    return entry.isascii() and entry.isdigit()


def _entry_bpe_ids(entries: Sequence[str], bpe_vocab_size: int) -> list[int | None]:
    """The BPE id each entry names, or None where it names none (a placeholder)."""
    ids = [int(e) if _is_decimal(e) else None for e in entries]
    return [i if i is not None and i < bpe_vocab_size else None for i in ids]


def _bpe_lookup(entries: Sequence[str], bpe_vocab_size: int) -> list[int]:
    lookup = [SPECIAL_SYMBOLS.index("<unk>")] * bpe_vocab_size
    for n, bpe_id in enumerate(_entry_bpe_ids(entries, bpe_vocab_size)):
        if bpe_id is not None:
            lookup[bpe_id] = NUM_SPECIALS + n
    return lookup


def _check_sizes(num_codes: int, num_bins: int) -> None:
    if num_codes < 0:
        raise ValueError(f"UnifiedVocab: num_codes must be >= 0, got {num_codes}")
    if num_bins < 2:  # quantisation divides by num_bins - 1
        raise ValueError(f"UnifiedVocab: num_bins must be >= 2, got {num_bins}")


def _check_index(what: str, k: Index, size: int) -> Index:
    return _offset_in_range(what, k, (0, size), "k")


def _range_index(what: str, token: Index, bounds: tuple[int, int]) -> Index:
    return _offset_in_range(what, token, bounds, "id") - bounds[0]


def _offset_in_range(what: str, value: Index, bounds: tuple[int, int], name: str) -> Index:
    """``value`` unchanged once it is known to lie in ``bounds``; else names the first bad one."""
    lo, hi = bounds
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{what}s must be an integer tensor, got dtype {value.dtype}")
        inside = _in_range(value, bounds)
        if not bool(inside.all()):
            bad = value[~inside].reshape(-1)[0].item()
            raise ValueError(f"{bad} is not a valid {what}; valid: {lo} <= {name} < {hi}")
        return value
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if not _in_range(int(value), bounds):
        raise ValueError(f"{value} is not a valid {what}; valid: {lo} <= {name} < {hi}")
    return int(value)


def _in_range(i: Index, bounds: tuple[int, int]) -> bool | torch.Tensor:
    lo, hi = bounds
    if isinstance(i, torch.Tensor):
        return (i >= lo) & (i < hi)
    return lo <= i < hi


def _check_state(state: Mapping[str, Any]) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a UnifiedVocab state: format is {state.get('format')!r}, "
                         f"expected {STATE_FORMAT!r}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"UnifiedVocab state version {state.get('version')!r} is not supported "
                         f"(this code reads version {STATE_VERSION})")
    missing = [k for k in ("num_codes", "num_bins", "entries", "tokenizer") if k not in state]
    if missing:
        raise ValueError(f"UnifiedVocab state lacks {', '.join(missing)}")
    if not isinstance(state["tokenizer"], str):
        raise ValueError(f"UnifiedVocab state: 'tokenizer' must be the tokenizers JSON string, "
                         f"got {type(state['tokenizer']).__name__}")
