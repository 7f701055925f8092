"""MSDeformAttnPixelDecoder (Mask2Former): deformable-attention encoder over res3..res5 plus an FPN level.

Attribute names mirror mask2former/modeling/pixel_decoder/msdeformattn.py, so detectron2 keys
`sem_seg_head.pixel_decoder.*` load mechanically. NHWC inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lqseg_jax.kernels.ms_deform_attn import ms_deform_attn
from lqseg_jax.models.layers import resize_bilinear

from .common import (
    Conv2d,
    c2_xavier_init,
    group_norm,
    layer_norm,
    sine_position_embedding,
    torch_linear,
    torch_normal_init,
    xavier_uniform_init,
)
from .config import FEATURES, Mask2FormerConfig


def _sampling_offsets_bias(n_heads: int, n_levels: int, n_points: int) -> np.ndarray:
    """Deformable-DETR grid init: head h looks along angle 2*pi*h/heads, point i at distance i + 1."""
    thetas = np.arange(n_heads, dtype=np.float32) * (2.0 * np.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)  # (heads, 2)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))  # (heads, levels, points, 2)
    grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
    return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nnx.Module):
    """Multi-scale deformable attention (Deformable DETR) through lqseg_jax.kernels.ms_deform_attn."""

    def __init__(
        self, d_model: int, n_levels: int, n_heads: int, n_points: int, *, impl: str, dtype, rngs: nnx.Rngs
    ):
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.impl = impl
        bias = _sampling_offsets_bias(n_heads, n_levels, n_points)
        zeros = nnx.initializers.zeros
        self.sampling_offsets = nnx.Linear(
            d_model,
            n_heads * n_levels * n_points * 2,
            kernel_init=zeros,
            bias_init=lambda *_: jnp.asarray(bias),
            dtype=dtype,
            rngs=rngs,
        )
        self.attention_weights = nnx.Linear(
            d_model, n_heads * n_levels * n_points, kernel_init=zeros, bias_init=zeros, dtype=dtype, rngs=rngs
        )
        self.value_proj = nnx.Linear(
            d_model, d_model, kernel_init=xavier_uniform_init, bias_init=zeros, dtype=dtype, rngs=rngs
        )
        self.output_proj = nnx.Linear(
            d_model, d_model, kernel_init=xavier_uniform_init, bias_init=zeros, dtype=dtype, rngs=rngs
        )

    def __call__(
        self,
        query: jax.Array,
        reference_points: jax.Array,
        input_flatten: jax.Array,
        spatial_shapes: tuple[tuple[int, int], ...],
    ) -> jax.Array:
        """query (b, q, c), reference_points (1 or b, q, levels, 2) (x, y) in [0, 1], input (b, s, c)."""
        b, nq, c = query.shape
        s = input_flatten.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).reshape(b, s, heads, c // heads)  # (b, s, heads, d)
        offsets = self.sampling_offsets(query).astype(jnp.float32)  # (b, q, heads*levels*points*2)
        offsets = offsets.reshape(b, nq, heads, levels, points, 2)  # (b, q, heads, levels, points, 2)
        logits = self.attention_weights(query).astype(jnp.float32).reshape(b, nq, heads, levels * points)
        weights = jax.nn.softmax(logits, axis=-1).reshape(b, nq, heads, levels, points)  # (b, q, heads, l, p)
        normalizer = np.array([(w, h) for h, w in spatial_shapes], np.float32)  # (levels, 2) as (x, y)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )  # (b, q, heads, levels, points, 2)
        out = ms_deform_attn(value, spatial_shapes, locations, weights, impl=self.impl)  # (b, q, c)
        return self.output_proj(out)  # (b, q, c)


class MSDeformAttnTransformerEncoderLayer(nnx.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN (dropout 0)."""

    def __init__(self, cfg: Mask2FormerConfig, n_levels: int, *, rngs: nnx.Rngs):
        dt, d = cfg.compute_dtype, cfg.conv_dim
        self.self_attn = MSDeformAttn(
            d, n_levels, cfg.enc_heads, cfg.enc_points, impl=cfg.msda_impl, dtype=dt, rngs=rngs
        )
        self.norm1 = layer_norm(d, dtype=dt, rngs=rngs)
        self.linear1 = torch_linear(d, cfg.enc_ffn_dim, kernel_init=xavier_uniform_init, dtype=dt, rngs=rngs)
        self.linear2 = torch_linear(cfg.enc_ffn_dim, d, kernel_init=xavier_uniform_init, dtype=dt, rngs=rngs)
        self.norm2 = layer_norm(d, dtype=dt, rngs=rngs)

    def __call__(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))  # (b, s, c)
        ffn = self.linear2(jax.nn.relu(self.linear1(src)))  # (b, s, c)
        return self.norm2(src + ffn)  # (b, s, c)


class MSDeformAttnTransformerEncoder(nnx.Module):
    def __init__(self, cfg: Mask2FormerConfig, n_levels: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [MSDeformAttnTransformerEncoderLayer(cfg, n_levels, rngs=rngs) for _ in range(cfg.enc_layers)]
        )

    @staticmethod
    def get_reference_points(spatial_shapes: tuple[tuple[int, int], ...], n_levels: int) -> np.ndarray:
        """Pixel centres of every level, normalised to [0, 1] (no padding) -> (1, s, levels, 2) as (x, y)."""
        refs = []
        for h, w in spatial_shapes:
            ry, rx = np.meshgrid(
                np.linspace(0.5, h - 0.5, h, dtype=np.float32) / h,
                np.linspace(0.5, w - 0.5, w, dtype=np.float32) / w,
                indexing="ij",
            )
            refs.append(np.stack([rx.reshape(-1), ry.reshape(-1)], -1))  # (h*w, 2)
        ref = np.concatenate(refs, 0)  # (s, 2)
        return np.broadcast_to(ref[None, :, None, :], (1, ref.shape[0], n_levels, 2)).astype(np.float32)

    def __call__(self, src, pos, spatial_shapes):
        reference_points = self.get_reference_points(spatial_shapes, len(spatial_shapes))  # (1, s, l, 2)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)  # (b, s, c)
        return src


