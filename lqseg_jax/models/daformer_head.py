"""DAFormer decode head (refign `models/heads/daformer.py`, lhoyer/DAFormer `daformer_head.py`), NHWC.

Per level a Linear to `embed_dims` (`embed_layers.{i}.proj`); levels 2..4 bilinearly upsampled
(align_corners=False) to level 1 (stride 4); concat c1..c4; `fuse_layer`: ASPP without image pooling,
`aspp_modules.0` = 1x1 ConvModule, `aspp_modules.{1,2,3}` = depthwise-separable ConvModules with 3x3
dilated depthwise convs (dilations 6, 12, 18); concat the 4 branches; `bottleneck` 3x3 ConvModule;
Dropout2d (whole channels, train mode only); `conv_seg` 1x1 to the classes. Logits at stride 4, fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lqseg_jax.models.layers import (
    ConvModule,
    DepthwiseSeparableConvModule,
    resize_bilinear,
    torch_linear_init,
)


class MLP(nnx.Module):
    """Per-level token embedding: `proj` Linear (torch default init), applied on the channel axis."""

    def __init__(self, in_features: int, embed_dim: int, *, dtype, rngs: nnx.Rngs):
        kernel_init, bias_init = torch_linear_init(in_features)
        self.proj = nnx.Linear(
            in_features, embed_dim, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)  # (b, h, w, embed_dim)


class ASPPWrapper(nnx.Module):
    """`aspp_modules` (1x1 branch for dilation 1, depthwise-separable 3x3 branches otherwise), concat,
    `bottleneck` 3x3 ConvModule."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int], *, dtype, rngs: nnx.Rngs):
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(ConvModule(in_channels, channels, 1, dtype=dtype, rngs=rngs))
            else:
                branches.append(
                    DepthwiseSeparableConvModule(
                        in_channels, channels, 3, padding=d, dilation=d, dtype=dtype, rngs=rngs
                    )
                )
        self.aspp_modules = nnx.List(branches)
        self.bottleneck = ConvModule(
            len(dilations) * channels, channels, 3, padding=1, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        outs = [branch(x) for branch in self.aspp_modules]  # each (b, h, w, channels)
        return self.bottleneck(jnp.concatenate(outs, axis=-1))  # (b, h, w, channels)


class DAFormerHead(nnx.Module):
    """Input: the 4 encoder features NHWC at strides 4..32 with channels `in_channels`.
    Output: logits (b, h_1, w_1, num_classes) fp32 at the size of the first feature.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        embed_dims: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout_ratio: float = 0.1,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = num_classes
        self.dtype = dtype
        self.embed_layers = nnx.List([MLP(c, embed_dims, dtype=dtype, rngs=rngs) for c in self.in_channels])
        self.fuse_layer = ASPPWrapper(
            embed_dims * len(self.in_channels), channels, dilations, dtype=dtype, rngs=rngs
        )
        self.dropout = nnx.Dropout(dropout_ratio, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d on NHWC
        self.conv_seg = nnx.Conv(
            channels,
            num_classes,
            (1, 1),
            dtype=dtype,
            kernel_init=jax.nn.initializers.normal(0.01),
            rngs=rngs,
        )

    def _check_inputs(self, feats: Sequence[jax.Array]) -> None:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"DAFormerHead: expected {len(self.in_channels)} feature maps, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if f.ndim != 4 or f.shape[-1] != c or f.shape[0] != feats[0].shape[0]:
                raise ValueError(
                    f"DAFormerHead: feature {i} must be NHWC with {c} channels and batch "
                    f"{feats[0].shape[0]}, got shape {f.shape}"
                )

    def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
        self._check_inputs(feats)
        size = feats[0].shape[1:3]
        embedded = []
        for layer, f in zip(self.embed_layers, feats):
            c = layer(f)  # (b, h_i, w_i, embed)
            embedded.append(resize_bilinear(c, size))  # (b, h_1, w_1, embed)
        x = self.fuse_layer(jnp.concatenate(embedded, axis=-1))  # (b, h_1, w_1, channels)
        x = self.dropout(x)  # (b, h_1, w_1, channels)
        return self.conv_seg(x).astype(jnp.float32)  # (b, h_1, w_1, num_classes)
