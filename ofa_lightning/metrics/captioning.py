"""Caption metrics as OFA reports them: pycocoevalcap's scorers after its PTB tokenizer.

The official evaluation (``run_scripts/caption/coco_eval.py``, ``utils/eval_utils.py``)
deletes every ``string.punctuation`` character from the generated caption, then hands
predictions and the raw reference captions to ``COCOEvalCap``, which lower-cases and
tokenises both with Stanford's PTBTokenizer (Java) and runs BLEU, METEOR (Java), ROUGE-L
and CIDEr-D on the result. This module drives the same pycocoevalcap classes the same way;
it only adds a Java-free tokenizer for machines without Java, a choice of scorers (METEOR's
JVM start costs 6-10 s) and a way to gather the caption strings across DDP processes.

Why strings must be gathered, not per-process scores: CIDEr-D weights n-grams by their
document frequency over the *whole* evaluated set, and BLEU and METEOR are corpus-level
statistics, so neither is the mean of per-shard values. torchmetrics only syncs tensors, so
the captions are kept as UTF-8 bytes in ``uint8`` tensors plus per-string byte lengths.

Scores are on pycocoevalcap's scale (CIDEr 1.382 where papers print 138.2).
"""

from __future__ import annotations

import contextlib
import shutil
import string
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

Tokenizer = Literal["ptb", "simple"]

#: every key ``CaptionMetrics.compute`` can return (BLEU-1..3 come free with BLEU-4)
CAPTION_METRICS = ("cider", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l")
DEFAULT_CAPTION_METRICS = ("cider", "bleu4", "meteor", "rouge_l")
TOKENIZERS = ("ptb", "simple")

_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


# --------------------------------------------------------------------------- text handling

def strip_punctuation(text: str) -> str:
    """OFA's post-processing of a generated caption: delete ASCII punctuation, trim ends."""
    return text.translate(_DELETE_PUNCTUATION).strip()


def simple_tokenize(text: str) -> str:
    """Java-free stand-in for PTBTokenizer: lower-case, delete punctuation, single spaces.

    Not identical to PTB (which splits clitics, "dog's" -> "dog 's", and keeps hyphenated
    words whole), so scores differ slightly from the official ones; fine for validation.
    """
    return " ".join(text.lower().translate(_DELETE_PUNCTUATION).split())


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (PTBTokenizer and METEOR launch it)."""
    return shutil.which("java") is not None


def _require_java(purpose: str) -> None:
    if not java_available():
        raise RuntimeError(
            f"{purpose} needs Java, but no `java` executable is on PATH: pycocoevalcap runs "
            "Stanford's PTBTokenizer and METEOR 1.5 as Java programs. Install a Java runtime "
            "(e.g. `apt-get install default-jre-headless`), or use tokenizer='simple' and "
            "leave 'meteor' out of metrics."
        )


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Tokenise ``{key: [caption, ...]}`` with pycocoevalcap's PTBTokenizer (one JVM start).

    Lower-cases, splits off punctuation and drops the punctuation tokens in pycocoevalcap's
    list. Whitespace (including newlines, which would break its line alignment) is collapsed
    to single spaces first; that changes no token.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _require_java("PTB tokenization")
    wrapped = {k: [{"caption": " ".join(c.split())} for c in caps] for k, caps in captions.items()}
    try:
        tokenized = PTBTokenizer().tokenize(wrapped)
    except OSError as err:  # it writes its temp file next to its own jar, in site-packages
        raise RuntimeError(
            f"pycocoevalcap's PTBTokenizer failed ({err}); it writes a temporary file into "
            "its package folder, which must be writable. Use tokenizer='simple' otherwise."
        ) from err
    for key, caps in captions.items():
        if len(tokenized.get(key, ())) != len(caps):
            raise RuntimeError(
                f"PTBTokenizer returned {len(tokenized.get(key, ()))} lines for key {key!r}, "
                f"expected {len(caps)}: the Java tokenizer probably failed (see its stderr)."
            )
    return tokenized


def _tokenize_pair(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: Tokenizer
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Build pycocoevalcap's ``gts``/``res`` dicts (keyed by sample index), tokenised."""
    if tokenizer == "simple":
        res = {i: [simple_tokenize(p)] for i, p in enumerate(predictions)}
        gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
        return gts, res
    # predictions and references in one JVM call: PTB tokenises each line independently
    both: dict[Hashable, Sequence[str]] = {("res", i): [p] for i, p in enumerate(predictions)}
    both.update({("gts", i): refs for i, refs in enumerate(references)})
    tokenized = ptb_tokenize(both)
    res = {i: tokenized[("res", i)] for i in range(len(predictions))}
    gts = {i: tokenized[("gts", i)] for i in range(len(references))}
    return gts, res


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per sample), got a str")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "they must pair up one to one"
        )
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{i}] must be a str (a decoded caption), got {type(pred).__name__}")
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(
                f"references[{i}] must be a list of str (all reference captions of sample {i}), "
                f"got {type(refs).__name__}"
            )
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; every sample needs at least one reference caption")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"references[{i}][{j}] must be a str, got {type(ref).__name__}")


