"""Read official OFA checkpoints safely, and read/write this project's own checkpoint format.

Four layouts are recognised (``load_checkpoint`` tells them apart by content, not by name):

- ``"fairseq"``: the official trainer's container ``{"cfg": {"model": Namespace, ...}, "model":
  state_dict, "extra_state": {"ema": ...}, ...}`` (older files keep the Namespace in ``"args"``);
- ``"state_dict"``: a bare official state dict (``ckpt["model"]`` saved on its own);
- ``"hf"``: the Hugging Face port's ``pytorch_model.bin`` / ``.safetensors``, whose layer names are
  mapped back to the official ones (``reference/ofa_spec.md`` §7.4, reversed);
- ``"ofa-lightning"``: ``{"format": "ofa-lightning", "format_version": 1, "config": {...},
  "state_dict": {...}, "vocab": {...}}``, written by ``save_checkpoint``/``convert``.

Files are read with ``torch.load(weights_only=True)``: nothing in a checkpoint can run code. The
only globals allowed beyond torch's own are listed in ``_allowed_globals`` with the reason for each.

Whatever the layout, the weights come back under the official key names with the derived buffers
removed (``*.version``, ``*_rp_bucket``, ``decoder.image_position_idx``): the model rebuilds those
from its config, so loading them could only disagree with it.
"""

from __future__ import annotations

import dataclasses

import argparse
import math
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from ofa_lightning.config import OFAConfig

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_NAME = "ofa-lightning"
# the entry OFAModule adds to every Lightning checkpoint `ofa-lightning fit` writes
FIT_CHECKPOINT_KEY = "ofa_lightning"
FORMAT_VERSION = 1

# The three names of the one shared token embedding (share_all_embeddings).
TIED_EMBEDDING_KEYS = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.output_projection.weight",
)

# Official ResNet trunks by blocks in (layer2, layer3); layer1 always has 3 (spec §1.2).
_RESNET_BY_BLOCKS = {(4, 6): "resnet50", (4, 23): "resnet101", (8, 36): "resnet152"}
_BLOCKS_BY_RESNET = {name: blocks for blocks, name in _RESNET_BY_BLOCKS.items()}

# HF port layer-module names -> official names, per stack (spec §7.4 read backwards). Applied to
# the module name right after ``{encoder,decoder}.layers.N.``, never as a substring replace, so
# ``cross_attn_mid_layer_norm`` cannot be half-renamed through ``cross_attn``.
_HF_LAYER_NAMES = {
    "encoder": {"self_attn_mid_layer_norm": "attn_ln", "ffn_layer_norm": "ffn_layernorm"},
    "decoder": {
        "self_attn_mid_layer_norm": "self_attn_ln",
        "cross_attn_mid_layer_norm": "cross_attn_ln",
        "cross_attn": "encoder_attn",
        "cross_attn_layer_norm": "encoder_attn_layer_norm",
        "ffn_layer_norm": "ffn_layernorm",
    },
}
_HF_ONLY_NAMES = frozenset(name for table in _HF_LAYER_NAMES.values() for name in table)

_LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.")
_TRUNK_BLOCK_KEY = re.compile(r"^encoder\.embed_images\.layer(\d+)\.(\d+)\.")
_MAX_LISTED = 20  # keys listed per category in a mismatch report


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or matched to a model; the message says why."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What ``load_checkpoint`` found: everything needed to build and fill an ``OFAModel``."""

    config: OFAConfig
    state_dict: dict[str, Tensor]  # official key names, derived buffers removed
    vocab_state: dict[str, Any] | None  # only this project's files carry a vocabulary
    source_format: str  # "fairseq" | "state_dict" | "hf" | "ofa-lightning" | "fit"
    path: Path
    run_config: str | None = None  # a fit checkpoint's resolved YAML (tasks, image size)


# ===================================================================================== reading
def _allowed_globals() -> list[Any]:
    """The globals a checkpoint may name besides torch's default weights-only set.

    - ``argparse.Namespace``: the official trainer stores every CLI argument as one Namespace
      (``cfg["model"]``, or ``args`` in older files). Unpickling it only creates an empty
      Namespace and fills its ``__dict__``; it runs no code of the file's choosing.
    - numpy ``scalar`` (under its numpy-1 and numpy-2 module paths), ``numpy.dtype`` and the
      concrete dtype classes of bool/int32/int64/float16/float32/float64: fairseq's meters in
      ``extra_state["metrics"]`` can hold numpy scalars (e.g. OFA's caption/VQA tasks log
      ``scores.sum()`` of a numpy array). A scalar is rebuilt from a dtype and raw bytes; the
      dtype classes are needed because the unpickler restores a dtype's state on its concrete
      class. None of them imports or calls anything else. numpy arrays are *not* allowed.
    Everything else (``os.system``, ``eval``, any project class) is refused.
    """
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # numpy is optional; without it no checkpoint can contain numpy objects
        return allowed
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2 (and 1.26's forward alias)
    except ImportError:
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]  # numpy < 1.26
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed.append(np.dtype)
    allowed += sorted({type(np.dtype(code)) for code in ("?", "i4", "i8", "f2", "f4", "f8")}
                      - {np.dtype}, key=lambda cls: cls.__name__)
    return allowed


