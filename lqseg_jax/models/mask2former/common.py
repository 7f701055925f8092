"""Building blocks shared by the Mask2Former pixel decoder, transformer decoder, matcher and criterion.

Initialisers reproduce the PyTorch ones the original uses; `Conv2d` and `MultiheadAttention` mirror
detectron2's `Conv2d` (conv + `norm` + activation) and `torch.nn.MultiheadAttention` parameter names.
Bilinear resizing is the shared `lqseg_jax.models.layers.resize_bilinear` (torch's, no antialias).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lqseg_jax.models.layers import torch_linear_init

# fvcore c2_xavier_fill: kaiming_uniform(a=1) -> U(-sqrt(3/fan_in), sqrt(3/fan_in)).
c2_xavier_init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
xavier_uniform_init = nnx.initializers.xavier_uniform()
torch_normal_init = nnx.initializers.normal(1.0)  # nn.Embedding / nn.init.normal_


def torch_linear(
    in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, kernel_init=None
) -> nnx.Linear:
    """nnx.Linear initialised as torch.nn.Linear (or with `kernel_init` and the default torch bias)."""
    default_kernel, bias_init = torch_linear_init(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=kernel_init or default_kernel,
        bias_init=bias_init,
        dtype=dtype,
        rngs=rngs,
    )


def layer_norm(dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch.nn.LayerNorm(dim): eps 1e-5, two-pass variance; statistics in float32."""
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=rngs)


def group_norm(dim: int, groups: int, *, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """torch.nn.GroupNorm(groups, dim) on NHWC: eps 1e-5, two-pass variance; statistics in float32."""
    return nnx.GroupNorm(
        dim, num_groups=groups, epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=rngs
    )


class Conv2d(nnx.Conv):
    """detectron2.layers.Conv2d: a conv followed by an optional `norm` and ReLU (NHWC)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        use_bias: bool,
        norm: nnx.Module | None,
        relu: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        pad = kernel_size // 2
        super().__init__(
            in_features,
            out_features,
            (kernel_size, kernel_size),
            padding=((pad, pad), (pad, pad)),
            use_bias=use_bias,
            kernel_init=c2_xavier_init,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = norm
        self.relu = relu

    def __call__(self, x: jax.Array) -> jax.Array:
        x = super().__call__(x)  # (b, h, w, out)
        if self.norm is not None:
            x = self.norm(x)  # (b, h, w, out)
        return jax.nn.relu(x) if self.relu else x


class MultiheadAttention(nnx.Module):
    """torch.nn.MultiheadAttention (batch first here), attention via jax.nn.dot_product_attention.

    Parameters mirror torch: `in_proj_kernel` is torch's `in_proj_weight` (3E, E) transposed to (E, 3E)
    (q, k, v blocks along the output axis), `in_proj_bias` (3E,), `out_proj` a Linear.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dtype = dtype
        self.in_proj_kernel = nnx.Param(xavier_uniform_init(rngs.params(), (embed_dim, 3 * embed_dim)))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * embed_dim,), jnp.float32))
        self.out_proj = nnx.Linear(
            embed_dim,
            embed_dim,
            kernel_init=xavier_uniform_init,
            bias_init=nnx.initializers.zeros,
            dtype=dtype,
            rngs=rngs,
        )

    def from_torch(self, name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
        if name == "in_proj_weight":
            return "in_proj_kernel", array.T
        return name, array

    def __call__(
        self, query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """query (b, t, E), key/value (b, s, E), mask (b, t, s) True where attending is allowed."""
        b, t, e = query.shape
        s = key.shape[1]
        hd = e // self.num_heads
        w = self.in_proj_kernel[...].astype(self.dtype)  # (E, 3E)
        bias = self.in_proj_bias[...].astype(self.dtype)  # (3E,)
        q = query.astype(self.dtype) @ w[:, :e] + bias[:e]  # (b, t, E)
        k = key.astype(self.dtype) @ w[:, e : 2 * e] + bias[e : 2 * e]  # (b, s, E)
        v = value.astype(self.dtype) @ w[:, 2 * e :] + bias[2 * e :]  # (b, s, E)
        q = q.reshape(b, t, self.num_heads, hd)  # (b, t, heads, hd)
        k = k.reshape(b, s, self.num_heads, hd)  # (b, s, heads, hd)
        v = v.reshape(b, s, self.num_heads, hd)  # (b, s, heads, hd)
        out = jax.nn.dot_product_attention(
            q, k, v, mask=None if mask is None else mask[:, None]
        )  # (b, t, heads, hd)
        return self.out_proj(out.reshape(b, t, e))  # (b, t, E)


def sine_position_embedding(h: int, w: int, num_pos_feats: int, temperature: float = 10000.0) -> np.ndarray:
    """detectron2 PositionEmbeddingSine(num_pos_feats, normalize=True) without a mask -> (h, w, 2F).

    Channels are [y features, x features], each interleaving sin and cos of position / 10000^(2i/F),
    with positions 1..n normalised to (0, 2*pi] (eps 1e-6 as the original). A trace-time constant.
    """
    eps, scale = 1e-6, 2 * np.pi
    y = np.arange(1, h + 1, dtype=np.float64) / (h + eps) * scale  # (h,)
    x = np.arange(1, w + 1, dtype=np.float64) / (w + eps) * scale  # (w,)
    dim_t = temperature ** (2 * (np.arange(num_pos_feats) // 2) / num_pos_feats)  # (F,)

    def embed(pos):  # (n,) -> (n, F): sin on even, cos on odd channels
        a = pos[:, None] / dim_t  # (n, F)
        return np.where(np.arange(num_pos_feats) % 2 == 0, np.sin(a), np.cos(a))

    pos_y = np.broadcast_to(embed(y)[:, None, :], (h, w, num_pos_feats))  # (h, w, F)
    pos_x = np.broadcast_to(embed(x)[None, :, :], (h, w, num_pos_feats))  # (h, w, F)
    return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)  # (h, w, 2F)


_DX = np.array([0, 1, 0, 1], np.int32)
_DY = np.array([0, 0, 1, 1], np.int32)


def bilinear_taps(coords: jax.Array, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """Bilinear taps of detectron2's point_sample (grid_sample, align_corners=False, zero padding).

    coords (..., p, 2) as (x, y) in [0, 1] -> flat pixel index (..., p, 4) into an (h, w) map and tap
    weights (..., p, 4), zero for taps outside the map.
    """
    x = coords[..., 0].astype(jnp.float32) * w - 0.5  # (..., p)
    y = coords[..., 1].astype(jnp.float32) * h - 0.5  # (..., p)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]  # (..., p, 1)
    cx = x0.astype(jnp.int32)[..., None] + _DX  # (..., p, 4)
    cy = y0.astype(jnp.int32)[..., None] + _DY  # (..., p, 4)
    weights = jnp.where(_DX == 1, fx, 1 - fx) * jnp.where(_DY == 1, fy, 1 - fy)  # (..., p, 4)
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    index = jnp.clip(cy, 0, h - 1) * w + jnp.clip(cx, 0, w - 1)  # (..., p, 4)
    return index, jnp.where(inside, weights, 0.0)