def _check_choice(name: str, values: Iterable[str], valid: Sequence[str]) -> tuple[str, ...]:
    values = (values,) if isinstance(values, str) else tuple(values)
    if not values:
        raise ValueError(f"{name} is empty; choose from {list(valid)}")
    unknown = [v for v in values if v not in valid]
    if unknown:
        raise ValueError(f"unknown {name} {unknown}; choose from {list(valid)}")
    return tuple(dict.fromkeys(values))  # de-duplicated, order kept


# --------------------------------------------------------------------------- scoring

def _meteor_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR from pycocoevalcap (a JVM per call), with the JVM always shut down.

    pycocoevalcap's ``Meteor`` holds a lock it never releases if scoring raises, and its
    ``__del__`` takes that lock again, so a failure would hang at garbage collection; the
    ``finally`` releases it and ends the process first.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as err:
        meteor.meteor_p.kill()
        stderr = meteor.meteor_p.stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {err}\n{stderr}") from err
    finally:
        if meteor.lock.locked():
            meteor.lock.release()
        with contextlib.suppress(OSError):
            meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return float(score)


def score_captions(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Iterable[str] = DEFAULT_CAPTION_METRICS,
    tokenizer: Tokenizer = "ptb",
    strip_prediction_punctuation: bool = True,
) -> dict[str, float]:
    """Corpus-level caption scores, the way OFA's ``coco_eval.py`` gets them.

    Each prediction pairs with its list of references (one entry per image). Predictions
    first lose their punctuation as in OFA's ``eval_caption``; references go to the
    tokenizer untouched, as the COCO json does. Returns ``{name: score}`` for ``metrics``.
    """
    metrics = _check_choice("metrics", metrics, CAPTION_METRICS)
    (tokenizer,) = _check_choice("tokenizer", tokenizer, TOKENIZERS)
    _check_inputs(predictions, references)
    if len(predictions) == 0:
        raise ValueError("no captions to score: predictions and references are empty")
    if tokenizer == "ptb":
        _require_java("tokenizer='ptb'")
    if "meteor" in metrics:
        _require_java("the 'meteor' metric")
    if strip_prediction_punctuation:
        predictions = [strip_punctuation(p) for p in predictions]
    gts, res = _tokenize_pair(predictions, references, tokenizer)

    out: dict[str, float] = {}
    if "cider" in metrics:
        out["cider"] = _cider_on_tokens(gts, res)[0]
    bleu_wanted = [m for m in metrics if m.startswith("bleu")]
    if bleu_wanted:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for m in bleu_wanted:
            out[m] = float(bleu[int(m[-1]) - 1])
    if "meteor" in metrics:
        out["meteor"] = _meteor_score(gts, res)
    if "rouge_l" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    return {m: out[m] for m in metrics}


def _cider_on_tokens(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, np.ndarray]:
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    if not any(ref.split() for refs in gts.values() for ref in refs):
        # pycocoevalcap would fail on max() of an empty document-frequency table
        return 0.0, np.zeros(len(res))
    scorer = CiderScorer(n=4, sigma=6.0)
    for i in res:
        scorer += (res[i][0], gts[i])
    score, scores = scorer.compute_score()
    return float(score), np.asarray(scores, dtype=np.float64)


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenizer: Tokenizer | Literal["none"] = "simple",
) -> tuple[float, np.ndarray]:
    """CIDEr-D of each prediction against its references: ``(mean, per-sample scores)``.

    pycocoevalcap's ``CiderScorer`` (n=4, sigma=6: clipped n-gram counts and the Gaussian
    length penalty that make it "-D"), with document frequencies taken from ``references``
    themselves. Meant for rewards (SCST), hence no punctuation stripping beyond the
    tokenizer and the fast ``"simple"`` tokenizer by default; ``"none"`` splits on
    whitespace only, for captions tokenised already. With a single sample every n-gram has
    idf log(1/1) = 0, so the score is 0: CIDEr needs a corpus.
    """
    (tokenizer,) = _check_choice("tokenizer", tokenizer, (*TOKENIZERS, "none"))
    _check_inputs(predictions, references)
    if tokenizer == "none":
        gts = {i: list(refs) for i, refs in enumerate(references)}
        res = {i: [p] for i, p in enumerate(predictions)}
    else:
        gts, res = _tokenize_pair(predictions, references, tokenizer)
    if not res:
        return 0.0, np.zeros(0)
    return _cider_on_tokens(gts, res)


# --------------------------------------------------------------------------- text <-> tensors