class _AllowedGlobals:
    """``torch.serialization.safe_globals`` for our list (plus ``extra``), leaving a caller's
    own list intact.

    torch's context manager removes on exit whatever it added, including entries the caller had
    registered before; this one adds (and later removes) only those that were not there yet.
    """

    def __init__(self, extra: Sequence[Any] = ()) -> None:
        self.extra = list(extra)

    def __enter__(self) -> None:
        present = torch.serialization.get_safe_globals()
        self._added = [g for g in [*_allowed_globals(), *self.extra] if g not in present]
        torch.serialization.add_safe_globals(self._added)

    def __exit__(self, *exc: object) -> None:
        remaining = [g for g in torch.serialization.get_safe_globals() if g not in self._added]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(remaining)


_REFUSAL_MARKERS = ("GLOBAL", "unrecognized function", "Can only build", "Can only create")


def _refused_globals(path: Path, error: Exception, extra: Sequence[Any] = ()) -> str:
    """Name the globals that made the weights-only unpickler give up, as precisely as possible."""
    try:  # scans the pickle without executing it; zip-format files only
        with _AllowedGlobals(extra):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        if names:
            return ", ".join(sorted(names))
    except Exception:  # legacy (pre-1.6) format: fall back to torch's own message
        pass
    found = re.findall(r"GLOBAL (\S+)", str(error))
    if found:
        return ", ".join(dict.fromkeys(found))
    return _gist(str(error))


def read_torch_file(path: Path, extra_globals: Sequence[Any] = ()) -> Any:
    """``torch.load`` with the weights-only unpickler and our allow-list (plus
    ``extra_globals``, e.g. inert stand-ins for classes a foreign file names), mapped to the
    CPU. Anything else a file pickles is refused with a CheckpointError naming it.

    Zip-format files are memory-mapped, so a multi-GB container's optimizer state is never read
    into memory unless used.
    """
    try:
        with _AllowedGlobals(extra_globals):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except MemoryError:
        raise
    except Exception as error:  # torch raises many types for damaged or foreign files
        message = str(error)
        if any(marker in message for marker in _REFUSAL_MARKERS):
            raise CheckpointError(
                f"{path}: refused to load: the file contains a pickled object outside the "
                f"allow-list ({_refused_globals(path, error, extra_globals)}). Checkpoints are read without "
                f"running code from them; only tensors, plain containers, argparse.Namespace "
                f"and numpy scalars are accepted. If you trust the file, re-save only its "
                f"weights with plain torch.save and load that file instead.") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: "
                              f"{_gist(message)}); expected a file written by torch.save or "
                              f"safetensors") from error


def _gist(message: str) -> str:
    """The informative line of a torch loading error (it buries it under generic advice)."""
    detail = message.split("WeightsUnpickler error:")[-1].strip()
    return detail.splitlines()[0] if detail else "empty or truncated file"


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then the JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 8 + header_length <= path.stat().st_size


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: is a safetensors file; install the `safetensors` "
                              f"package to read it") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error


def _existing_file(path: PathLike) -> Path:
    """The path as a ``Path``; a clear error when it is missing or a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir()
                        if p.suffix in (".pt", ".bin", ".ckpt", ".safetensors", ".pth"))
        hint = f"; it contains {', '.join(inside)}" if inside else ""
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return path


def _read_file(path: Path) -> Any:
    return _read_safetensors(path) if _is_safetensors(path) else read_torch_file(path)


# ============================================================================ state-dict keys
def is_derived_key(key: str) -> bool:
    """True for buffers the model computes from its config and never loads."""
    return (key == "version" or key.endswith(".version") or key.endswith("_rp_bucket")
            or key.endswith("image_position_idx"))


def drop_derived_entries(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without ``*.version``, ``*_rp_bucket`` and ``*image_position_idx``."""
    return {key: value for key, value in state_dict.items() if not is_derived_key(key)}


def hf_to_official_key(key: str) -> str:
    """Map one Hugging Face port key to the official fairseq name (unchanged when not HF)."""
    parts = key.split(".")
    if len(parts) > 3 and parts[1] == "layers" and parts[0] in _HF_LAYER_NAMES:
        parts[3] = _HF_LAYER_NAMES[parts[0]].get(parts[3], parts[3])
    return ".".join(parts)


