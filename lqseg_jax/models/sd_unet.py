"""Stable Diffusion UNet (diffusers `UNet2DConditionModel`) in Flax NNX, NHWC.

Attribute names mirror diffusers exactly (`down_blocks.0.resnets.0.conv1`,
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`,
`time_embedding.linear_1`, `conv_norm_out`, ...), so a diffusers state dict loads key for key through
`lqseg_jax.convert.common.load_torch_state`.

The config is a `UNetConfig` built from the diffusers `config.json` dict (`UNetConfig.from_dict`). As in
diffusers, `attention_head_dim` is really the NUMBER of heads per block (diffusers issue #2011): a block
with C channels runs `attention_head_dim[i]` heads of width C // heads. `SD21_BASE_UNET` is the
stable-diffusion-2-1-base config.

Beside the predicted sample, the forward returns every up-block output after its upsampler, the features
RASS takes (Ka1Guan/RASS restoration_adaptation/models/unet_2d_condition.py): for a 64x64 latent (512 px
image) up0 1280 ch at 16x16 (stride 32 in pixels), up1 1280 ch at 32x32 (stride 16), up2 640 ch at 64x64
(stride 8), up3 320 ch at 64x64 (stride 8).

Precision: parameters fp32; `dtype` sets the compute dtype of convolutions, linears and attention (bf16 on
accelerators); GroupNorm, LayerNorm and the attention softmax run in fp32. Attention goes through
`jax.nn.dot_product_attention` (cuDNN flash attention on GPU for bf16). `remat=True` rematerialises each
down/mid/up block in the backward pass (`nnx.remat`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

# stabilityai/stable-diffusion-2-1-base, unet/config.json (865,910,724 parameters).
SD21_BASE_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers fields we do not implement: accepted only at these (diffusers default) values.
_UNSUPPORTED_AT_DEFAULT: dict[str, Any] = {
    "dropout": 0.0,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


def _per_block(name: str, value: Any, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: '{name}' has {len(value)} entries, expected one per block ({n})")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers UNet2DConditionModel config fields this implementation supports (same names)."""

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False  # no effect: the softmax always runs in fp32 here
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers config dict (`unet/config.json`); keys starting with '_' are metadata."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _UNSUPPORTED_AT_DEFAULT:
                if value != _UNSUPPORTED_AT_DEFAULT[key]:
                    raise ValueError(
                        f"UNet config: '{key}' = {value!r} is not supported "
                        f"(only the diffusers default {_UNSUPPORTED_AT_DEFAULT[key]!r})"
                    )
            else:
                raise ValueError(
                    f"UNet config: unknown field '{key}' (not a diffusers UNet2DConditionModel field)"
                )
        return cls(**kwargs)

    def __post_init__(self):
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                f"UNet config: down_block_types ({n}), up_block_types ({len(self.up_block_types)}) and "
                f"block_out_channels ({len(self.block_out_channels)}) must have the same length"
            )
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(
                    f"UNet config: down block type '{t}' not supported (expected one of {_DOWN_TYPES})"
                )
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(
                    f"UNet config: up block type '{t}' not supported (expected one of {_UP_TYPES})"
                )
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(
                f"UNet config: mid_block_type '{self.mid_block_type}' not supported (expected one of {_MID_TYPES})"
            )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"UNet config: act_fn '{self.act_fn}' not supported (expected 'silu')")
        for name in ("only_cross_attention", "layers_per_block", "cross_attention_dim", "attention_head_dim"):
            _per_block(name, getattr(self, name), n)
        for layers in _per_block("transformer_layers_per_block", self.transformer_layers_per_block, n):
            if not isinstance(layers, int):
                raise ValueError(
                    "UNet config: nested transformer_layers_per_block (asymmetric UNet) is not supported"
                )
        for ch, heads in zip(self.block_out_channels, self.heads):
            if ch % heads or ch % self.norm_num_groups:
                raise ValueError(
                    f"UNet config: block with {ch} channels is not divisible by its {heads} attention heads "
                    f"(attention_head_dim) or by norm_num_groups {self.norm_num_groups}"
                )

    @property
    def heads(self) -> tuple[int, ...]:
        """Heads per down block (diffusers: num_attention_heads defaults to attention_head_dim)."""
        return _per_block("attention_head_dim", self.attention_head_dim, len(self.down_block_types))

    def per_block(self, name: str) -> tuple:
        return _per_block(name, getattr(self, name), len(self.down_block_types))

    @property
    def cross_dims(self) -> tuple[int, ...]:
        return self.per_block("cross_attention_dim")


