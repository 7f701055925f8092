"""Multi-scale deformable attention in pure JAX: the reference every kernel is tested against.

Semantics of the Deformable-DETR / Mask2Former op: bilinear sampling of each level at normalised
(x, y) locations with align_corners=False pixel centres and zero padding outside the level, weighted
by the attention weights and summed over levels and points. The 4 bilinear corners of every sample,
over all levels, are packed into ONE gather of rows of value viewed as (b*s*h, d).

Computation runs in float32 (float64 for float64 inputs, so `check_grads` can use finite differences
in double precision); the output has value's dtype.
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


def compute_dtype(*arrays: jnp.ndarray) -> jnp.dtype:
    """float32, or float64 when an input is float64 (x64 mode)."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def sampling_taps(
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The 4 bilinear taps of every sample.

    Returns (flat, coef, inside), each (b, q, h, l, p, 4): the row of the flattened S axis each tap reads
    (clamped into its level, so always a valid index), its coefficient attention_weight * bilinear weight
    (0 for a tap outside its level: zero padding), and whether the tap lies inside its level.
    """
    hs = np.array([hh for hh, _ in spatial_shapes], np.int32)[:, None, None]  # (l, 1, 1)
    ws = np.array([ww for _, ww in spatial_shapes], np.int32)[:, None, None]  # (l, 1, 1)
    starts = level_starts(spatial_shapes)[:, None, None]  # (l, 1, 1)

    loc = sampling_locations.astype(dtype)
    x = loc[..., 0] * ws[..., 0].astype(dtype) - 0.5  # (b, q, h, l, p)
    y = loc[..., 1] * hs[..., 0].astype(dtype) - 0.5  # (b, q, h, l, p)
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = (x - x0)[..., None]  # (b, q, h, l, p, 1)
    fy = (y - y0)[..., None]  # (b, q, h, l, p, 1)
    cx = x0.astype(jnp.int32)[..., None] + _DX  # (b, q, h, l, p, 4)
    cy = y0.astype(jnp.int32)[..., None] + _DY  # (b, q, h, l, p, 4)
    bilinear = jnp.where(_DX == 1, fx, 1.0 - fx) * jnp.where(_DY == 1, fy, 1.0 - fy)  # (b, q, h, l, p, 4)
    inside = (cx >= 0) & (cx < ws) & (cy >= 0) & (cy < hs)  # (b, q, h, l, p, 4)
    coef = jnp.where(inside, bilinear, 0.0) * attention_weights.astype(dtype)[..., None]  # (b, q, h, l, p, 4)
    flat = starts + jnp.clip(cy, 0, hs - 1) * ws + jnp.clip(cx, 0, ws - 1)  # (b, q, h, l, p, 4)
    return flat, coef, inside


def ms_deform_attn_reference(
    value: jnp.ndarray,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
) -> jnp.ndarray:
    """value (b, s, h, d), locations (b, q, h, l, p, 2) in [0, 1] as (x, y), weights (b, q, h, l, p).

    Returns (b, q, h*d) in value.dtype, accumulated in float32 (float64 for float64 inputs).
    """
    b, s, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if sum(hh * ww for hh, ww in spatial_shapes) != s:
        raise ValueError(
            f"spatial_shapes {tuple(spatial_shapes)} cover {sum(hh * ww for hh, ww in spatial_shapes)} "
            f"positions but value has S={s}"
        )
    dtype = compute_dtype(value, sampling_locations, attention_weights)
    flat, coef, _ = sampling_taps(spatial_shapes, sampling_locations, attention_weights, dtype)

    # Row (bi*s + si)*heads + hi of the (b*s*heads, d) view of value, for all taps at once: one gather,
    # with no transpose of value or of the output.
    taps = levels * points * 4
    batch_rows = np.arange(b, dtype=np.int32)[:, None, None, None, None, None] * s  # (b, 1, 1, 1, 1, 1)
    head = np.arange(heads, dtype=np.int32)[None, None, :, None, None, None]  # (1, 1, h, 1, 1, 1)
    rows = ((batch_rows + flat) * heads + head).reshape(b, q, heads, taps)  # (b, q, h, l*p*4)
    gathered = jnp.take(value.reshape(b * s * heads, d), rows, axis=0)  # (b, q, h, l*p*4, d)
    out = jnp.einsum(
        "bqhk,bqhkd->bqhd",
        coef.reshape(b, q, heads, taps),
        gathered.astype(dtype),
        precision="highest",
        preferred_element_type=dtype,
    )  # (b, q, h, d)
    return out.reshape(b, q, heads * d).astype(value.dtype)
