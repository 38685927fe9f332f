"""The one configuration object of the OFA network, with the official size presets.

Field names follow the official fairseq arguments where one exists, so that a released
checkpoint's ``cfg["model"]`` maps onto this dataclass without a table of guesses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

# Flags that every released checkpoint was trained with. A checkpoint whose arguments say
# otherwise has a different architecture that this implementation does not reproduce.
_REQUIRED_OFFICIAL_FLAGS = {
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "share_all_embeddings": True,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "code_layernorm_embedding": True,
    "add_type_embedding": True,
    "scale_resids": False,
}


@dataclass
class OFAConfig:
    """Architecture and regularisation of one OFA network.

    The official sizes are available by name (``OFAConfig.from_name("base")``); the small
    presets (``nano``, ``mini``) exist so that a model learns something on a laptop CPU.
    """

    # --- Transformer body --------------------------------------------------------------
    encoder_layers: int = 4
    decoder_layers: int = 4
    embed_dim: int = 256  # one width for encoder, decoder and the shared token embedding
    ffn_dim: int = 1024
    attention_heads: int = 4
    attn_scale_factor: float = 2.0  # scores are scaled by (attn_scale_factor * head_dim) ** -0.5
    # NormFormer extras; every released checkpoint has all three.
    scale_attn: bool = True  # LayerNorm on each attention output
    scale_fc: bool = True  # LayerNorm over the FFN hidden units
    scale_heads: bool = True  # learned per-head output scale ``c_attn``
    layer_norm_eps: float = 1e-5

    # --- Image trunk -------------------------------------------------------------------
    # Any timm model name with a feature map at ``trunk_stride``; the official sizes use the
    # first three stages of resnet50/101/152 (stride 16).
    resnet_type: str = "resnet50"
    trunk_stride: int = 16
    patch_image_size: int = 256  # the image side the data pipeline resizes to
    freeze_bn: bool = False  # BatchNorm as a fixed affine map (official --freeze-resnet)

    # --- Positions ---------------------------------------------------------------------
    max_positions: int = 1024  # text positions, source and target alike
    token_bucket_size: int = 256  # relative text buckets: exact within +-bucket/2, log beyond
    image_bucket_size: int = 42  # the image position grid is image_bucket_size x image_bucket_size
    code_image_size: int = 128  # decoder image-code grid = code_image_size // 8 per side
    # Also add the raw absolute position embeddings to the token and patch embeddings (the
    # official --entangle-position-embedding in the encoder, no --disable-entangle in the
    # decoder). Released checkpoints keep positions as attention biases only (False); without
    # pretraining a small model then has to infer where a patch is from the trunk's padding,
    # which made grounding and left/right questions learn slowly, so nano/mini turn it on.
    entangle_position_embedding: bool = False
    # With entanglement, whether the encoder's text tokens get positions too (the official code
    # adds them). Off, a word embeds the same wherever it stands, so what is learned about
    # "red" in one phrasing carries to others (word order still reaches attention through the
    # position biases). nano/mini keep it off: entangled, nano answered "how many <colour>
    # shapes?" right 99 % of the time but 42 % as "how many many <colour> shapes?"; not, 64 %.
    entangle_source_text: bool = True

    # --- Vocabulary ----------------------------------------------------------------------
    vocab_size: int = 59457
    pad_id: int = 1

    # --- Regularisation -------------------------------------------------------------------
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path_rate: float = 0.0
    decoder_drop_path_rate: float = 0.0
    resnet_drop_path_rate: float = 0.0

    # --- Initialisation (from scratch only; loaded weights replace it) ---------------------
    # std of the normal init of every Linear and Embedding outside the trunk. 0.02 is the
    # official (BERT) value, made for 256-1280 wide models; at 128 dims it leaves attention
    # near uniform for thousands of steps, so the small presets use embed_dim ** -0.5.
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("encoder_layers", "decoder_layers", "embed_dim", "ffn_dim", "attention_heads",
                     "max_positions", "token_bucket_size", "image_bucket_size", "vocab_size",
                     "code_image_size", "trunk_stride", "patch_image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"OFAConfig.{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.attention_heads:
            raise ValueError(
                f"OFAConfig.embed_dim={self.embed_dim} is not divisible by "
                f"attention_heads={self.attention_heads}")
        if self.token_bucket_size % 2:
            raise ValueError(f"OFAConfig.token_bucket_size must be even, got {self.token_bucket_size}")
        if self.code_image_size % 8:
            raise ValueError(f"OFAConfig.code_image_size must be a multiple of 8 (VQGAN f=8), "
                             f"got {self.code_image_size}")
        if self.code_grid_size > self.image_bucket_size:
            raise ValueError(
                f"OFAConfig.code_image_size={self.code_image_size} gives a {self.code_grid_size}-wide "
                f"code grid, more than image_bucket_size={self.image_bucket_size}")
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_drop_path_rate",
                     "decoder_drop_path_rate", "resnet_drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"OFAConfig.{name} must lie in [0, 1), got {value!r}")
        if not self.init_std > 0:
            raise ValueError(f"OFAConfig.init_std must be positive, got {self.init_std!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"OFAConfig.pad_id={self.pad_id} is outside the vocabulary "
                             f"(vocab_size={self.vocab_size})")

    # --- Derived sizes ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    @property
    def code_grid_size(self) -> int:
        """Side of the decoder's image-code grid (VQGAN downsamples by 8)."""
        return self.code_image_size // 8

    @property
    def num_image_positions(self) -> int:
        """Rows of the image position table: the grid plus the reserved id 0."""
        return self.image_bucket_size ** 2 + 1

    # --- Construction ----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "OFAConfig":
        """A preset by name, optionally with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown OFA preset {name!r}; known presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides: Any) -> "OFAConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown OFAConfig field(s) {sorted(unknown)}; "
                             f"fields are {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OFAConfig":
        return cls().replace(**dict(values))

    def function_differences(self, other: "OFAConfig") -> list[str]:
        """``"field: ours -> theirs"`` for every field, besides the regularisation and the
        from-scratch init, whose change makes the same weights compute something else. A
        preset can change between releases, and weights trained under its old values would
        otherwise be resumed or fine-tuned under the new ones without a word."""
        return [f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self)
                if f.name not in _WEIGHT_NEUTRAL_FIELDS
                and getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_official_args(cls, args: Any) -> "OFAConfig":
        """Read the architecture from a fairseq checkpoint's ``cfg["model"]``.

        ``args`` is the argparse Namespace (or an equivalent mapping) the official trainer
        stored. Flags that change the architecture in ways this implementation does not
        reproduce are refused with the flag's name.
        """
        values = dict(args) if isinstance(args, Mapping) else dict(vars(args))
        arch = values.get("arch", "")
        base = _OFFICIAL_ARCH_PRESET.get(arch)
        config = PRESETS[base] if base else cls()
        for flag, expected in _REQUIRED_OFFICIAL_FLAGS.items():
            found = values.get(flag)
            if flag in values and bool(found) != expected:
                raise ValueError(
                    f"official checkpoint argument {flag}={found!r} (arch {arch!r}) describes an "
                    f"architecture ofa-lightning does not implement; released checkpoints use "
                    f"{flag}={expected}")
        if values.get("encoder_embed_dim", config.embed_dim) != values.get(
                "decoder_embed_dim", values.get("encoder_embed_dim", config.embed_dim)):
            raise ValueError("official checkpoint has encoder_embed_dim != decoder_embed_dim; "
                             "shared embeddings need them equal")
        mapping = {
            "encoder_layers": "encoder_layers",
            "decoder_layers": "decoder_layers",
            "encoder_embed_dim": "embed_dim",
            "encoder_ffn_embed_dim": "ffn_dim",
            "encoder_attention_heads": "attention_heads",
            "attn_scale_factor": "attn_scale_factor",
            "scale_attn": "scale_attn",
            "scale_fc": "scale_fc",
            "scale_heads": "scale_heads",
            "resnet_type": "resnet_type",
            "patch_image_size": "patch_image_size",
            "freeze_resnet": "freeze_bn",
            "max_source_positions": "max_positions",
            "token_bucket_size": "token_bucket_size",
            "image_bucket_size": "image_bucket_size",
            "code_image_size": "code_image_size",
            "dropout": "dropout",
            "attention_dropout": "attention_dropout",
            "activation_dropout": "activation_dropout",
            "encoder_drop_path_rate": "encoder_drop_path_rate",
            "decoder_drop_path_rate": "decoder_drop_path_rate",
            "resnet_drop_path_rate": "resnet_drop_path_rate",
        }
        # store_true switches: a stored None means the flag was not given, i.e. False
        switches = {"scale_attn", "scale_fc", "scale_heads", "freeze_resnet"}
        overrides: dict[str, Any] = {}
        for official, ours in mapping.items():
            if official in switches and official in values:
                overrides[ours] = bool(values[official])
            elif values.get(official) is not None:
                overrides[ours] = values[official]
        overrides["entangle_position_embedding"] = _official_entangle(values, arch)
        if "attn_scale_factor" in overrides:
            overrides["attn_scale_factor"] = float(overrides["attn_scale_factor"])
        return dataclasses.replace(config, **overrides)


def _official_entangle(values: Mapping[str, Any], arch: str) -> bool:
    """The official code has two switches: the encoder adds positions to the embeddings with
    ``entangle_position_embedding``, the decoder unless ``disable_entangle`` (its test reads
    ``entangle_position_embedding is not None``, true for False too). Released checkpoints
    set neither in the encoder and disable it in the decoder; a missing flag means that."""
    encoder = bool(values.get("entangle_position_embedding"))
    decoder = not values.get("disable_entangle", True)
    if encoder != decoder:
        raise ValueError(
            f"official checkpoint (arch {arch!r}) adds position embeddings to the tokens in the "
            f"{'encoder' if encoder else 'decoder'} only (entangle_position_embedding="
            f"{values.get('entangle_position_embedding')!r}, disable_entangle="
            f"{values.get('disable_entangle')!r}); ofa-lightning's entangle_position_embedding "
            f"does both or neither")
    return encoder


# Fields that do not change what trained weights compute: dropout and drop-path rates apply
# only while training, init_std only before any weights are loaded.
_WEIGHT_NEUTRAL_FIELDS = frozenset({
    "dropout", "attention_dropout", "activation_dropout", "encoder_drop_path_rate",
    "decoder_drop_path_rate", "resnet_drop_path_rate", "init_std"})

_OFFICIAL_ARCH_PRESET = {f"ofa_{size}": size for size in ("tiny", "medium", "base", "large", "huge")}


def _official(layers: tuple[int, int], dim: int, heads: int, resnet: str) -> OFAConfig:
    return OFAConfig(encoder_layers=layers[0], decoder_layers=layers[1], embed_dim=dim,
                     ffn_dim=4 * dim, attention_heads=heads, resnet_type=resnet)


PRESETS: dict[str, OFAConfig] = {
    # The official architectures (models/ofa/ofa.py), with the flags of the released checkpoints.
    "tiny": _official((4, 4), 256, 4, "resnet50"),
    "medium": _official((4, 4), 512, 8, "resnet101"),
    "base": _official((6, 6), 768, 12, "resnet101"),
    "large": _official((12, 12), 1024, 16, "resnet152"),
    "huge": _official((24, 12), 1280, 16, "resnet152"),
    # Small presets for CPU experiments: a light trunk cut at stride 8, so that 64-96 px
    # images still give an 8x8-12x12 patch grid. vocab_size is normally linked from the
    # tokenizer the run builds.
    # nano's resnet10t (a 3x3-conv stem, one block per stage) learns shapes faster than
    # resnet18's 7x7 stem and costs less per step.
    "nano": OFAConfig(encoder_layers=2, decoder_layers=2, embed_dim=128, ffn_dim=512,
                      attention_heads=4, resnet_type="resnet10t", trunk_stride=8,
                      patch_image_size=64, init_std=128 ** -0.5,
                      entangle_position_embedding=True, entangle_source_text=False),
    "mini": OFAConfig(encoder_layers=3, decoder_layers=3, embed_dim=256, ffn_dim=1024,
                      attention_heads=4, resnet_type="resnet18", trunk_stride=8,
                      patch_image_size=96, init_std=256 ** -0.5,
                      entangle_position_embedding=True, entangle_source_text=False),
}
