"""Image infilling, OFA's pure-image pretraining task: draw the middle of an image as codes.

Official recipe (``data/pretrain_data/unify_dataset.py::process_pure_image``,
``reference/ofa_spec.md`` §2.4, §4.1): a 256 x 256 image, normalised to [-1, 1], has rows and
columns [64, 192) set to 0 (the central half of each side); the model reads it with the
instruction ``" what is the image in the middle part?"`` and writes the 256 VQGAN codes
(16 x 16, row-major) of that central 128 x 128 region, then eos, with its decoder in
image-code mode. Samples weigh 2.0 in the loss.

Here the region is the central ``region`` fraction of each side of the image as the model
sees it (``image_size`` square, the datamodule's): rows/cols ``[lo, lo + r)`` with
``r = round(image_size * region)`` and ``lo = (image_size - r) // 2`` (official 256 / 0.5:
[64, 192)). Its codes come from the image tokenizer (``ofa_lightning.tokenizer.GumbelVQ``)
applied to the un-masked region cut from the same normalised tensor, optionally resized to
``code_image_size`` first. How the official codes were made is not published (spec §2.4,
UNVERIFIED); for a 256 px image this procedure gives the documented 16 x 16 grid of the
central 128 x 128 pixels.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from ofa_lightning.data import Sample
from ofa_lightning.generation import GenerationConfig, generate
from ofa_lightning.metrics.image_generation import DEFAULT_FID_FEATURES, CodeAccuracy, ImageFID
from ofa_lightning.task import RecordSource, SampleContext, Task, require_fields
from ofa_lightning.tokenizer import GumbelVQ, check_codebook_matches, load_image_tokenizer
from ofa_lightning.vocab import UnifiedVocab
from tasks._text import field_error, load_image, where

# The released VQGAN (OpenImages f=8, 8192 codes) downsamples by 8; assumed when the task has
# precomputed codes and no tokenizer to ask.
DEFAULT_DOWNSAMPLE = 8
# Decoding settings the task fixes itself: codes only, exactly one full grid.
_FIXED_GENERATION = ("gen_code", "constraint_range", "min_len", "max_len_a", "max_len_b", "max_len")


@functools.lru_cache(maxsize=None)
def load_tokenizer(path: str, device: str = "cpu") -> GumbelVQ:
    """The image tokenizer at ``path``, loaded once per process (and device), in eval mode
    with gradients off. A copy is made per device, so data loading keeps its CPU one."""
    if device != "cpu":
        return copy.deepcopy(load_tokenizer(path, "cpu")).to(device)
    tokenizer = load_image_tokenizer(path, map_location="cpu")
    return tokenizer.eval().requires_grad_(False)


class ImageInfillingTask(Task):
    """Image infilling: the image with its middle zeroed in, the middle's image codes out.

    Record schema (a mapping; ``ShapesWorldSource(kind="image")`` gives these):

    - ``id``: anything printable (optional).
    - ``image``: a PIL image, a file path or encoded image bytes.
    - ``codes`` (optional): the region's codes, precomputed (the official
      ``image_examples.tsv`` column): ints, a 1-D/2-D tensor or a space-separated string,
      row-major, ``grid x grid`` of them, each in ``[0, num_codes)``. Records with codes need
      no tokenizer for training.

    Sample: source ``[bos] + " what is the image in the middle part?" + [eos]``, the image
    with the region zeroed, target = the region's codes as ``<code_k>`` tokens + eos,
    ``code_target=True``, loss weight ``loss_weight``. Meta: ``grid``, ``codes`` (grid, grid)
    and, for evaluation with a tokenizer, ``region`` (3, c, c) in [-1, 1], the pixels the
    codes stand for (FID's real images).

    The code grid has ``grid = c / f`` codes per side, where ``c`` is the region's side in
    pixels (or ``code_image_size``) and ``f`` the tokenizer's downsampling (8 for the
    released VQGAN, assumed without a tokenizer). For the decoder's 2-D code positions to
    match, give the model ``code_image_size = 8 * grid`` (``model_overrides``); official: 128.

    Prediction: the code grid, a LongTensor (grid, grid). Decoding is restricted to code
    tokens (``constraint_range`` = the vocabulary's code range, ``gen_code``) and writes
    exactly ``grid * grid`` of them (``min_len = max_len_b``); the task fixes those settings.
    The default is greedy (deterministic, so code accuracy is comparable between runs). The
    official image generation samples instead: ``generation={"sampling": True, "top_k": 256,
    "beam": 24}`` (text-to-image, then CLIP reranking, which this task does not do).

    Metrics: ``code_accuracy`` (:class:`CodeAccuracy`) and, when the task has a tokenizer to
    draw the predicted codes with, ``fid`` (:class:`ImageFID`) of the drawn regions against
    the real ones (real pixels, so the tokenizer's own reconstruction error counts too).

    Args:
        tokenizer: path of the image tokenizer (``ofa_lightning.tokenizer.load_image_tokenizer``);
            loaded on first use, once per process. Needed for records without ``codes``
            and for FID.
        loss_weight: every sample's loss weight (official 2.0).
        region: fraction of each image side the middle region spans (official 0.5).
        code_image_size: side in pixels the region is resized to before encoding; None
            (default) encodes it at its own size, ``round(image_size * region)`` (official 128).
        sample_codes: draw each code as one Gumbel sample, as the official ``GumbelVQ.encode``
            made OFA's data (from torch's global RNG, which the datamodule seeds per sample);
            default False: the most likely code, deterministic.
        fid_feature: FID's feature extractor (see :class:`ImageFID`); None: the offline
            random-convolution default with ``fid_feature_dim`` features.
        fid_feature_dim: features of the default extractor (32; see ``ImageFID``).
    """

    name = "image_infilling"
    instruction = " what is the image in the middle part?"
    required_fields = ("image",)
    default_generation = {"beam": 1, "max_len_a": 0.0}

    def __init__(self, source: RecordSource | None = None, weight: float = 1.0,
                 generation: dict[str, Any] | None = None, *, tokenizer: str | None = None,
                 loss_weight: float = 2.0, region: float = 0.5,
                 code_image_size: int | None = None, sample_codes: bool = False,
                 fid_feature: nn.Module | None = None,
                 fid_feature_dim: int = DEFAULT_FID_FEATURES) -> None:
        owner = type(self).__name__
        fixed = sorted(set(generation or {}) & set(_FIXED_GENERATION))
        if fixed:
            raise ValueError(f"{owner}: generation settings {fixed} are fixed by the task (only "
                             f"code tokens, exactly one code grid); leave them out")
        super().__init__(source, weight, generation)
        if not loss_weight > 0:
            raise ValueError(f"{owner}: loss_weight must be positive, got {loss_weight!r}")
        if not 0.0 < region <= 1.0:
            raise ValueError(f"{owner}: region must be a fraction in (0, 1] of the image side, "
                             f"got {region!r}")
        if code_image_size is not None and (isinstance(code_image_size, bool)
                                            or not isinstance(code_image_size, int)
                                            or code_image_size < 1):
            raise ValueError(f"{owner}: code_image_size must be None or a positive integer, "
                             f"got {code_image_size!r}")
        self.tokenizer = str(tokenizer) if tokenizer is not None else None
        self.loss_weight = float(loss_weight)
        self.region = float(region)
        self.code_image_size = code_image_size
        self.sample_codes = bool(sample_codes)
        self.fid_feature = fid_feature
        self.fid_feature_dim = fid_feature_dim

    # ------------------------------------------------------------------ geometry
    def image_tokenizer(self, device: torch.device | str = "cpu") -> GumbelVQ:
        """The tokenizer (on ``device``); an error that says how to get one if there is none."""
        if self.tokenizer is None:
            raise ValueError(f"task {self.name!r} has no image tokenizer; set init_args.tokenizer "
                             f"to a GumbelVQ checkpoint (ofa_lightning.tokenizer)")
        return load_tokenizer(self.tokenizer, str(torch.device(device)))

    def downsample(self) -> int:
        return int(self.image_tokenizer().downsample) if self.tokenizer else DEFAULT_DOWNSAMPLE

    def region_bounds(self, image_size: int) -> tuple[int, int]:
        """Rows/columns ``[lo, hi)`` of the middle region of an ``image_size`` square."""
        side = int(round(image_size * self.region))
        lo = (image_size - side) // 2
        return lo, lo + side

    def code_grid(self, image_size: int) -> int:
        """Codes per side of the region's grid at this ``image_size``; a clear error when the
        region is too small for the tokenizer or not a multiple of its downsampling."""
        lo, hi = self.region_bounds(image_size)
        side = self.code_image_size or hi - lo
        f = self.downsample()
        if side < f or side % f:
            if self.code_image_size:
                what, fix = (f"code_image_size={self.code_image_size}",
                             f"set code_image_size to a multiple of {f}")
            else:
                what = (f"the middle region is {hi - lo}x{hi - lo} px (image_size={image_size} x "
                        f"region={self.region})")
                fix = (f"raise the datamodule's image_size (the next that works: "
                       f"{self._next_image_size(image_size, f)}) or set code_image_size to a "
                       f"multiple of {f}")
            raise ValueError(f"task {self.name!r}: {what}, too small or not a multiple for the "
                             f"image tokenizer, which downsamples by f={f} and needs a side that "
                             f"is a positive multiple of {f}; {fix}")
        return side // f

    def _next_image_size(self, image_size: int, f: int) -> int:
        """The smallest larger image_size whose region suits the tokenizer and is centred."""
        size = image_size + 1
        while True:
            lo, hi = self.region_bounds(size)
            if hi - lo >= f and (hi - lo) % f == 0 and lo == size - hi:
                return size
            size += 1

    # ------------------------------------------------------------------ samples
    def build_query(self, record: Mapping[str, Any], context: SampleContext) -> Sample:
        image, _, _ = load_image(self, record, context)
        return self._query(record, context, image)

    def build_sample(self, record: Mapping[str, Any], context: SampleContext,
                     train: bool) -> Sample:
        require_fields(record, self.required_fields, self.name, where(self))
        image, _, _ = load_image(self, record, context)
        query = self._query(record, context, image)
        grid = query.meta["grid"][0]
        region = self.region_pixels(image)
        if record.get("codes") is not None:
            codes = self._precomputed_codes(record, grid, context.vocab)
        elif self.tokenizer is None:
            raise field_error(self, record, "codes",
                              "is missing and the task has no image tokenizer to compute it; set "
                              "init_args.tokenizer to a GumbelVQ checkpoint, or give every record "
                              "precomputed codes")
        else:
            codes = self.encode_region(region)
            if tuple(codes.shape) != (grid, grid):
                raise ValueError(f"task {self.name!r}: the image tokenizer turned a "
                                 f"{tuple(region.shape[1:])} region into a {tuple(codes.shape)} "
                                 f"code grid, expected ({grid}, {grid})")
        meta = dict(query.meta, codes=codes)
        if not train and self.tokenizer is not None:  # FID's real images
            meta["region"] = region
        return query.with_target(context.vocab, context.vocab.code_id(codes.reshape(-1)).tolist(),
                                 meta=meta)

    def _query(self, record: Mapping[str, Any], context: SampleContext,
               image: torch.Tensor) -> Sample:
        self._check_vocab(context.vocab)
        grid = self.code_grid(context.image_size)
        lo, hi = self.region_bounds(context.image_size)
        masked = image.clone()
        masked[:, lo:hi, lo:hi] = 0.0  # zeroed after normalisation, as the official code does
        vocab = context.vocab
        return Sample.seq2seq(self.name, vocab, vocab.encode(self.fill_instruction()), [],
                              image=masked, code_target=True, weight=self.loss_weight,
                              meta={"id": record.get("id"), "grid": (grid, grid)})

    def region_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """The middle region (3, c, c) of a normalised ``image`` (3, S, S), un-masked, as it is
        encoded (resized to ``code_image_size`` when that is set)."""
        lo, hi = self.region_bounds(image.shape[-1])
        region = image[:, lo:hi, lo:hi]
        side = self.code_image_size
        if side is not None and side != hi - lo:
            region = F.interpolate(region[None], size=(side, side), mode="bicubic",
                                   align_corners=False, antialias=True)[0].clamp_(-1.0, 1.0)
        return region.contiguous()

    @torch.no_grad()
    def encode_region(self, region: torch.Tensor) -> torch.Tensor:
        """Region pixels (3, c, c) in [-1, 1] -> the code grid (c/f, c/f), long, on the CPU."""
        tokenizer = self.image_tokenizer()
        codes = tokenizer.encode_codes(region[None].to(torch.float32),  # (1, c/f, c/f)
                                       sample=self.sample_codes)
        return codes[0].to(device="cpu", dtype=torch.long)

    def _precomputed_codes(self, record: Mapping[str, Any], grid: int,
                           vocab: UnifiedVocab) -> torch.Tensor:
        value = record["codes"]
        try:
            if isinstance(value, str):
                codes = torch.tensor([int(v) for v in value.split()], dtype=torch.long)
            elif isinstance(value, torch.Tensor):
                if value.is_floating_point() or value.dtype == torch.bool:
                    raise TypeError(f"a {value.dtype} tensor")
                codes = value.to(torch.long).reshape(-1)
            elif isinstance(value, Sequence) and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                codes = torch.tensor(list(value), dtype=torch.long)
            else:
                raise TypeError(repr(value)[:80])
        except (TypeError, ValueError) as error:
            raise field_error(self, record, "codes", f"must be integer codes (a list, a tensor "
                              f"or a space-separated string), got {error}") from None
        if codes.numel() != grid * grid:
            raise field_error(self, record, "codes", f"holds {codes.numel()} codes, expected "
                              f"{grid * grid} (a {grid}x{grid} grid for the middle region at this "
                              f"image_size; check image_size, region and code_image_size)")
        bad = (codes < 0) | (codes >= vocab.num_codes)
        if bad.any():
            raise field_error(self, record, "codes", f"holds code {int(codes[bad][0])}, outside "
                              f"[0, {vocab.num_codes}) (the vocabulary's num_codes)")
        return codes.view(grid, grid)

    def _check_vocab(self, vocab: UnifiedVocab) -> None:
        if vocab.num_codes == 0:
            raise ValueError(f"task {self.name!r} writes image codes but the vocabulary has "
                             f"num_codes=0; set the datamodule's num_codes to the tokenizer's "
                             f"codebook size (official 8192)")
        if self.tokenizer is not None:
            check_codebook_matches(self.image_tokenizer(), vocab.num_codes,
                                   f"task {self.name!r} (tokenizer {self.tokenizer})")

    # ------------------------------------------------------------------ predictions
    def generation_config(self, vocab: UnifiedVocab, num_codes: int) -> GenerationConfig:
        """This task's decoding recipe for a grid of ``num_codes`` codes."""
        return self.generation.replace(gen_code=True, constraint_range=vocab.code_range,
                                       min_len=num_codes, max_len_a=0.0, max_len_b=num_codes,
                                       max_len=None)

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any, vocab: UnifiedVocab) -> list[Any]:
        grids = {tuple(meta["grid"]) for meta in batch.meta}
        if len(grids) != 1:
            raise ValueError(f"task {self.name!r}: one batch mixes code grids {sorted(grids)}; "
                             f"give its samples one image_size")
        height, width = grids.pop()
        hypotheses = generate(model, batch.src_tokens, batch.patch_images, batch.patch_masks,
                              config=self.generation_config(vocab, height * width))
        return [self.decode(sample[0].tokens, vocab, meta)
                for sample, meta in zip(hypotheses, batch.meta)]

    def decode(self, tokens: torch.Tensor, vocab: UnifiedVocab,
               meta: Mapping[str, Any]) -> torch.Tensor:
        """``grid * grid`` code tokens (then eos) -> the code grid (grid, grid), long.

        The task's decoding settings always give that; anything else is an error naming
        what came out, not a silent guess.
        """
        height, width = meta["grid"]
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() and int(ids[-1]) == vocab.eos:
            ids = ids[:-1]
        if ids.numel() != height * width or not bool(vocab.is_code(ids).all()):
            raise ValueError(
                f"task {self.name!r} expected {height * width} code tokens (a {height}x{width} "
                f"grid) then eos, got {ids.numel()} tokens, {int((~vocab.is_code(ids)).sum())} of "
                f"them not codes: decode with the task's own settings (generation_config)")
        return vocab.code_index(ids).view(height, width)

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {"code_accuracy": CodeAccuracy()}
        if self.tokenizer is not None:
            feature = copy.deepcopy(self.fid_feature) if self.fid_feature is not None else None
            metrics["fid"] = ImageFID(feature, feature_dim=self.fid_feature_dim)
        return metrics

    def update_metrics(self, metrics: dict[str, Metric], predictions: Sequence[Any],
                       metas: Sequence[Mapping[str, Any]]) -> None:
        if not predictions:
            return
        accuracy = metrics["code_accuracy"]
        preds = torch.stack([torch.as_tensor(p, dtype=torch.long) for p in predictions])
        target = torch.stack([torch.as_tensor(m["codes"], dtype=torch.long) for m in metas])
        accuracy.update(preds.to(accuracy.device), target.to(accuracy.device))
        fid = metrics["fid"] if "fid" in metrics else None  # an nn.ModuleDict in OFAModule
        if fid is not None:
            tokenizer = self.image_tokenizer(fid.device)
            with torch.no_grad():
                drawn = tokenizer.decode_codes(preds.to(fid.device))  # (B, 3, c, c), [-1, 1]
            real = torch.stack([torch.as_tensor(m["region"]) for m in metas]).to(fid.device)
            fid.update(drawn.float(), real=False)
            fid.update(real.float(), real=True)
