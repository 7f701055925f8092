"""Multi-scale deformable attention in pure JAX: the reference every kernel is tested against.

Semantics of the Deformable-DETR / Mask2Former op: bilinear sampling of each level at normalised
(x, y) locations with align_corners=False pixel centres and zero padding outside the level, weighted
by the attention weights and summed over levels and points. The 4 bilinear corners of every sample,
over all levels, are packed into ONE gather on the flattened value.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# Corner offsets (dx, dy) of the 4 bilinear taps: top-left, top-right, bottom-left, bottom-right.
_DX = np.array([0, 1, 0, 1], np.int32)
_DY = np.array([0, 0, 1, 1], np.int32)


def level_starts(spatial_shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Offset of each level in the flattened S axis."""
    sizes = [h * w for h, w in spatial_shapes]
    return np.cumsum([0, *sizes[:-1]]).astype(np.int32)


def ms_deform_attn_reference(
    value: jnp.ndarray,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
) -> jnp.ndarray:
    """value (b, s, h, d), locations (b, q, h, l, p, 2) in [0, 1] as (x, y), weights (b, q, h, l, p).

    Returns (b, q, h*d) in value.dtype, accumulated in float32.
    """
    b, s, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if sum(hh * ww for hh, ww in spatial_shapes) != s:
        raise ValueError(
            f"spatial_shapes {tuple(spatial_shapes)} cover {sum(hh * ww for hh, ww in spatial_shapes)} "
            f"positions but value has S={s}"
        )
    hs = np.array([hh for hh, _ in spatial_shapes], np.int32)[:, None, None]  # (l, 1, 1)
    ws = np.array([ww for _, ww in spatial_shapes], np.int32)[:, None, None]  # (l, 1, 1)
    starts = level_starts(spatial_shapes)[:, None, None]  # (l, 1, 1)

    loc = sampling_locations.astype(jnp.float32)
    x = loc[..., 0] * ws[..., 0] - 0.5  # (b, q, h, l, p)
    y = loc[..., 1] * hs[..., 0] - 0.5  # (b, q, h, l, p)
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = (x - x0)[..., None]  # (b, q, h, l, p, 1)
    fy = (y - y0)[..., None]  # (b, q, h, l, p, 1)
    cx = x0.astype(jnp.int32)[..., None] + _DX  # (b, q, h, l, p, 4)
    cy = y0.astype(jnp.int32)[..., None] + _DY  # (b, q, h, l, p, 4)
    bilinear = jnp.where(_DX == 1, fx, 1.0 - fx) * jnp.where(_DY == 1, fy, 1.0 - fy)  # (b, q, h, l, p, 4)
    inside = (cx >= 0) & (cx < ws) & (cy >= 0) & (cy < hs)  # (b, q, h, l, p, 4)
    coef = jnp.where(inside, bilinear, 0.0) * attention_weights.astype(jnp.float32)[..., None]
    flat = starts + jnp.clip(cy, 0, hs - 1) * ws + jnp.clip(cx, 0, ws - 1)  # (b, q, h, l, p, 4)

    taps = levels * points * 4
    idx = flat.transpose(0, 2, 1, 3, 4, 5).reshape(b, heads, q * taps)  # (b, h, q*l*p*4)
    coef = coef.transpose(0, 2, 1, 3, 4, 5).reshape(b, heads, q, taps)  # (b, h, q, l*p*4)
    v = value.transpose(0, 2, 1, 3)  # (b, h, s, d)
    gathered = jnp.take_along_axis(v, idx[..., None], axis=2).reshape(b, heads, q, taps, d)  # (b, h, q, k, d)
    out = jnp.einsum("bhqk,bhqkd->bqhd", coef, gathered, preferred_element_type=jnp.float32)  # (b, q, h, d)
    return out.reshape(b, q, heads * d).astype(value.dtype)