def encode_texts(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of all ``texts`` concatenated (uint8) and each text's byte length (int64)."""
    encoded = [t.encode("utf-8") for t in texts]
    data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if any(encoded) \
        else torch.zeros(0, dtype=torch.uint8)
    return data, torch.tensor([len(e) for e in encoded], dtype=torch.int64)


def decode_texts(data: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Inverse of :func:`encode_texts`."""
    raw = bytes(data.cpu().numpy().tobytes())
    bounds = np.concatenate([[0], np.cumsum(lengths.cpu().numpy())])
    if bounds[-1] != len(raw):
        raise RuntimeError(f"text state is corrupt: lengths sum to {bounds[-1]}, "
                           f"but {len(raw)} bytes are stored")
    return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- the Metric

class CaptionMetrics(Metric):
    """CIDEr-D, BLEU-1..4, METEOR and ROUGE-L over all captions seen, on all processes.

    ``update(predictions, references)`` takes decoded captions and, per caption, the list of
    its reference captions. ``compute()`` returns ``{"cider": ..., "bleu4": ..., ...}`` as
    float64 tensors, computed once over everything gathered from every process (see the
    module docstring for why shards cannot be scored separately). Each sample counts once
    per ``update``: a DDP sampler that pads with repeated samples repeats them here too.
    Call ``update`` in the step and ``compute`` at epoch end; calling the metric itself
    (``forward``) would also score each batch alone, tokenizer JVM included.

    Args:
        metrics: which scores to compute, from ``CAPTION_METRICS``. Leave out ``"meteor"``
            for fast validation: it starts a JVM (6-10 s) on every ``compute``.
        tokenizer: ``"ptb"`` (pycocoevalcap's Stanford PTBTokenizer, Java, the official
            choice) or ``"simple"`` (lower-case and delete punctuation, no Java).
        strip_prediction_punctuation: delete punctuation from predictions first, as OFA's
            evaluation does; idempotent if the task has done it already.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _TEXT_STATES = {
        "pred_bytes": torch.uint8, "pred_lengths": torch.int64,
        "ref_bytes": torch.uint8, "ref_lengths": torch.int64, "ref_counts": torch.int64,
    }

    pred_bytes: list[torch.Tensor]
    pred_lengths: list[torch.Tensor]
    ref_bytes: list[torch.Tensor]
    ref_lengths: list[torch.Tensor]
    ref_counts: list[torch.Tensor]

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_CAPTION_METRICS,
        tokenizer: Tokenizer = "ptb",
        strip_prediction_punctuation: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.metrics = _check_choice("metrics", metrics, CAPTION_METRICS)
        (self.tokenizer,) = _check_choice("tokenizer", tokenizer, TOKENIZERS)
        self.strip_prediction_punctuation = strip_prediction_punctuation
        if self.tokenizer == "ptb":  # fail at construction, not after a whole validation epoch
            _require_java("CaptionMetrics(tokenizer='ptb')")
        if "meteor" in self.metrics:
            _require_java("CaptionMetrics(metrics=[..., 'meteor'])")
        for name in self._TEXT_STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Store one batch of captions; empty batches are allowed and change nothing."""
        _check_inputs(predictions, references)
        if len(predictions) == 0:
            return
        pred_data, pred_lengths = encode_texts(predictions)
        flat_refs = [r for refs in references for r in refs]
        ref_data, ref_lengths = encode_texts(flat_refs)
        counts = torch.tensor([len(refs) for refs in references], dtype=torch.int64)
        for name, value in (("pred_bytes", pred_data), ("pred_lengths", pred_lengths),
                            ("ref_bytes", ref_data), ("ref_lengths", ref_lengths),
                            ("ref_counts", counts)):
            getattr(self, name).append(value.to(self.device))

    def _gathered(self) -> tuple[list[str], list[list[str]]]:
        """Decode the (synced) states back into predictions and reference lists."""
        if isinstance(self.pred_lengths, list) and not self.pred_lengths:
            return [], []  # no update on any process
        # lists of per-update tensors before a sync, one concatenated tensor after it
        state = {name: dim_zero_cat(getattr(self, name)) for name in self._TEXT_STATES}
        predictions = decode_texts(state["pred_bytes"], state["pred_lengths"])
        flat_refs = decode_texts(state["ref_bytes"], state["ref_lengths"])
        counts = state["ref_counts"].tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        references = [flat_refs[a:b] for a, b in zip(starts[:-1], starts[1:])]
        return predictions, references

    def compute(self) -> dict[str, torch.Tensor]:
        """Score every caption gathered from all processes; raises if there are none."""
        predictions, references = self._gathered()
        if not predictions:
            raise ValueError(
                "CaptionMetrics.compute() has no captions: call update(predictions, references) "
                "with at least one sample first (on some process)"
            )
        scores = score_captions(predictions, references, self.metrics, self.tokenizer,
                                self.strip_prediction_punctuation)
        return {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in scores.items()}

    def set_dtype(self, dst_type: str | torch.dtype) -> CaptionMetrics:
        """Keep the states as they are: they are bytes and counts, not floating-point values."""
        return self

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any = None) -> None:
        """Give empty text states their own dtype before torchmetrics gathers them.

        torchmetrics stands in an empty tensor of ``self.dtype`` (float32) for a list state
        that is empty on a process; gathered beside other processes' uint8/int64 tensors,
        that would mix dtypes in one ``all_gather``.
        """
        for name, dtype in self._TEXT_STATES.items():
            if len(getattr(self, name)) == 0:
                setattr(self, name, [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)