def _is_hf_naming(keys: Sequence[str]) -> bool:
    return any(len(p) > 3 and p[1] == "layers" and p[3] in _HF_ONLY_NAMES
               for p in (key.split(".") for key in keys))


def _strip_wrapper_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove a ``module.``/``model.`` prefix that DDP or a wrapper put on every key."""
    for prefix in ("module.", "model."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _tie_shared_embedding(state_dict: dict[str, Tensor], source: Path) -> None:
    """Give all three names of the shared embedding one tensor (in place).

    Some exports store only one of them (safetensors refuses shared tensors; HF may drop the
    tied output projection). If several are stored they must hold the same values, because the
    model has a single Parameter for all three.
    """
    present = [key for key in TIED_EMBEDDING_KEYS if key in state_dict]
    if not present:
        return
    reference = state_dict[present[0]]
    for key in present[1:]:
        other = state_dict[key]
        same = other is reference or (
            other.shape == reference.shape and other.data_ptr() == reference.data_ptr()
            and other.stride() == reference.stride())
        if not same and (other.shape != reference.shape or not torch.equal(other, reference)):
            raise CheckpointError(
                f"{source}: {key} differs from {present[0]} (shapes {tuple(other.shape)} and "
                f"{tuple(reference.shape)}); OFA shares one token embedding between the "
                f"encoder, the decoder and the output projection, so untied embeddings "
                f"cannot be loaded")
    for key in TIED_EMBEDDING_KEYS:
        state_dict[key] = reference


def _official_state_dict(state_dict: Mapping[str, Any],
                         source: Path) -> tuple[dict[str, Tensor], bool]:
    """Validate a mapping of weights and give it official names; also says if it was HF-named."""
    bad = [key for key, value in state_dict.items()
           if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: the weights mapping holds non-tensor entries, e.g. "
                              f"{bad[0]!r} ({type(state_dict[bad[0]]).__name__})")
    weights = _strip_wrapper_prefix(state_dict)
    if not any(key.startswith(("encoder.", "decoder.")) for key in weights):
        raise CheckpointError(f"{source}: no encoder.*/decoder.* keys, so not an OFA model; "
                              f"first keys: {', '.join(list(weights)[:5]) or '(none)'}")
    hf = _is_hf_naming(list(weights))
    if hf:
        weights = {hf_to_official_key(key): value for key, value in weights.items()}
    return weights, hf


# ========================================================================== config inference
def _shape(value: Any) -> tuple[int, ...]:
    """Shape of a tensor, of a ``{"shape": [...]}`` manifest entry, or of a plain sequence."""
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, Mapping):
        return tuple(value["shape"])
    return tuple(value)


def _count_indices(keys: Sequence[str], pattern: re.Pattern[str], group: str,
                   label: str) -> int | None:
    """Number of layers/blocks (max index + 1) among keys matching ``pattern`` for ``group``.

    Raises when the indices have a gap: a file with layers 0, 1 and 3 was cut by something.
    """
    indices = {int(m.group(2)) for m in map(pattern.match, keys) if m and m.group(1) == group}
    if not indices:
        return None
    if indices != set(range(max(indices) + 1)):
        raise CheckpointError(f"{label}.N indices are not contiguous: {sorted(indices)}")
    return max(indices) + 1


def _first_shape(shapes: Mapping[str, tuple[int, ...]], *keys: str) -> tuple[int, ...] | None:
    return next((shapes[key] for key in keys if key in shapes), None)


def _code_image_size_from_idx(length: int) -> int | None:
    """``image_position_idx`` = 1 + W*W + tail, tail 769 (current) or 768 (before 2022-06-16)."""
    for tail in (769, 768):
        side = math.isqrt(max(length - 1 - tail, 0))
        if side > 0 and side * side == length - 1 - tail:
            return 8 * side
    return None


def _side_facts(shapes: Mapping[str, tuple[int, ...]], side: str) -> dict[str, Any]:
    """Per-stack facts (``side`` = encoder or decoder) read off key names and shapes."""
    facts: dict[str, Any] = {}
    layers = _count_indices(list(shapes), _LAYER_KEY, side, f"{side}.layers")
    if layers:
        facts[f"{side}_layers"] = layers
        fc1 = shapes.get(f"{side}.layers.0.fc1.weight")
        if fc1:
            facts[f"{side}_ffn_dim"] = fc1[0]
        attn_ln = "attn_ln" if side == "encoder" else "self_attn_ln"
        facts[f"{side}_scale_attn"] = f"{side}.layers.0.{attn_ln}.weight" in shapes
        facts[f"{side}_scale_fc"] = f"{side}.layers.0.ffn_layernorm.weight" in shapes
        facts[f"{side}_scale_heads"] = f"{side}.layers.0.self_attn.c_attn" in shapes
    heads = _first_shape(shapes, f"{side}.layers.0.self_attn.c_attn",
                         f"{side}.token_rel_pos_table_list.0.weight")
    if heads:
        facts[f"{side}_heads"] = heads[-1]
    token_table = shapes.get(f"{side}.token_rel_pos_table_list.0.weight")
    if token_table:  # rows = 2 * bucket - 1
        facts[f"{side}_token_bucket_size"] = (token_table[0] + 1) / 2
    image_table = shapes.get(f"{side}.image_rel_pos_table_list.0.weight")
    if image_table:  # rows = (2 * bucket - 1) ** 2 + 3
        root = math.isqrt(max(image_table[0] - 3, 0))
        facts[f"{side}_image_bucket_size"] = (
            (root + 1) / 2 if root * root == image_table[0] - 3 else math.nan)
    positions = shapes.get(f"{side}.embed_positions.weight")
    if positions:  # rows = max positions + 2
        facts[f"{side}_max_positions"] = positions[0] - 2
    return facts


def architecture_facts(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the key names and shapes say about the architecture (only what is present).

    Accepts tensors or shapes (``{"key": {"shape": [...]}}`` manifests, tuples), so it can
    describe a real ``ofa_large`` without allocating it. Used both to infer a config and to
    explain why a checkpoint does not fit a model.
    """
    shapes = {key: _shape(value) for key, value in state_dict.items()}
    facts = _side_facts(shapes, "encoder") | _side_facts(shapes, "decoder")
    embedding = _first_shape(shapes, *TIED_EMBEDDING_KEYS)
    if embedding:
        facts["vocab_size"], facts["embed_dim"] = embedding
    blocks = [_count_indices(list(shapes), _TRUNK_BLOCK_KEY, str(stage),
                             f"encoder.embed_images.layer{stage}") for stage in (1, 2, 3, 4)]
    blocks = [count for count in blocks if count]
    if blocks:
        facts["trunk_blocks"] = tuple(blocks)
    idx = shapes.get("decoder.image_position_idx")
    if idx:
        facts["image_position_idx_length"] = idx[0]
    return facts