# ----------------------------------------------------------------------------------------------------------
# Layers shared with the VAE (sd_vae.py)


class GroupNorm(nnx.GroupNorm):
    """torch GroupNorm over the channel (last) axis, computed in fp32; returns the input dtype."""

    def __init__(self, num_channels: int, num_groups: int, eps: float, *, rngs: nnx.Rngs):
        super().__init__(
            num_channels,
            num_groups=num_groups,
            epsilon=eps,
            dtype=jnp.float32,
            use_fast_variance=False,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.LayerNorm):
    """torch LayerNorm over the last axis, computed in fp32; returns the input dtype."""

    def __init__(self, num_features: int, eps: float, *, rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=eps, dtype=jnp.float32, use_fast_variance=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


def conv2d(
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 0,
    dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """torch Conv2d(cin, cout, kernel, stride, padding) as nnx.Conv (explicit padding)."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, rngs=rngs
    )


def nearest_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """torch F.interpolate(mode="nearest", size=size) on NHWC: src = min(floor(dst * in/out), in - 1)."""
    _, h, w, _ = x.shape
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # (b, 2h, 2w, c)

    def index(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)  # torch computes the scale in fp32
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)

    return x[:, index(h, out_h)][:, :, index(w, out_w)]  # (b, out_h, out_w, c)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (time_embedding_norm "default", pre-norm, SiLU), NHWC."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(in_channels, groups, eps, rngs=rngs)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (
            nnx.Linear(temb_channels, out_channels, dtype=dtype, rngs=rngs)
            if temb_channels is not None
            else None
        )
        self.norm2 = GroupNorm(out_channels, groups, eps, rngs=rngs)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (
            conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (b, h, w, out)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]  # (b, h, w, out)
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # (b, h, w, out)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # (b, h, w, out)
        return (x + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """diffusers Downsample2D with a conv: 3x3 stride 2; padding 0 means torch's (0, 1, 0, 1) zero pad."""

    def __init__(self, channels: int, *, padding: int, dtype: Dtype, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = conv2d(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)  # (b, ceil(h/2), ceil(w/2), c)


class Upsample2D(nnx.Module):
    """diffusers Upsample2D with a conv: nearest resize (x2 or to `size`), then 3x3 conv."""

    def __init__(self, channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, size: Sequence[int] | None = None) -> jax.Array:
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
        return self.conv(nearest_resize(x, size))  # (b, size_h, size_w, c)


class Attention(nnx.Module):
    """diffusers Attention (AttnProcessor2_0 path) on (b, n, c) tokens, or on NHWC maps (VAE mid block).

    `to_out` is a list whose slot 0 is the output Linear (torch's slot 1 is a parameterless Dropout(0)).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(query_dim, norm_num_groups, eps, rngs=rngs) if norm_num_groups else None
        self.to_q = nnx.Linear(query_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(kv_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(kv_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        spatial = x.shape if x.ndim == 4 else None
        if spatial is not None:
            x = x.reshape(spatial[0], spatial[1] * spatial[2], spatial[3])  # (b, h*w, c)
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)  # (b, n, c)
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, -1)  # (b, n, heads, d)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, -1)  # (b, s, heads, d)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, -1)  # (b, s, heads, d)
        out = jax.nn.dot_product_attention(q, k, v)  # (b, n, heads, d), softmax in fp32
        out = self.to_out[0](out.reshape(b, n, -1))  # (b, n, c)
        if self.residual_connection:
            out = out + residual
        out = out / self.rescale_output_factor
        if spatial is not None:
            out = out.reshape(spatial)  # (b, h, w, c)
        return out


# ----------------------------------------------------------------------------------------------------------
# Transformer blocks


class GEGLU(nnx.Module):
    def __init__(self, dim_in: int, dim_out: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)  # (b, n, inner) x 2
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers FeedForward with GEGLU: net.0 = GEGLU, net.1 = torch Dropout(0) (no parameters), net.2."""

    def __init__(self, dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        inner = 4 * dim
        self.net = nnx.List(
            [GEGLU(dim, inner, dtype=dtype, rngs=rngs), None, nnx.Linear(inner, dim, dtype=dtype, rngs=rngs)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))  # (b, n, dim)


class BasicTransformerBlock(nnx.Module):
    """Self-attention (or cross-attention when only_cross_attention), cross-attention, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        *,
        cross_attention_dim: int,
        only_cross_attention: bool,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim, 1e-5, rngs=rngs)
        self.attn1 = Attention(
            dim,
            heads=heads,
            dim_head=dim_head,
            cross_attention_dim=cross_attention_dim if only_cross_attention else None,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm2 = LayerNorm(dim, 1e-5, rngs=rngs)
        self.attn2 = Attention(
            dim,
            heads=heads,
            dim_head=dim_head,
            cross_attention_dim=cross_attention_dim,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm3 = LayerNorm(dim, 1e-5, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)  # (b, n, dim)
        x = x + self.attn2(self.norm2(x), context)  # (b, n, dim)
        return x + self.ff(self.norm3(x))  # (b, n, dim)


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in (Linear or 1x1 conv), transformer blocks, proj_out, residual; NHWC in and out."""

    def __init__(
        self,
        heads: int,
        channels: int,
        *,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        only_cross_attention: bool,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(channels, norm_num_groups, 1e-6, rngs=rngs)
        if use_linear_projection:
            self.proj_in = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
            self.proj_out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
            self.proj_out = conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    channels,
                    heads,
                    channels // heads,
                    cross_attention_dim=cross_attention_dim,
                    only_cross_attention=only_cross_attention,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        residual = x
        x = self.norm(x)  # (b, h, w, c)
        # A Linear and a 1x1 conv act identically on channels-last tokens, so the order of the reshape
        # and the projection (diffusers swaps them between the two cases) does not matter in NHWC.
        x = self.proj_in(x).reshape(b, h * w, c)  # (b, h*w, c)
        for block in self.transformer_blocks:
            x = block(x, context)  # (b, h*w, c)
        x = self.proj_out(x.reshape(b, h, w, c))  # (b, h, w, c)
        return x + residual


# ----------------------------------------------------------------------------------------------------------
# UNet blocks


def _resnets(
    in_channels: Sequence[int],
    out_channels: int,
    temb_channels: int,
    groups: int,
    eps: float,
    dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.List:
    """A block's resnets, one per entry of in_channels (its input width), each giving out_channels."""
    return nnx.List(
        [
            ResnetBlock2D(
                c, out_channels, temb_channels=temb_channels, groups=groups, eps=eps, dtype=dtype, rngs=rngs
            )
            for c in in_channels
        ]
    )


def _up_block_inputs(
    in_channels: int, prev_output_channels: int, out_channels: int, num_layers: int
) -> list[int]:
    """Input widths of an up block's resnets: the previous output plus the skip each one concatenates (the
    last skip comes from the matching down block's input)."""
    return [
        (prev_output_channels if i == 0 else out_channels)
        + (in_channels if i == num_layers - 1 else out_channels)
        for i in range(num_layers)
    ]


class CrossAttnDownBlock2D(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        transformer_layers: int,
        heads: int,
        cross_attention_dim: int,
        add_downsample: bool,
        downsample_padding: int,
        use_linear_projection: bool,
        only_cross_attention: bool,
        groups: int,
        eps: float,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        inputs = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets = _resnets(inputs, out_channels, temb_channels, groups, eps, dtype, rngs)
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    heads,
                    out_channels,
                    num_layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, dtype=dtype, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context)  # (b, h, w, out)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (b, h/2, w/2, out)
            skips.append(x)
        return x, tuple(skips)


class DownBlock2D(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        add_downsample: bool,
        downsample_padding: int,
        groups: int,
        eps: float,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        inputs = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets = _resnets(inputs, out_channels, temb_channels, groups, eps, dtype, rngs)
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, dtype=dtype, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        del context  # no attention in this block
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)  # (b, h, w, out)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (b, h/2, w/2, out)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int,
        transformer_layers: int,
        heads: int,
        cross_attention_dim: int,
        use_linear_projection: bool,
        output_scale_factor: float,
        groups: int,
        eps: float,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        resnet = dict(
            temb_channels=temb_channels,
            groups=groups,
            eps=eps,
            output_scale_factor=output_scale_factor,
            dtype=dtype,
            rngs=rngs,
        )
        self.resnets = nnx.List(
            [ResnetBlock2D(channels, channels, **resnet), ResnetBlock2D(channels, channels, **resnet)]
        )
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    heads,
                    channels,
                    num_layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=False,
                    dtype=dtype,
                    rngs=rngs,
                )
            ]
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)  # (b, h, w, c)
        x = self.attentions[0](x, context)  # (b, h, w, c)
        return self.resnets[1](x, temb)  # (b, h, w, c)


class UpBlock2D(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        add_upsample: bool,
        groups: int,
        eps: float,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        inputs = _up_block_inputs(in_channels, prev_output_channels, out_channels, num_layers)
        self.resnets = _resnets(inputs, out_channels, temb_channels, groups, eps, dtype, rngs)
        self.upsamplers = (
            nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None
        )

    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: Sequence[int] | None = None,
    ) -> jax.Array:
        del context  # no attention in this block
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)  # (b, h, w, c + c_skip)
            x = resnet(x, temb)  # (b, h, w, out)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)  # (b, 2h, 2w, out)
        return x


class CrossAttnUpBlock2D(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        transformer_layers: int,
        heads: int,
        cross_attention_dim: int,
        add_upsample: bool,
        use_linear_projection: bool,
        only_cross_attention: bool,
        groups: int,
        eps: float,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        inputs = _up_block_inputs(in_channels, prev_output_channels, out_channels, num_layers)
        self.resnets = _resnets(inputs, out_channels, temb_channels, groups, eps, dtype, rngs)
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    heads,
                    out_channels,
                    num_layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.upsamplers = (
            nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None
        )

    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: Sequence[int] | None = None,
    ) -> jax.Array:
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)  # (b, h, w, c + c_skip)
            x = attn(resnet(x, temb), context)  # (b, h, w, out)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)  # (b, 2h, 2w, out)
        return x


# ----------------------------------------------------------------------------------------------------------
# Time embedding and the UNet


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """diffusers `get_timestep_embedding` (Timesteps module), fp32: (b,) -> (b, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # (b, half)
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # (b, 2*half)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)  # (b, 2*half): cos first
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))  # (b, dim)
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))  # (b, time_embed_dim)


def _call_block(block, *args):
    return block(*args)


def _call_up_block(block, x, skips, temb, context, size):
    return block(x, skips, temb, context, size)


class UNet2DConditionModel(nnx.Module):
    """diffusers UNet2DConditionModel (SD 1.x/2.x layout), NHWC.

    `__call__(sample, timesteps, encoder_hidden_states)` with sample (b, h, w, in_channels), timesteps a
    scalar or (b,), encoder_hidden_states (b, s, cross_attention_dim); returns
    (predicted sample (b, h, w, out_channels), [output of each up block, after its upsampler]).
    """

    def __init__(
        self,
        config: UNetConfig | Mapping[str, Any],
        *,
        dtype: Dtype = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        n = len(cfg.down_block_types)
        ch = cfg.block_out_channels
        heads = cfg.heads
        cross = cfg.cross_dims
        layers = cfg.per_block("layers_per_block")
        tlayers = cfg.per_block("transformer_layers_per_block")
        only_cross = cfg.per_block("only_cross_attention")
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        temb = 4 * ch[0]

        self.conv_in = conv2d(
            cfg.in_channels,
            ch[0],
            cfg.conv_in_kernel,
            padding=(cfg.conv_in_kernel - 1) // 2,
            dtype=dtype,
            rngs=rngs,
        )
        self.time_embedding = TimestepEmbedding(ch[0], temb, dtype=dtype, rngs=rngs)

        down = []
        for i, kind in enumerate(cfg.down_block_types):
            common = dict(
                temb_channels=temb,
                num_layers=layers[i],
                add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding,
                groups=groups,
                eps=eps,
                dtype=dtype,
                rngs=rngs,
            )
            cin = ch[max(i - 1, 0)]
            if kind == "CrossAttnDownBlock2D":
                down.append(
                    CrossAttnDownBlock2D(
                        cin,
                        ch[i],
                        transformer_layers=tlayers[i],
                        heads=heads[i],
                        cross_attention_dim=cross[i],
                        use_linear_projection=cfg.use_linear_projection,
                        only_cross_attention=only_cross[i],
                        **common,
                    )
                )
            else:
                down.append(DownBlock2D(cin, ch[i], **common))
        self.down_blocks = nnx.List(down)

        self.mid_block = (
            UNetMidBlock2DCrossAttn(
                ch[-1],
                temb_channels=temb,
                transformer_layers=tlayers[-1],
                heads=heads[-1],
                cross_attention_dim=cross[-1],
                use_linear_projection=cfg.use_linear_projection,
                output_scale_factor=cfg.mid_block_scale_factor,
                groups=groups,
                eps=eps,
                dtype=dtype,
                rngs=rngs,
            )
            if cfg.mid_block_type is not None
            else None
        )

        rch = ch[::-1]
        up = []
        for i, kind in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the down block this up block mirrors
            common = dict(
                temb_channels=temb,
                num_layers=layers[j] + 1,
                add_upsample=i < n - 1,
                groups=groups,
                eps=eps,
                dtype=dtype,
                rngs=rngs,
            )
            cin, prev, cout = rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i]
            if kind == "CrossAttnUpBlock2D":
                up.append(
                    CrossAttnUpBlock2D(
                        cin,
                        prev,
                        cout,
                        transformer_layers=tlayers[j],
                        heads=heads[j],
                        cross_attention_dim=cross[j],
                        use_linear_projection=cfg.use_linear_projection,
                        only_cross_attention=only_cross[j],
                        **common,
                    )
                )
            else:
                up.append(UpBlock2D(cin, prev, cout, **common))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(ch[0], groups, eps, rngs=rngs)
        self.conv_out = conv2d(
            ch[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            padding=(cfg.conv_out_kernel - 1) // 2,
            dtype=dtype,
            rngs=rngs,
        )

    def _run(self, fn, static_argnums=()):
        return nnx.remat(fn, static_argnums=static_argnums) if self.remat else fn

    def __call__(
        self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array
    ) -> tuple[jax.Array, list[jax.Array]]:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"UNet2DConditionModel: sample must be NHWC with {cfg.in_channels} channels, got shape {sample.shape}"
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] not in cfg.cross_dims:
            raise ValueError(
                "UNet2DConditionModel: encoder_hidden_states must be (b, tokens, cross_attention_dim="
                f"{cfg.cross_dims[0]}), got shape {encoder_hidden_states.shape}"
            )
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))  # (b,)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = timestep_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )  # (b, c0)
        emb = self.time_embedding(t_emb.astype(self.dtype))  # (b, 4*c0)
        context = encoder_hidden_states.astype(self.dtype)  # (b, s, d)

        x = self.conv_in(sample.astype(self.dtype))  # (b, h, w, c0)
        skips = [x]
        for block in self.down_blocks:
            x, res = self._run(_call_block)(block, x, emb, context)  # (b, h_i, w_i, c_i)
            skips.extend(res)
        if self.mid_block is not None:
            x = self._run(_call_block)(self.mid_block, x, emb, context)  # (b, h/2^(n-1), w/2^(n-1), c_last)

        features = []
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = tuple(skips[-k:]), skips[:-k]
            # Upsample to the next skip's size (2x, or diffusers' forwarded upsample_size for odd sizes).
            size = tuple(skips[-1].shape[1:3]) if i < len(self.up_blocks) - 1 else None

            x = self._run(_call_up_block, static_argnums=(5,))(
                block, x, res, emb, context, size
            )  # (b, h_i, w_i, c_i)
            features.append(x)

        out = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # (b, h, w, out_channels)
        return out, features
