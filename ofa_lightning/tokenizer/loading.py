"""Read an image tokenizer from a file the user names, without running code from it.

Three layouts are recognised, by content:

- the released taming/OFA checkpoint ``vqgan/last.ckpt``: ``{"state_dict": {encoder.*,
  decoder.*, quantize.*, quant_conv.*, post_quant_conv.*, loss.*}, ...}``. Its architecture
  comes from ``model.yaml`` beside it (taming's ``model.params``) when present, otherwise it
  is read off the weights' shapes. The training-only ``loss.*`` entries are dropped;
- a checkpoint of ``ofa-lightning fit`` with ``VQTokenizerModule``: the network under
  ``tokenizer.`` in ``state_dict``, its config under ``TOKENIZER_CHECKPOINT_KEY``;
- a bare state dict (``torch.save(model.state_dict())``), architecture read off the shapes.

Everything is read with ``torch.load(weights_only=True)``. The one allowance: checkpoints
written by pytorch_lightning < 1.5 (the release was) key their callback states by the
callback *class* (``{ModelCheckpoint: {...}}``), which the weights-only unpickler refuses.
Those names resolve to inert stand-in classes here: they are only used as dictionary keys,
so nothing of the file's choosing is imported or called.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml
from torch import Tensor

from ofa_lightning.checkpoint import read_torch_file
from ofa_lightning.tokenizer.vqgan import GumbelVQ, VQGANConfig

__all__ = ["load_image_tokenizer", "read_tokenizer_checkpoint", "infer_config",
           "check_codebook_matches", "TOKENIZER_CHECKPOINT_KEY", "STATE_DICT_PREFIX"]

# the entry VQTokenizerModule adds to its checkpoints: {"config": VQGANConfig.to_dict(),
# "prefix": STATE_DICT_PREFIX}, all a loader needs to rebuild the network
TOKENIZER_CHECKPOINT_KEY = "ofa_lightning_tokenizer"
STATE_DICT_PREFIX = "tokenizer."  # the module attribute the network lives under

# keys every GumbelVQ state dict has; naming them is the "not a tokenizer" message
_REQUIRED_KEYS = ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight",
                  "post_quant_conv.weight", "quantize.proj.weight", "quantize.embed.weight")
_TRAINING_ONLY_PREFIXES = ("loss.",)  # taming's discriminator / perceptual loss weights
_MAX_LISTED = 12
# the callback classes old pytorch_lightning used as keys of checkpoint["callbacks"]
_LEGACY_CALLBACK_CLASSES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
)


def _legacy_key_stand_ins() -> list[tuple[type, str]]:
    """One inert class per legacy callback name (distinct, so the keys stay distinct)."""
    return [(type(name.rsplit(".", 1)[1], (), {"__doc__": f"stand-in for {name}"}), name)
            for name in _LEGACY_CALLBACK_CLASSES]


_STAND_INS = _legacy_key_stand_ins()


# ===================================================================================== reading
def _read(path: Path) -> Any:
    return read_torch_file(path, extra_globals=_STAND_INS)


def _not_a_tokenizer(path: Path, raw: Any, weights: Mapping[str, Any] | None) -> ValueError:
    if isinstance(raw, Mapping):
        found = (f"its weights start with {', '.join(list(weights)[:5])}"
                 if weights else f"its top-level keys are {', '.join(map(str, list(raw)[:8]))}")
    else:
        found = f"it holds a {type(raw).__name__}"
    hint = ""
    if weights and any(k.startswith(("model.encoder.layers", "encoder.layers")) for k in weights):
        hint = " It looks like an OFA model checkpoint; give the image tokenizer's file."
    elif weights and "quantize.embedding.weight" in weights:
        hint = (" It has quantize.embedding.weight: a VQModel with a nearest-neighbour "
                "quantizer, not the Gumbel VQGAN OFA uses.")
    return ValueError(
        f"{path}: not a GumbelVQ image-tokenizer checkpoint: expected the keys "
        f"{', '.join(_REQUIRED_KEYS)} (under 'state_dict' in a Lightning .ckpt, under "
        f"'{STATE_DICT_PREFIX}' in one written by ofa-lightning fit); {found}.{hint}")


def read_tokenizer_checkpoint(path: str | Path) -> tuple[VQGANConfig, dict[str, Tensor], str]:
    """(config, GumbelVQ state dict, where the config came from) for any supported file."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".ckpt", ".pt", ".pth"))
        raise ValueError(f"{path}: is a directory; give the checkpoint file"
                         + (f" (it holds {', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image-tokenizer checkpoint (OFA ships it as "
                                f"vqgan/last.ckpt with vqgan/model.yaml)")
    raw = _read(path)
    if not isinstance(raw, Mapping):
        raise _not_a_tokenizer(path, raw, None)
    info = raw.get(TOKENIZER_CHECKPOINT_KEY)
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping):
        raise _not_a_tokenizer(path, raw, None)
    prefix = info.get("prefix", STATE_DICT_PREFIX) if isinstance(info, Mapping) else ""
    weights = {key[len(prefix):]: value for key, value in state.items()
               if isinstance(key, str) and key.startswith(prefix)
               and not key[len(prefix):].startswith(_TRAINING_ONLY_PREFIXES)}
    if not all(key in weights for key in _REQUIRED_KEYS) or not all(
            isinstance(v, Tensor) for v in weights.values()):
        raise _not_a_tokenizer(path, raw, state)
    if isinstance(info, Mapping) and isinstance(info.get("config"), Mapping):
        return VQGANConfig.from_dict(info["config"], where=str(path)), weights, "the checkpoint"
    model_yaml = path.parent / "model.yaml"
    if model_yaml.is_file():
        return _config_from_model_yaml(model_yaml), weights, str(model_yaml)
    return infer_config(weights, where=str(path)), weights, "the weights' shapes"