# Config fields the weights determine, each with the facts that must all agree on it.
_SHAPE_FIELDS = {
    "encoder_layers": ("encoder_layers",),
    "decoder_layers": ("decoder_layers",),
    "embed_dim": ("embed_dim",),
    "vocab_size": ("vocab_size",),
    "ffn_dim": ("encoder_ffn_dim", "decoder_ffn_dim"),
    "attention_heads": ("encoder_heads", "decoder_heads"),
    "token_bucket_size": ("encoder_token_bucket_size", "decoder_token_bucket_size"),
    "image_bucket_size": ("encoder_image_bucket_size", "decoder_image_bucket_size"),
    "max_positions": ("encoder_max_positions", "decoder_max_positions"),
    "scale_attn": ("encoder_scale_attn", "decoder_scale_attn"),
    "scale_fc": ("encoder_scale_fc", "decoder_scale_fc"),
    "scale_heads": ("encoder_scale_heads", "decoder_scale_heads"),
}


def _config_values_from_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """Config field values implied by the weights; raises where encoder and decoder disagree
    or a size is not one the official formulas can produce."""
    values: dict[str, Any] = {}
    for name, sources in _SHAPE_FIELDS.items():
        found = {source: facts[source] for source in sources if source in facts}
        if len(set(found.values())) > 1:
            detail = ", ".join(f"{source}={value}" for source, value in found.items())
            raise CheckpointError(f"the weights disagree on {name} ({detail}); ofa-lightning "
                                  f"uses one {name} for encoder and decoder")
        if found:
            value = next(iter(found.values()))
            if isinstance(value, float):
                if not value.is_integer():
                    raise CheckpointError(
                        f"the relative-position tables give no integer {name}: the table rows "
                        f"fit neither 2b-1 (text) nor (2b-1)^2+3 (image)")
                value = int(value)
            values[name] = value
    return values


# The fields infer_config must find, and the keys it reads them from (first layer/stack shown).
_INFERENCE_KEYS = {
    "encoder_layers": "encoder.layers.N.*",
    "decoder_layers": "decoder.layers.N.*",
    "embed_dim": "encoder.embed_tokens.weight",
    "vocab_size": "encoder.embed_tokens.weight",
    "ffn_dim": "encoder.layers.0.fc1.weight",
    "attention_heads": ("encoder.layers.0.self_attn.c_attn or "
                        "encoder.token_rel_pos_table_list.0.weight"),
    "token_bucket_size": "encoder.token_rel_pos_table_list.0.weight",
    "image_bucket_size": "encoder.image_rel_pos_table_list.0.weight",
    "max_positions": "encoder.embed_positions.weight",
}


