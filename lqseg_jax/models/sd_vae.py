"""Stable Diffusion VAE encoder (diffusers `AutoencoderKL`: encoder + quant_conv) in Flax NNX, NHWC.

RASS only encodes (the decoder is never run), so the decoder and post_quant_conv are not built; the
converter skips their keys. `AutoencoderKL.encode` returns the diagonal-Gaussian posterior and the output
of every encoder down block (RASS keeps index 1, 256 ch at stride 4, and index 3, 512 ch at stride 8:
Ka1Guan/RASS restoration_adaptation/models/vae.py + ras.py). RASS's latent is a posterior SAMPLE times
`scaling_factor` (0.18215 for SD), in training and in evaluation: `AutoencoderKL.latents`.

Attribute names mirror diffusers (`encoder.down_blocks.0.resnets.0.conv1`,
`encoder.mid_block.attentions.0.to_q`, `quant_conv`, ...). GroupNorm and the attention softmax run in fp32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lqseg_jax.models.sd_unet import Attention, Downsample2D, GroupNorm, ResnetBlock2D, conv2d

Dtype = Any

# stabilityai/stable-diffusion-2-1-base, vae/config.json (83,653,863 parameters in all; encoder +
# quant_conv 34,163,664).
SD21_BASE_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": [
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
    ],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}

# Fields of the decoder side or of other pipelines: they do not change the encoder.
_DECODER_ONLY = (
    "out_channels",
    "up_block_types",
    "use_post_quant_conv",
    "force_upcast",
    "latents_mean",
    "latents_std",
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config fields that shape the encoder (same names)."""

    in_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers config dict (`vae/config.json`); '_' keys and decoder-only fields are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _DECODER_ONLY:
                continue
            if key not in fields:
                raise ValueError(f"VAE config: unknown field '{key}' (not a diffusers AutoencoderKL field)")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def __post_init__(self):
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"VAE config: {len(self.down_block_types)} down_block_types but "
                f"{len(self.block_out_channels)} block_out_channels"
            )
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ValueError(
                    f"VAE config: down block type '{t}' not supported (expected 'DownEncoderBlock2D')"
                )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"VAE config: act_fn '{self.act_fn}' not supported (expected 'silu')")
        if self.shift_factor is not None:
            raise ValueError(f"VAE config: shift_factor {self.shift_factor} not supported (SD uses None)")


class Posterior(NamedTuple):
    """diffusers DiagonalGaussianDistribution: mean and log-variance (clipped to [-30, 20]), NHWC."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class DownEncoderBlock2D(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_downsample: bool,
        groups: int,
        dtype,
        rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=None,
                    groups=groups,
                    eps=1e-6,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        # The VAE downsamples with padding 0: torch pads (0, 1, 0, 1) before a stride-2 3x3 conv.
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, None)  # (b, h, w, out)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (b, h/2, w/2, out)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet, single-head self-attention with GroupNorm and residual, resnet (VAE mid block)."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype, rngs):
        res = dict(temb_channels=None, groups=groups, eps=1e-6, dtype=dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(channels, channels, **res), ResnetBlock2D(channels, channels, **res)]
        )
        attn = (
            Attention(
                channels,
                heads=1,
                dim_head=channels,
                bias=True,
                norm_num_groups=groups,
                eps=1e-6,
                residual_connection=True,
                dtype=dtype,
                rngs=rngs,
            )
            if add_attention
            else None
        )
        self.attentions = nnx.List([attn])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x, None)  # (b, h, w, c)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)  # (b, h, w, c)
        return self.resnets[1](x, None)  # (b, h, w, c)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        ch = cfg.block_out_channels
        groups = cfg.norm_num_groups
        self.conv_in = conv2d(cfg.in_channels, ch[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    ch[max(i - 1, 0)],
                    ch[i],
                    num_layers=cfg.layers_per_block,
                    add_downsample=i < len(ch) - 1,
                    groups=groups,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = UNetMidBlock2D(
            ch[-1], groups=groups, add_attention=cfg.mid_block_add_attention, dtype=dtype, rngs=rngs
        )
        self.conv_norm_out = GroupNorm(ch[-1], groups, 1e-6, rngs=rngs)
        self.conv_out = conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        x = self.conv_in(x)  # (b, h, w, c0)
        features = []
        for block in self.down_blocks:
            x = block(x)  # (b, h_i, w_i, c_i)
            features.append(x)
        x = self.mid_block(x)  # (b, h', w', c_last)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # (b, h', w', 2*latent)
        return x, features


class AutoencoderKL(nnx.Module):
    """The encoder half of diffusers AutoencoderKL: `encoder` and `quant_conv`.

    Input: images NHWC in [-1, 1] with `in_channels` channels.
    """

    def __init__(self, config: VAEConfig | Mapping[str, Any], *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        self.config = cfg
        self.dtype = dtype
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        lat2 = 2 * cfg.latent_channels
        self.quant_conv = conv2d(lat2, lat2, 1, dtype=dtype, rngs=rngs) if cfg.use_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[Posterior, list[jax.Array]]:
        """Images (b, h, w, in_channels) -> (posterior at stride 2^(blocks-1), [down-block outputs])."""
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"AutoencoderKL.encode: images must be NHWC with {self.config.in_channels} channels, got {x.shape}"
            )
        moments, features = self.encoder(x.astype(self.dtype))  # (b, h', w', 2*latent)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)  # (b, h', w', 2*latent)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # (b, h', w', latent) x 2
        return Posterior(mean, jnp.clip(logvar, -30.0, 20.0)), features

    def latents(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """RASS's latent: posterior sample x scaling_factor, and the down-block features."""
        posterior, features = self.encode(x)
        return posterior.sample(key) * self.config.scaling_factor, features
