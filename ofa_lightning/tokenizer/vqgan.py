"""OFA's image tokenizer: taming-transformers' Gumbel VQGAN (``GumbelVQ``), written from its
description.

OFA turns an image into a grid of discrete codes with the released "VQGAN OpenImages (f=8),
8192, GumbelQuantization" checkpoint, and turns generated codes back into pixels with the same
network. Module and parameter names follow that checkpoint (``encoder.down.0.block.1.conv2``,
``quantize.embed`` ...), so its state dict loads strictly, with no renaming table.

The pieces, for a ``(B, 3, H, W)`` image in [-1, 1] and f = ``downsample``:

    encoder -> quant_conv -> h (B, embed_dim, H/f, W/f) -> quantize.proj -> code logits
    (B, n_embed, H/f, W/f) -> codes (B, H/f, W/f) -> quantize.embed -> z_q -> post_quant_conv
    -> decoder -> image (B, 3, H, W), not clamped

Codes are ``argmax(logits)`` by default. The official ``GumbelVQ.encode`` that produced OFA's
training codes *samples* even in eval mode (``F.gumbel_softmax`` always adds noise): it picks
``argmax(logits - log E)`` with ``E ~ Exp(1)`` drawn from torch's RNG, which
``encode_codes(sample=True, generator=...)`` reproduces draw for draw.

No Lightning, no I/O here: ``loading.py`` reads checkpoints, ``training.py`` trains.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VQGANConfig", "GumbelVQ", "VQOutput", "Encoder", "Decoder", "GumbelQuantize",
           "ResnetBlock", "AttnBlock"]

# The pixel range images must come in; values far outside it mean [0, 255] (or another
# normalisation) slipped through, which the network would silently turn into garbage codes.
_PIXEL_LIMIT = 1.5


# ===================================================================================== config
@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of a GumbelVQ: taming's ``ddconfig`` fields plus the quantizer's sizes.

    The defaults are the released ``vqgan_gumbel_f8`` (``model.yaml``); presets by name come
    from ``VQGANConfig.from_name``.
    """

    # --- encoder / decoder (taming's ddconfig) -------------------------------------------
    ch: int = 128                                  # width of the first level
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)        # width multiplier per level; f = 2**(levels-1)
    num_res_blocks: int = 2                        # ResnetBlocks per encoder level (decoder: +1)
    attn_resolutions: tuple[int, ...] = (32,)      # levels (by side length) that get attention
    resolution: int = 256                          # only places the attention levels
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 256                          # encoder output / decoder input width
    double_z: bool = False                         # must stay False for GumbelVQ
    dropout: float = 0.0
    # --- quantizer -------------------------------------------------------------------------
    n_embed: int = 8192                            # codebook size
    embed_dim: int = 256                           # code vector width; must equal z_channels
    # --- ours (not in taming's config) ---------------------------------------------------
    norm_groups: int = 32                          # GroupNorm groups; taming hard-codes 32

    def __post_init__(self) -> None:
        # YAML and JSON give lists; tuples keep the config hashable and comparable
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"VQGANConfig.{name} must be a list of ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("ch", "num_res_blocks", "resolution", "in_channels", "out_ch",
                     "z_channels", "n_embed", "embed_dim", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VQGANConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"VQGANConfig.ch_mult must be a non-empty list of positive ints, "
                             f"got {list(self.ch_mult)}")
        if self.double_z:
            raise ValueError("VQGANConfig.double_z=True is for taming's KL autoencoders; GumbelVQ "
                             "feeds the encoder output (z_channels wide) to quant_conv, so it must "
                             "be False")
        if self.embed_dim != self.z_channels:
            raise ValueError(
                f"VQGANConfig.embed_dim={self.embed_dim} must equal z_channels={self.z_channels}: "
                f"taming builds the quantizer's proj for z_channels inputs but applies it to "
                f"quant_conv's embed_dim-wide output (both are 256 in the release)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VQGANConfig.dropout must lie in [0, 1), got {self.dropout}")
        widths = sorted({self.ch, *(self.ch * m for m in self.ch_mult)})
        if any(w % self.norm_groups for w in widths):
            raise ValueError(
                f"VQGANConfig: GroupNorm with norm_groups={self.norm_groups} needs every width to "
                f"be a multiple of it, but ch={self.ch} and ch_mult={list(self.ch_mult)} give "
                f"widths {widths}; change ch or lower norm_groups")
        levels = self.level_resolutions
        unused = [r for r in self.attn_resolutions if r not in levels]
        if unused:
            raise ValueError(
                f"VQGANConfig.attn_resolutions={list(self.attn_resolutions)}: {unused} is no "
                f"level's side length; with resolution={self.resolution} and "
                f"{len(self.ch_mult)} levels they are {list(levels)}")

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side (8 for the release)."""
        return 2 ** (self.num_levels - 1)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Nominal side length of each level, which decides where attention goes."""
        return tuple(self.resolution // 2 ** i for i in range(self.num_levels))

    def has_attention(self, level: int) -> bool:
        return self.level_resolutions[level] in self.attn_resolutions

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "VQGANConfig":
        """A preset by name, with some fields replaced; an unknown name lists the known ones."""
        if name not in PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides}, where=f"preset {name!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> "VQGANConfig":
        """From ``to_dict()`` output or a YAML mapping; unknown fields are named, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown VQGANConfig field(s) {', '.join(unknown)}; "
                             f"fields: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_taming_params(cls, params: Mapping[str, Any], where: str = "model.yaml"
                           ) -> "VQGANConfig":
        """From taming's ``model.params`` (``ddconfig`` + ``n_embed`` + ``embed_dim``); the
        training-only entries (loss, temperature schedule, kl_weight) are not architecture."""
        ddconfig = params.get("ddconfig")
        missing = [k for k in ("n_embed", "embed_dim") if k not in params]
        if not isinstance(ddconfig, Mapping) or missing:
            raise ValueError(f"{where}: model.params needs ddconfig, n_embed and embed_dim; "
                             f"found {', '.join(map(str, params)) or 'nothing'}")
        return cls.from_dict({**ddconfig, "n_embed": params["n_embed"],
                              "embed_dim": params["embed_dim"]}, where=where)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, not tuples), so the weights-only unpickler accepts it."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "VQGANConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # the released vqgan_gumbel_f8 that OFA uses: 68,995,971 parameters
    "vqgan_gumbel_f8": {},
    # a few-minute CPU tokenizer for 64x64 ShapesWorld images: 8x8 codes, 512-entry codebook
    "shapes_f8": dict(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(),
                      resolution=64, z_channels=64, embed_dim=64, n_embed=512, norm_groups=8),
}


# ==================================================================================== layers
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        n = self.norm(x)
        q, k, v = (conv(n).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C), scale 1/sqrt(C)
        attended = attended.transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve the side: pad one pixel right and bottom, then a stride-2 3x3 conv (taming's
    asymmetric padding, which the weights were trained with)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the side: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the coarsest level (encoder and decoder alike)."""

    def __init__(self, channels: int, config: VQGANConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config.dropout, config.norm_groups)
        self.attn_1 = AttnBlock(channels, config.norm_groups)
        self.block_2 = ResnetBlock(channels, channels, config.dropout, config.norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ResnetBlocks, each followed by attention where the config puts
    it, then an optional resampling (``downsample`` in the encoder, ``upsample`` in the
    decoder; the attribute name is the checkpoint's)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, attention: bool,
                 config: VQGANConfig) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * blocks
        self.block = nn.ModuleList(
            ResnetBlock(widths[i], out_channels, config.dropout, config.norm_groups)
            for i in range(blocks))
        self.attn = nn.ModuleList(
            AttnBlock(out_channels, config.norm_groups) for _ in range(blocks if attention else 0))

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


# ================================================================================ networks
class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, z_channels, H/f, W/f)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            level = _Level(config.ch if i == 0 else widths[i - 1], width, config.num_res_blocks,
                           config.has_attention(i), config)
            if i < config.num_levels - 1:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = _Mid(widths[-1], config)
        self.norm_out = _norm(widths[-1], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); no output squashing.

    ``up[i]`` is level i as in the encoder, but the levels run coarsest first, so level i
    takes the width of level i+1 and ends with an ``upsample`` (except level 0).
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = _Mid(widths[-1], config)
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):
            incoming = widths[min(i + 1, config.num_levels - 1)]
            level = _Level(incoming, width, config.num_res_blocks + 1, config.has_attention(i),
                           config)
            if i > 0:
                level.upsample = Upsample(width)
            self.up.append(level)
        self.norm_out = _norm(widths[0], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class GumbelQuantize(nn.Module):
    """Code logits from features (``proj``) and the codebook (``embed``)."""

    def __init__(self, in_channels: int, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> code vectors (B, embed_dim, h, w); an exact gather."""
        return self.embed(codes).permute(0, 3, 1, 2)

    def relaxed(self, logits: Tensor, temperature: float, hard: bool,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Differentiable code vectors for training: Gumbel-softmax over the codebook.

        With ``hard`` the forward pass uses one-hot codes and the gradient flows through the
        soft weights (straight-through, as the released model was trained).
        Returns (z_q (B, embed_dim, h, w), weights (B, n_embed, h, w)).
        """
        noise = torch.empty_like(logits).exponential_(generator=generator).log()
        soft = F.softmax((logits - noise) / temperature, dim=1)  # (B, n_embed, h, w)
        weights = soft
        if hard:
            one_hot = torch.zeros_like(soft).scatter_(1, soft.argmax(1, keepdim=True), 1.0)
            weights = one_hot - soft.detach() + soft
        z_q = torch.einsum("bnhw,nd->bdhw", weights, self.embed.weight)
        return z_q, weights


class VQOutput(NamedTuple):
    """What a training forward pass gives: the reconstruction and what the losses need."""

    reconstruction: Tensor  # (B, out_ch, H, W)
    logits: Tensor          # (B, n_embed, h, w)
    codes: Tensor           # (B, h, w), the codes the forward pass used
    kl: Tensor              # scalar: KL(softmax(logits) || uniform), mean over positions


class GumbelVQ(nn.Module):
    """The image tokenizer: images <-> code grids.

    ``encode_codes`` and ``decode_codes`` are the interface tasks use; ``forward`` is the
    training pass (``training.py``).
    """

    def __init__(self, config: VQGANConfig | None = None) -> None:
        super().__init__()
        self.config = config or VQGANConfig()
        c = self.config
        # registration order = the released state dict's key order
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = GumbelQuantize(c.embed_dim, c.n_embed, c.embed_dim)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    @property
    def n_embed(self) -> int:
        """Codebook size: the number of distinct codes (and of ``<code_i>`` tokens)."""
        return self.config.n_embed

    @property
    def downsample(self) -> int:
        """Pixels per code along each side: a H x W image gives (H/f) x (W/f) codes."""
        return self.config.downsample

    # --- encoding ------------------------------------------------------------------------------
    def check_images(self, images: Tensor, caller: str = "encode_codes") -> None:
        """Refuse inputs the network would silently mis-tokenize, saying how to fix them."""
        c, f = self.config, self.downsample
        if images.dim() != 4 or images.shape[1] != c.in_channels:
            raise ValueError(f"{caller}: expected images of shape (B, {c.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{caller}: expected float images in [-1, 1], got {images.dtype}; "
                             f"convert uint8 pixels with 2 * (x / 255) - 1")
        height, width = images.shape[-2:]
        if height < f or width < f or height % f or width % f:
            fix = (f"resize to at least {f}x{f}" if height < f or width < f else
                   f"resize or crop to multiples of {f}, e.g. {max(f, height // f * f)}x"
                   f"{max(f, width // f * f)}")
            raise ValueError(f"{caller}: image size {height}x{width} is not a positive multiple "
                             f"of the tokenizer's downsampling factor {f}; {fix}")
        if images.numel() and images.detach().abs().amax().item() > _PIXEL_LIMIT:
            raise ValueError(f"{caller}: pixel values reach {images.abs().amax().item():.3g}; "
                             f"the tokenizer expects images scaled to [-1, 1] "
                             f"(2 * (x / 255) - 1 for uint8 pixels)")

    def encode_prequant(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> quantizer input h (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(images))

    def code_logits(self, images: Tensor) -> Tensor:
        """Images -> unnormalised code scores (B, n_embed, H/f, W/f)."""
        return self.quantize.proj(self.encode_prequant(images))

    def encode_codes(self, images: Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f), int64 in [0, n_embed).

        ``sample=False``: the most likely code, deterministic. ``sample=True``: what the
        official ``GumbelVQ.encode`` computes (and OFA's data was made with): one Gumbel
        sample at temperature 1, from ``generator`` or else torch's global RNG.
        """
        self.check_images(images)
        with torch.no_grad():
            logits = self.code_logits(images)  # (B, n_embed, h, w)
            if sample:
                noise = torch.empty_like(logits).exponential_(generator=generator)
                logits = logits - noise.log()
            return logits.argmax(1)

    # --- decoding ------------------------------------------------------------------------------
    def check_codes(self, codes: Tensor, caller: str = "decode_codes") -> None:
        if codes.dim() != 3:
            raise ValueError(f"{caller}: expected codes of shape (B, h, w), got "
                             f"{tuple(codes.shape)}; reshape a flat row-major sequence with "
                             f".view(B, h, w)")
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{caller}: expected integer codes, got {codes.dtype}")
        if codes.numel():
            low, high = codes.min().item(), codes.max().item()
            if low < 0 or high >= self.n_embed:
                raise ValueError(
                    f"{caller}: codes range over [{low}, {high}], but the codebook has "
                    f"{self.n_embed} entries (0..{self.n_embed - 1}); vocabulary token ids must "
                    f"first be turned into code indices (token - vocab.code_id(0))")

    def codebook_lookup(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> code vectors z_q (B, embed_dim, h, w)."""
        return self.quantize.lookup(codes.long())

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Code vectors (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> images (B, 3, h*f, w*f), on the [-1, 1] scale but not clamped
        (clamp before turning them into pixels)."""
        self.check_codes(codes)
        return self.decode_latents(self.codebook_lookup(codes))

    # --- training --------------------------------------------------------------------------------
    def forward(self, images: Tensor, temperature: float = 1.0, hard: bool = True,
                generator: torch.Generator | None = None) -> VQOutput:
        """Reconstruct through a Gumbel-softmax relaxation of the codes (training only; use
        ``encode_codes``/``decode_codes`` to tokenize)."""
        logits = self.code_logits(images)  # (B, n_embed, h, w)
        z_q, weights = self.quantize.relaxed(logits, temperature, hard, generator)
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || uniform) = sum q log q + log n: pushes towards using the whole codebook
        kl = (log_q.exp() * log_q).sum(1).mean() + math.log(self.n_embed)
        return VQOutput(self.decode_latents(z_q), logits, weights.argmax(1), kl)