def infer_config(state_dict: Mapping[str, Any], source: PathLike | None = None) -> OFAConfig:
    """An ``OFAConfig`` read off the weights alone (for files that carry no arguments).

    Shapes give the sizes; the trunk comes from its block counts; ``code_image_size`` from the
    length of ``decoder.image_position_idx`` when present. Fields the weights cannot show
    (``patch_image_size``, dropouts) keep their defaults: override them if needed.
    """
    where = f"{source}: " if source is not None else ""
    try:
        facts = architecture_facts(state_dict)
        values = _config_values_from_facts(facts)
    except CheckpointError as error:
        raise CheckpointError(f"{where}{error}") from None
    missing = [f"{name} (from {keys})" for name, keys in _INFERENCE_KEYS.items()
               if name not in values]
    if missing:
        raise CheckpointError(f"{where}cannot infer from the weights: " + "; ".join(missing)
                              + " - those keys are absent")
    values["resnet_type"] = _resnet_type(facts, where)
    length = facts.get("image_position_idx_length")
    if length is not None:
        code_image_size = _code_image_size_from_idx(length)
        if code_image_size is None:
            warnings.warn(f"{where}decoder.image_position_idx has {length} entries, which fits no "
                          f"code_image_size; keeping the default {OFAConfig().code_image_size}",
                          stacklevel=2)
        else:
            values["code_image_size"] = code_image_size
    try:
        return OFAConfig(**values)
    except ValueError as error:
        raise CheckpointError(f"{where}the weights imply an invalid config: {error}") from None


def _resnet_type(facts: Mapping[str, Any], where: str) -> str:
    blocks = facts.get("trunk_blocks")
    if blocks is None:
        raise CheckpointError(f"{where}no image trunk weights (encoder.embed_images.*), so the "
                              f"ResNet type cannot be inferred")
    name = _RESNET_BY_BLOCKS.get(tuple(blocks[1:3])) if len(blocks) == 3 else None
    if name is None:
        known = ", ".join(f"{n} [3, {a}, {b}]" for (a, b), n in _RESNET_BY_BLOCKS.items())
        raise CheckpointError(f"{where}image trunk has {list(blocks)} blocks per stage, which is "
                              f"none of the official trunks ({known})")
    return name


def _check_config_against_weights(config: OFAConfig, facts: Mapping[str, Any], source: Path,
                                  origin: str, overrides: Mapping[str, Any]) -> None:
    """Raise when a config taken from arguments or overrides contradicts the weights' shapes."""
    try:
        implied = _config_values_from_facts(facts)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    conflicts = {name: f"{name}: config says {getattr(config, name)!r}, weights have {value!r}"
                 for name, value in implied.items() if getattr(config, name) != value}
    blocks = facts.get("trunk_blocks")
    expected_blocks = _BLOCKS_BY_RESNET.get(config.resnet_type)
    if blocks and expected_blocks and tuple(blocks[1:3]) != expected_blocks:
        conflicts["resnet_type"] = (f"resnet_type: config says {config.resnet_type!r}, weights "
                                    f"have {list(blocks)} blocks per stage")
    if not conflicts:
        return
    if set(conflicts) & set(overrides):
        hint = "Overrides can change settings, not the shapes of stored weights."
    else:
        hint = ("If the stored arguments are wrong, pass the right values as overrides "
                "(e.g. load_checkpoint(path, encoder_layers=...)).")
    raise CheckpointError(f"{source}: the config ({origin}) contradicts the weights:\n  "
                          + "\n  ".join(conflicts.values()) + "\n" + hint)


# ============================================================================ the four formats
def _detect_format(raw: Any, source: Path) -> str:
    """Which of the four layouts ``raw`` (the unpickled file) is; raises for anything else."""
    if isinstance(raw, Mapping):
        if "format" in raw:
            if raw["format"] == FORMAT_NAME:
                return FORMAT_NAME
            raise CheckpointError(f"{source}: unknown checkpoint format {raw['format']!r}; "
                                  f"expected {FORMAT_NAME!r}")
        if isinstance(raw.get("model"), Mapping):
            return "fairseq"
        if raw and all(isinstance(value, Tensor) for value in raw.values()):
            return "state_dict"
        if isinstance(raw.get(FIT_CHECKPOINT_KEY), Mapping) and isinstance(raw.get("state_dict"), Mapping):
            return "fit"
        keys = ", ".join(repr(key) for key in list(raw)[:12])
        hint = (" This looks like a Lightning training checkpoint; load it with the Lightning "
                "module instead." if "pytorch-lightning_version" in raw else "")
        raise CheckpointError(
            f"{source}: unrecognised checkpoint layout (a dict with keys {keys}). Expected a "
            f"fairseq container (keys 'model' and 'cfg' or 'args'), a state dict of tensors "
            f"(official or Hugging Face names), or an ofa-lightning file "
            f"(format={FORMAT_NAME!r}).{hint}")
    raise CheckpointError(f"{source}: unrecognised checkpoint layout: the file holds a "
                          f"{type(raw).__name__}, not a dict")