class MSDeformAttnTransformerEncoderOnly(nnx.Module):
    def __init__(self, cfg: Mask2FormerConfig, n_levels: int, *, rngs: nnx.Rngs):
        self.encoder = MSDeformAttnTransformerEncoder(cfg, n_levels, rngs=rngs)
        self.level_embed = nnx.Param(torch_normal_init(rngs.params(), (n_levels, cfg.conv_dim)))

    def __call__(self, srcs: list[jax.Array], pos_embeds: list[np.ndarray]) -> jax.Array:
        """srcs: per level (b, h, w, c), coarsest first; pos_embeds (h, w, c) -> memory (b, s, c)."""
        b, c = srcs[0].shape[0], srcs[0].shape[-1]
        spatial_shapes = tuple((x.shape[1], x.shape[2]) for x in srcs)
        level_embed = self.level_embed[...]  # (levels, c)
        src_flatten = jnp.concatenate([x.reshape(b, -1, c) for x in srcs], axis=1)  # (b, s, c)
        pos_flatten = jnp.concatenate(
            [jnp.asarray(p).reshape(1, -1, c) + level_embed[lvl] for lvl, p in enumerate(pos_embeds)], axis=1
        ).astype(src_flatten.dtype)  # (1, s, c)
        return self.encoder(src_flatten, pos_flatten, spatial_shapes)  # (b, s, c)


class MSDeformAttnPixelDecoder(nnx.Module):
    """res2..res5 (NHWC) -> mask features (b, H/4, W/4, mask_dim) and 3 multi-scale features.

    The multi-scale features are the encoder outputs at the 3 coarsest levels, coarsest first
    ((b, H/32, W/32, c), (b, H/16, W/16, c), (b, H/8, W/8, c) for RASS).
    """

    def __init__(self, cfg: Mask2FormerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, d = cfg.compute_dtype, cfg.conv_dim
        chans = cfg.channels
        self.transformer_in_features = tuple(f for f in FEATURES if f in cfg.transformer_in_features)
        self.fpn_features = FEATURES[: cfg.num_fpn_levels]
        n_levels = len(self.transformer_in_features)
        # from low to high resolution (res5 -> res3)
        self.input_proj = nnx.List(
            [
                nnx.List(
                    [
                        nnx.Conv(
                            chans[f],
                            d,
                            (1, 1),
                            kernel_init=xavier_uniform_init,
                            bias_init=nnx.initializers.zeros,
                            dtype=dt,
                            rngs=rngs,
                        ),
                        group_norm(d, cfg.norm_groups, dtype=dt, rngs=rngs),
                    ]
                )
                for f in self.transformer_in_features[::-1]
            ]
        )
        self.transformer = MSDeformAttnTransformerEncoderOnly(cfg, n_levels, rngs=rngs)
        self.mask_features = nnx.Conv(
            d,
            cfg.mask_dim,
            (1, 1),
            kernel_init=c2_xavier_init,
            bias_init=nnx.initializers.zeros,
            dtype=dt,
            rngs=rngs,
        )
        for idx, f in enumerate(self.fpn_features):
            lateral = Conv2d(
                chans[f], d, 1, use_bias=False, norm=group_norm(d, cfg.norm_groups, dtype=dt, rngs=rngs),
                relu=False, dtype=dt, rngs=rngs,
            )  # fmt: skip
            output = Conv2d(
                d, d, 3, use_bias=False, norm=group_norm(d, cfg.norm_groups, dtype=dt, rngs=rngs),
                relu=True, dtype=dt, rngs=rngs,
            )  # fmt: skip
            setattr(self, f"adapter_{idx + 1}", lateral)
            setattr(self, f"layer_{idx + 1}", output)

    def __call__(self, features: dict[str, jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        dt, d = self.cfg.compute_dtype, self.cfg.conv_dim
        srcs, pos = [], []
        for idx, f in enumerate(self.transformer_in_features[::-1]):  # coarsest first
            x = features[f].astype(dt)  # (b, h, w, c_in)
            conv, norm = self.input_proj[idx]
            srcs.append(norm(conv(x)))  # (b, h, w, d)
            pos.append(sine_position_embedding(x.shape[1], x.shape[2], d // 2))  # (h, w, d)
        memory = self.transformer(srcs, pos)  # (b, s, d)

        b = memory.shape[0]
        out, start = [], 0
        for x in srcs:
            h, w = x.shape[1], x.shape[2]
            out.append(memory[:, start : start + h * w].reshape(b, h, w, d))  # (b, h, w, d)
            start += h * w
        for idx, f in enumerate(self.fpn_features[::-1]):  # extra FPN levels, coarse to fine
            lateral = getattr(self, f"adapter_{len(self.fpn_features) - idx}")
            output = getattr(self, f"layer_{len(self.fpn_features) - idx}")
            cur = lateral(features[f].astype(dt))  # (b, h, w, d)
            y = cur + resize_bilinear(out[-1], cur.shape[1:3])  # (b, h, w, d)
            out.append(output(y))  # (b, h, w, d)
        return self.mask_features(out[-1]), out[:3]  # (b, H/4, W/4, mask_dim), 3 x (b, h_i, w_i, d)