def _config_from_model_yaml(path: Path) -> VQGANConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    model = data.get("model") if isinstance(data, Mapping) else None
    if not isinstance(model, Mapping) or not isinstance(model.get("params"), Mapping):
        raise ValueError(f"{path}: expected taming's layout, model: {{target: ..., params: "
                         f"{{ddconfig: ..., n_embed: ..., embed_dim: ...}}}}")
    target = str(model.get("target", ""))
    if target and not target.endswith("GumbelVQ"):
        raise ValueError(f"{path}: model.target is {target}; only taming's GumbelVQ (the "
                         f"tokenizer OFA uses) is supported")
    return VQGANConfig.from_taming_params(model["params"], where=str(path))


# =================================================================================== inference
def infer_config(weights: Mapping[str, Tensor], where: str = "state dict") -> VQGANConfig:
    """The architecture the weights were made for, read off their shapes.

    What shapes cannot tell is taken from the release: ``resolution`` (placed so that the
    levels with attention get their nominal side lengths), ``dropout`` 0 and 32 GroupNorm
    groups (a narrow model trained with fewer groups must come with its config).
    """
    def shape(key: str) -> tuple[int, ...]:
        return tuple(weights[key].shape)

    def count(pattern: str) -> int:
        found = {int(m.group(1)) for k in weights if (m := re.match(pattern, k))}
        return max(found) + 1 if found else 0

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count(r"encoder\.down\.(\d+)\.")
    blocks = count(r"encoder\.down\.0\.block\.(\d+)\.")
    if levels < 1 or blocks < 1:
        raise ValueError(f"{where}: no encoder.down.<level>.block.<i> weights; cannot tell "
                         f"the architecture; put a model.yaml beside the checkpoint")
    ch_mult = []
    for level in range(levels):
        width = shape(f"encoder.down.{level}.block.0.conv2.weight")[0]
        if width % ch:
            raise ValueError(f"{where}: encoder level {level} is {width} wide, not a multiple "
                             f"of conv_in's {ch}; not a taming VQGAN layout")
        ch_mult.append(width // ch)
    resolution = 256 if 256 >> (levels - 1) >= 1 else 2 ** (levels - 1)
    attention = [level for level in range(levels)
                 if f"encoder.down.{level}.attn.0.q.weight" in weights]
    values = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, in_channels=in_channels,
                  attn_resolutions=[resolution >> level for level in attention],
                  resolution=resolution, out_ch=shape("decoder.conv_out.weight")[0],
                  z_channels=shape("encoder.conv_out.weight")[0],
                  n_embed=shape("quantize.embed.weight")[0],
                  embed_dim=shape("quantize.embed.weight")[1])
    try:
        return VQGANConfig.from_dict(values, where=where)
    except ValueError as error:
        raise ValueError(f"{error} (inferred from the weights of {where}; put a model.yaml with "
                         f"the architecture beside the checkpoint)") from None


# ===================================================================================== loading
def _check_fits(model: GumbelVQ, weights: Mapping[str, Tensor], path: Path, origin: str) -> None:
    """Strict loading, with a report that lists what differs instead of torch's wall."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [f"{k}: model {tuple(expected[k].shape)}, file {tuple(v.shape)}"
                  for k, v in weights.items() if k in expected and expected[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path}: the weights do not fit the GumbelVQ built from {origin} "
             f"({model.config})"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            lines.append(f"{title} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}")
    raise ValueError("\n".join(lines))


def load_image_tokenizer(path: str | Path, map_location: str = "cpu") -> GumbelVQ:
    """The image tokenizer stored at ``path``, in eval mode, frozen, in float32.

    ``path``: the released ``vqgan/last.ckpt`` (``model.yaml`` beside it is read when present),
    a ``.ckpt`` written by ``ofa-lightning fit --config configs/tokenizer/...``, or a bare
    state dict. The weights must fit exactly (no missing or extra keys).
    """
    path = Path(path).expanduser()
    config, weights, origin = read_tokenizer_checkpoint(path)
    model = GumbelVQ(config)
    _check_fits(model, weights, path, origin)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.requires_grad_(False).eval().to(map_location)


def check_codebook_matches(tokenizer: GumbelVQ, num_codes: int, where: str) -> None:
    """Refuse a tokenizer whose codes the vocabulary cannot spell: every code i becomes the
    token ``<code_i>``, so both sizes must be equal."""
    if tokenizer.n_embed != num_codes:
        tokens = (f"{num_codes} code tokens (<code_0>..<code_{num_codes - 1}>)" if num_codes > 0
                  else "no code tokens")
        raise ValueError(
            f"{where}: the image tokenizer has a codebook of {tokenizer.n_embed} codes, but the "
            f"vocabulary has {tokens}; set "
            f"the datamodule's num_codes to {tokenizer.n_embed} (--data.init_args.num_codes "
            f"{tokenizer.n_embed}) or use the tokenizer the vocabulary was made for")