def _official_args(raw: Mapping[str, Any]) -> Any | None:
    """The argparse Namespace (or mapping) of model arguments in a fairseq container, if any."""
    cfg = raw.get("cfg")
    if isinstance(cfg, Mapping) and cfg.get("model") is not None:
        return cfg["model"]
    return raw.get("args")


def _ema_weights(raw: Mapping[str, Any], source: Path) -> Mapping[str, Any]:
    """``extra_state["ema"]``, with fp32 master copies laid over it when the run kept them."""
    extra = raw.get("extra_state")
    if not isinstance(extra, Mapping) or not isinstance(extra.get("ema"), Mapping):
        keys = sorted(map(str, extra)) if isinstance(extra, Mapping) else []
        where = (f"extra_state has keys {keys}" if isinstance(extra, Mapping)
                 else f"the file has no extra_state (top-level keys: {sorted(map(str, raw))})")
        raise CheckpointError(f"{source}: use_ema=True but the checkpoint holds no EMA weights "
                              f"(extra_state['ema'], written by --store-ema); {where}")
    weights = dict(extra["ema"])
    fp32 = extra.get("ema_fp32_params")
    if isinstance(fp32, Mapping):  # --ema-fp32: the exact average lives here, "ema" is rounded
        weights.update({key: value for key, value in fp32.items() if key in weights})
    return weights


def _args_config(args: Any, source: Path) -> OFAConfig:
    try:
        return OFAConfig.from_official_args(args)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: {error}") from None


def _apply_overrides(config: OFAConfig, overrides: Mapping[str, Any], source: Path) -> OFAConfig:
    if not overrides:
        return config
    try:
        return config.replace(**overrides)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: bad override: {error}") from None


