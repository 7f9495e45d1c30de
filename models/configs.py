"""Architecture configs for the Stable Diffusion UNet and VAE.

Frozen dataclasses with every list normalised to a per-block tuple. Build them by name
(`unet_config("sdxl-base")`) or from a diffusers `config.json` (`UNetConfig.from_dict(d)`),
which refuses any field value this library does not implement instead of silently ignoring it.

Naming: diffusers' `attention_head_dim` is really the *number of heads* for the cross-attention
blocks (a historical naming bug); here it is resolved into `num_heads`, and the head size is
`channels // num_heads`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


class UnsupportedConfigError(ValueError):
    """A config names an architecture or option that renoise does not implement."""


def _present(d: dict, names) -> dict:
    """The fields of a diffusers config dict that are set (not None); a [h, w] sample_size keeps h."""
    kw = {f: d[f] for f in names if d.get(f) is not None}
    if isinstance(kw.get("sample_size"), (list, tuple)):
        kw["sample_size"] = kw["sample_size"][0]
    return kw


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel-compatible architecture (SD 1.x, 2.x, SDXL, LCM)."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)              # per down block; up blocks use it reversed
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    reverse_transformer_layers_per_block: tuple[int, ...] | None = None   # up blocks; None: reversed down
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    time_embedding_dim: int | None = None                   # None: 4 * block_out_channels[0]
    time_cond_proj_dim: int | None = None                   # LCM guidance embedding size
    addition_embed_type: str | None = None                  # None | "text_time" (SDXL)
    addition_time_embed_dim: int | None = None              # SDXL: 256
    projection_class_embeddings_input_dim: int | None = None  # SDXL: 2816
    sample_size: int = 64

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block", "num_heads",
                     "transformer_layers_per_block"):
            if len(getattr(self, name)) != n:
                raise UnsupportedConfigError(
                    f"UNet config: {name} has {len(getattr(self, name))} entries but "
                    f"block_out_channels has {n}; give one per block")
        if self.reverse_transformer_layers_per_block is not None and \
                len(self.reverse_transformer_layers_per_block) != n:
            raise UnsupportedConfigError("UNet config: reverse_transformer_layers_per_block needs one entry per block")
        for t in self.down_block_types:
            if t not in UNET_DOWN_BLOCKS:
                raise UnsupportedConfigError(f"unknown UNet down block type {t!r}; supported: {UNET_DOWN_BLOCKS}")
        for t in self.up_block_types:
            if t not in UNET_UP_BLOCKS:
                raise UnsupportedConfigError(f"unknown UNet up block type {t!r}; supported: {UNET_UP_BLOCKS}")
        for c, h, t in zip(self.block_out_channels, self.num_heads, self.down_block_types):
            if c % self.norm_num_groups or (c % h and (t.startswith("CrossAttn") or c == self.block_out_channels[-1])):
                raise UnsupportedConfigError(
                    f"UNet config: {c} channels must be divisible by norm_num_groups "
                    f"{self.norm_num_groups} (and by the head count {h} in attention blocks)")
        if self.addition_embed_type not in (None, "text_time"):
            raise UnsupportedConfigError(
                f"unsupported addition_embed_type {self.addition_embed_type!r}; only 'text_time' (SDXL) is implemented")
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
            raise UnsupportedConfigError("UNet config: 'text_time' needs addition_time_embed_dim and "
                                         "projection_class_embeddings_input_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def up_transformer_layers(self) -> tuple[int, ...]:
        if self.reverse_transformer_layers_per_block is not None:
            return self.reverse_transformer_layers_per_block
        return tuple(reversed(self.transformer_layers_per_block))

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Read a diffusers UNet2DConditionModel `config.json` dict."""
        _check_class(d, "UNet2DConditionModel", "UNet")
        _check_unsupported(d, _UNET_FIXED, "UNet")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        trans = d.get("transformer_layers_per_block", 1)
        if isinstance(trans, (list, tuple)) and trans and isinstance(trans[0], (list, tuple)):
            raise UnsupportedConfigError("UNet config: nested (per-layer) transformer_layers_per_block "
                                         "is not supported")
        rev = d.get("reverse_transformer_layers_per_block")
        if rev is not None:
            if any(isinstance(r, (list, tuple)) and len(set(r)) > 1 for r in rev):
                raise UnsupportedConfigError("UNet config: reverse_transformer_layers_per_block with "
                                             "different depths inside one block is not supported")
            rev = tuple(r[0] if isinstance(r, (list, tuple)) else r for r in rev)
        cross = d.get("cross_attention_dim", 768)
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise UnsupportedConfigError("UNet config: per-block cross_attention_dim is not supported")
            cross = cross[0]
        kw = dict(
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            down_block_types=tuple(d.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
            layers_per_block=_per_block(d.get("layers_per_block", 2), n),
            num_heads=_per_block(heads, n),
            transformer_layers_per_block=_per_block(trans, n),
            reverse_transformer_layers_per_block=rev,
            cross_attention_dim=int(cross),
        )
        for f in ("use_linear_projection", "upcast_attention"):
            kw[f] = bool(d.get(f) or False)
        kw.update(_present(d, ("in_channels", "out_channels", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
                               "freq_shift", "downsample_padding", "mid_block_scale_factor", "time_embedding_dim",
                               "time_cond_proj_dim", "addition_embed_type", "addition_time_embed_dim",
                               "projection_class_embeddings_input_dim", "sample_size")))
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL architecture; `scaled = (raw - shift_factor) * scaling_factor`."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    force_upcast: bool = False          # the weights overflow in fp16: run in fp32 (SDXL VAE)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    def __post_init__(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise UnsupportedConfigError(
                    f"VAE config: {c} channels not divisible by norm_num_groups {self.norm_num_groups}")

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """Read a diffusers AutoencoderKL `config.json` dict."""
        _check_class(d, "AutoencoderKL", "VAE")
        _check_unsupported(d, _VAE_FIXED, "VAE")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = d.get(key, [block] * n)
            if any(t != block for t in types) or len(types) != n:
                raise UnsupportedConfigError(f"VAE config: {key}={types} unsupported; expected {n} x {block!r}")
        kw = {"block_out_channels": tuple(d.get("block_out_channels", cls.block_out_channels))}
        kw.update(_present(d, ("layers_per_block", "in_channels", "out_channels", "latent_channels",
                               "norm_num_groups", "scaling_factor", "shift_factor", "force_upcast", "use_quant_conv",
                               "use_post_quant_conv", "mid_block_add_attention", "sample_size")))
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields of diffusers configs that must keep their default value (the features they switch on
# are not implemented). Values are the accepted ones.
_UNET_FIXED = {
    "act_fn": ("silu",), "center_input_sample": (False,), "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "class_embed_type": (None,), "num_class_embeds": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "only_cross_attention": (False,), "dual_cross_attention": (False,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "cross_attention_norm": (None,), "attention_type": ("default",), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
}
_VAE_FIXED = {"act_fn": ("silu",), "latents_mean": (None,), "latents_std": (None,)}


def _check_class(d: dict, expected: str, what: str):
    name = d.get("_class_name", expected)
    if name != expected:
        raise UnsupportedConfigError(
            f"unknown {what} architecture {name!r}: renoise implements {expected} only")


def _check_unsupported(d: dict, fixed: dict, what: str):
    for key, allowed in fixed.items():
        if key in d and d[key] not in allowed:
            raise UnsupportedConfigError(
                f"unsupported {what} config: {key}={d[key]!r} (renoise implements {key} in {allowed})")


def _per_block(v, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n


_SD1 = UNetConfig()
_SD2 = dataclasses.replace(_SD1, num_heads=(5, 10, 20, 20), cross_attention_dim=1024,
                           use_linear_projection=True, upcast_attention=True, sample_size=96)
_SDXL = UNetConfig(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=(2, 2, 2), num_heads=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)

# sd21-base and sd-turbo: upcast_attention not verified from their files (FACTS.md); it does not
# change results here because SDPA accumulates in fp32 on every backend.
UNET_CONFIGS = {
    "sd14": _SD1, "sd15": _SD1,
    "sd21": _SD2, "sd21-base": dataclasses.replace(_SD2, sample_size=64),
    "sd-turbo": dataclasses.replace(_SD2, sample_size=64),
    "sdxl-base": _SDXL, "sdxl-turbo": dataclasses.replace(_SDXL, sample_size=64),
}
_VAE_SD = VAEConfig()
_VAE_XL = VAEConfig(scaling_factor=0.13025, force_upcast=True, sample_size=1024)
VAE_CONFIGS = {
    "sd14": _VAE_SD, "sd15": _VAE_SD, "sd21": dataclasses.replace(_VAE_SD, sample_size=768),
    "sd21-base": _VAE_SD, "sd-turbo": _VAE_SD, "sdxl-base": _VAE_XL, "sdxl-turbo": _VAE_XL,
}


def unet_config(name: str) -> UNetConfig:
    """The UNet config of a known architecture ("sd15", "sdxl-turbo", ...)."""
    return _lookup(UNET_CONFIGS, name, "UNet")


def vae_config(name: str) -> VAEConfig:
    """The VAE config of a known architecture ("sd15", "sdxl-turbo", ...)."""
    return _lookup(VAE_CONFIGS, name, "VAE")


def _lookup(table: dict, name: str, what: str):
    key = name.lower().replace("_", "-")
    if key not in table:
        raise UnsupportedConfigError(f"unknown {what} architecture {name!r}; known: {sorted(table)}")
    return table[key]


def read_config(path) -> dict:
    """Read a `config.json` file into a dict, with a clear error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None

# The 16-channel VAE of the flow models (SD3 / SD3.5 and FLUX.1; FACTS-FLOW.md §VAE): SDXL's VAE
# layout with 16 latent channels, no quant convs, scaled = (raw - shift_factor) · scaling_factor.
_VAE_SD3 = dataclasses.replace(_VAE_XL, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                               use_quant_conv=False, use_post_quant_conv=False)
_VAE_FLUX = dataclasses.replace(_VAE_SD3, scaling_factor=0.3611, shift_factor=0.1159)
VAE_CONFIGS.update({
    "sd3": _VAE_SD3, "sd3-medium": _VAE_SD3, "sd35-large": _VAE_SD3, "sd35-large-turbo": _VAE_SD3,
    "sd35-medium": _VAE_SD3, "flux": _VAE_FLUX, "flux-dev": _VAE_FLUX, "flux-schnell": _VAE_FLUX,
})