def _load_own_format(raw: Mapping[str, Any], source: Path, use_ema: bool,
                     overrides: Mapping[str, Any]) -> LoadedCheckpoint:
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{source}: {FORMAT_NAME} format_version {version!r} is not one "
                              f"this version reads (<= {FORMAT_VERSION}); upgrade ofa-lightning")
    if use_ema:
        raise CheckpointError(f"{source}: use_ema=True, but {FORMAT_NAME} files hold one set of "
                              f"weights (convert the EMA weights with convert(..., use_ema=True))")
    if not isinstance(raw.get("config"), Mapping) or not isinstance(raw.get("state_dict"), Mapping):
        raise CheckpointError(f"{source}: {FORMAT_NAME} file lacks its 'config' or 'state_dict'")
    try:
        config = OFAConfig.from_dict(raw["config"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: stored config is invalid: {error}") from None
    weights, _ = _official_state_dict(raw["state_dict"], source)
    config = _finish(config, weights, source, overrides, origin="stored config")
    return LoadedCheckpoint(config, _clean(weights, source), raw.get("vocab"), FORMAT_NAME, source)


def _load_fit_checkpoint(raw: Mapping[str, Any], source: Path, use_ema: bool,
                         overrides: Mapping[str, Any]) -> LoadedCheckpoint:
    """A Lightning checkpoint of ``ofa-lightning fit``: OFAModule keeps the network under
    ``model.`` and its config, vocabulary and run YAML under FIT_CHECKPOINT_KEY."""
    info = raw[FIT_CHECKPOINT_KEY]
    weights = {key.removeprefix("model."): value for key, value in raw["state_dict"].items()
               if key.startswith("model.")}
    own = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
           "config": info.get("model_config"), "state_dict": weights, "vocab": info.get("vocab")}
    loaded = _load_own_format(own, source, use_ema, overrides)
    return dataclasses.replace(loaded, source_format="fit", run_config=info.get("run_config"))


def _finish(config: OFAConfig, weights: Mapping[str, Tensor], source: Path,
            overrides: Mapping[str, Any], origin: str) -> OFAConfig:
    """Apply overrides, then make sure the result still describes these weights."""
    config = _apply_overrides(config, overrides, source)
    if overrides:
        origin += f" + overrides {dict(overrides)}"
    _check_config_against_weights(config, architecture_facts(weights), source, origin, overrides)
    return config


def _clean(weights: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    weights = drop_derived_entries(weights)
    _tie_shared_embedding(weights, source)
    return weights


def load_checkpoint(path: PathLike, use_ema: bool = False, **overrides: Any) -> LoadedCheckpoint:
    """Read any supported checkpoint into (config, official-named weights, vocabulary).

    ``use_ema`` takes the EMA weights of a fairseq container (``extra_state["ema"]``).
    ``overrides`` replace config fields afterwards (e.g. ``code_image_size=256`` for the
    image-generation checkpoints, ``patch_image_size=480`` for captioning); an override that
    contradicts the weights' shapes is refused.
    """
    source = _existing_file(path)
    raw = _read_file(source)
    layout = _detect_format(raw, source)
    if layout == FORMAT_NAME:
        return _load_own_format(raw, source, use_ema, overrides)
    if layout == "fit":
        return _load_fit_checkpoint(raw, source, use_ema, overrides)
    if layout == "fairseq":
        weights_raw = _ema_weights(raw, source) if use_ema else raw["model"]
        args = _official_args(raw)
    else:
        if use_ema:
            raise CheckpointError(f"{source}: use_ema=True, but the file is a bare state dict; "
                                  f"EMA weights only exist in fairseq containers "
                                  f"(extra_state['ema'])")
        weights_raw, args = raw, None
    weights, hf = _official_state_dict(weights_raw, source)
    if layout == "state_dict" and hf:
        layout = "hf"
    if args is not None:
        config = _args_config(args, source).replace(vocab_size=architecture_facts(weights).get(
            "vocab_size", OFAConfig().vocab_size))
        origin = "the checkpoint's arguments"
    else:
        config = infer_config(weights, source)
        origin = "inferred from the weights"
    config = _finish(config, weights, source, overrides, origin)
    return LoadedCheckpoint(config, _clean(weights, source), None, layout, source)


# ======================================================================= loading into a model
_FACT_MESSAGES = {
    "encoder_layers": "checkpoint has {ckpt} encoder layers, config has {model}",
    "decoder_layers": "checkpoint has {ckpt} decoder layers, config has {model}",
    "embed_dim": "checkpoint has embedding width {ckpt}, config has {model}",
    "vocab_size": "checkpoint has {ckpt} vocabulary rows, config has {model}",
    "encoder_ffn_dim": "checkpoint has encoder FFN width {ckpt}, config has {model}",
    "decoder_ffn_dim": "checkpoint has decoder FFN width {ckpt}, config has {model}",
    "encoder_heads": "checkpoint has {ckpt} encoder attention heads, config has {model}",
    "decoder_heads": "checkpoint has {ckpt} decoder attention heads, config has {model}",
    "trunk_blocks": "checkpoint has image-trunk blocks {ckpt} per stage, config has {model}",
    "encoder_max_positions": "checkpoint has {ckpt} text positions, config has {model}",
    "encoder_token_bucket_size": "checkpoint has token_bucket_size {ckpt}, config has {model}",
    "encoder_image_bucket_size": "checkpoint has image_bucket_size {ckpt}, config has {model}",
    "encoder_scale_attn": "checkpoint has scale_attn={ckpt}, config has {model}",
    "encoder_scale_fc": "checkpoint has scale_fc={ckpt}, config has {model}",
    "encoder_scale_heads": "checkpoint has scale_heads={ckpt}, config has {model}",
}


def _architecture_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Readable lines for each architecture fact on which checkpoint and model disagree."""
    try:
        ours, theirs = architecture_facts(expected), architecture_facts(found)
    except CheckpointError as error:  # e.g. a gap in the layer indices: worth saying as is
        return [str(error)]
    lines = []
    for fact, template in _FACT_MESSAGES.items():
        if fact in ours and fact in theirs and ours[fact] != theirs[fact]:
            show = (lambda v: list(v) if isinstance(v, tuple) else
                    int(v) if isinstance(v, float) and v.is_integer() else v)
            lines.append(template.format(ckpt=show(theirs[fact]), model=show(ours[fact])))
    return lines


def _listed(title: str, items: Sequence[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def check_state_dict_fits(module: nn.Module, state_dict: Mapping[str, Tensor],
                          source: PathLike | None = None) -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` has exactly the module's keys and shapes.

    Works on a model built on the ``meta`` device, so a huge checkpoint can be validated
    without allocating a second copy of it.
    """
    state_dict = drop_derived_entries(state_dict)
    expected = module.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself (files saved from FrozenBatchNorm,
    # e.g. with --freeze-resnet, have none), so strict loading does not require it either.
    missing = [key for key in expected if key not in state_dict
               and not key.endswith(".num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [f"{key}: expected {tuple(expected[key].shape)} found {tuple(value.shape)}"
                  for key, value in state_dict.items()
                  if key in expected and tuple(expected[key].shape) != tuple(value.shape)]
    if not (missing or unexpected or mismatched):
        return
    sections = [f"{source or 'state dict'}: the weights do not fit the model "
                f"({type(module).__name__})."]
    differences = _architecture_differences(expected, state_dict)
    if differences:
        sections.append("The checkpoint looks like another architecture:\n  "
                        + "\n  ".join(differences))
    for title, items in (("Missing keys", missing), ("Unexpected keys", unexpected),
                         ("Shape mismatches", mismatched)):
        if items:
            sections.append(_listed(title, items))
    raise CheckpointError("\n".join(sections))


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Tensor],
                           source: PathLike | None = None) -> None:
    """``module.load_state_dict(strict=True)`` after dropping derived buffers, with a report
    that lists missing/unexpected keys and shape mismatches and names the architecture
    difference behind them, instead of torch's wall of text."""
    check_state_dict_fits(module, state_dict, source)
    module.load_state_dict(drop_derived_entries(state_dict), strict=True)


# ===================================================================================== writing
_PLAIN_TYPES = (str, int, float, bool, type(None), Tensor)


def _check_plain(value: Any, where: str) -> None:
    """Refuse values the weights-only loader would reject, before they are written."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is a {type(key).__name__}; "
                                      f"use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN_TYPES):
        raise CheckpointError(f"{where} is a {type(value).__name__}; a checkpoint may hold only "
                              f"dicts, lists, str/int/float/bool/None and tensors")


def _to_cpu_keeping_ties(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Move tensors to the CPU once each, so tied entries stay one tensor (stored once)."""
    moved: dict[int, Tensor] = {}
    result = {}
    for key, value in state_dict.items():
        if id(value) not in moved:
            moved[id(value)] = value.detach().cpu()
        result[key] = moved[id(value)]
    return result


def _write_atomically(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(dict(payload), temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_own_format(path: PathLike, config: OFAConfig, state_dict: Mapping[str, Tensor],
                      vocab_state: Mapping[str, Any] | None) -> Path:
    path = Path(path).expanduser()
    if vocab_state is not None:
        _check_plain(vocab_state, "vocab_state")
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": _to_cpu_keeping_ties(drop_derived_entries(state_dict)),
    }
    if vocab_state is not None:
        payload["vocab"] = dict(vocab_state)
    _write_atomically(payload, path)
    return path


def save_checkpoint(path: PathLike, model: nn.Module | Mapping[str, Tensor],
                    config: OFAConfig | None = None,
                    vocab_state: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (a module or its state dict) in the ofa-lightning format.

    ``config`` defaults to ``model.config``; the vocabulary state (``UnifiedVocab.state_dict()``)
    goes in with it so that prediction needs nothing but this file. It must consist of plain
    values, which is checked here rather than discovered when loading fails.
    """
    if config is None:
        config = getattr(model, "config", None)
        if not isinstance(config, OFAConfig):
            raise CheckpointError("save_checkpoint needs a config: pass config=..., or a model "
                                  "with a .config attribute")
    elif isinstance(getattr(model, "config", None), OFAConfig) and model.config != config:
        raise CheckpointError("save_checkpoint: the config passed differs from model.config")
    state_dict = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    return _write_own_format(path, config, state_dict, vocab_state)


def _validation_model(config: OFAConfig) -> nn.Module:
    """An ``OFAModel`` to compare keys and shapes against, on the meta device when possible."""
    from ofa_lightning.model import OFAModel  # lazy: this module must import without the model

    try:
        with torch.device("meta"):
            return OFAModel(config)
    except (NotImplementedError, RuntimeError):  # a construction step meta cannot do
        return OFAModel(config)


def convert(src: PathLike, dst: PathLike, use_ema: bool = False,
            **overrides: Any) -> LoadedCheckpoint:
    """Convert an official checkpoint (fairseq, bare, HF) into the ofa-lightning format.

    The weights are checked against an ``OFAModel`` built from the resulting config before
    anything is written, so a converted file always loads. Returns what was read from ``src``.
    """
    source, target = Path(src).expanduser(), Path(dst).expanduser()
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise CheckpointError(f"{target}: convert would overwrite its own input")
    loaded = load_checkpoint(source, use_ema=use_ema, **overrides)
    check_state_dict_fits(_validation_model(loaded.config), loaded.state_dict, source)
    _write_own_format(target, loaded.config, loaded.state_dict, loaded.vocab_state)
    return loaded


__all__ = [
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LoadedCheckpoint",
    "architecture_facts",
    "check_state_dict_fits",
    "convert",
    "drop_derived_entries",
    "hf_to_official_key",
    "infer_config",
    "is_derived_key",
    "load_checkpoint",
    "load_state_dict_strict",
    "save_checkpoint",
]
