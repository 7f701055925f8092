"""Resizing as PyTorch's `F.interpolate` (align_corners=False, no antialias) with per-image sizes.

A resize along one axis is a sparse matrix: output index o reads a few input indices with weights (taps).
We build the taps per image from its traced (in_size, out_size, mode) and apply them as row gathers on a
static canvas, so a new random size never changes an array shape:

- area (`adaptive_avg_pool`): the mean of input [floor(o n_in / n_out), ceil((o + 1) n_in / n_out)).
- bilinear: source s = max(scale (o + 0.5) - 0.5, 0), taps floor(s) and floor(s) + 1 (clamped).
- bicubic: source s = scale (o + 0.5) - 0.5, Keys cubic with a = -0.75 on floor(s) - 1 .. floor(s) + 2,
  indices clamped to the border.

`scale` is n_in / n_out when a size is asked for, and 1 / scale_factor when F.interpolate is called with
`scale_factor=` (the first Real-ESRGAN stage does that; the output size is then floor(n_in * s)).
Output rows at o >= n_out get zero weights, so the canvas outside the valid region stays 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

AREA, BILINEAR, BICUBIC = 0, 1, 2
RESIZE_MODES = ("area", "bilinear", "bicubic")
_CUBIC_A = -0.75


def num_taps(max_ratio: float) -> int:
    """Static number of taps covering every mode when n_in / n_out <= max_ratio."""
    return max(4, math.ceil(max_ratio) + 1)


def _cubic_weights(t: jax.Array) -> tuple[jax.Array, ...]:
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def resize_taps(out_max: int, n_in, n_out, mode, scale, taps: int) -> tuple[jax.Array, jax.Array]:
    """Indices (out_max, taps) int32 and weights (out_max, taps) float32 of a 1-D resize.

    n_in, n_out: valid input / output lengths (traced int32 scalars); mode: AREA, BILINEAR or BICUBIC;
    scale: float32 source-coordinate scale (see the module docstring). Rows o >= n_out have zero weights.
    """
    o = jnp.arange(out_max, dtype=jnp.int32)  # (o,)
    of = o.astype(jnp.float32)
    t = jnp.arange(taps, dtype=jnp.int32)  # (t,)
    last = n_in - 1

    # area: integer window [start, end) as ATen's adaptive pooling
    start = (o * n_in) // n_out
    end = ((o + 1) * n_in + n_out - 1) // n_out
    area_idx = start[:, None] + t[None, :]  # (o, t)
    area_w = jnp.where(area_idx < end[:, None], 1.0 / (end - start).astype(jnp.float32)[:, None], 0.0)

    # bilinear: taps i0, i0 + 1 (clamped), zero weight beyond
    src = jnp.maximum(scale * (of + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
    lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    lin_idx = i0[:, None] + jnp.minimum(t, 1)[None, :]  # (o, t)
    lin_w = jnp.where(t == 0, (1.0 - lam)[:, None], jnp.where(t == 1, lam[:, None], 0.0))

    # bicubic: taps c0 - 1 .. c0 + 2 (clamped), zero weight beyond
    src = scale * (of + 0.5) - 0.5
    c0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
    tc = jnp.clip(src - c0.astype(jnp.float32), 0.0, 1.0)
    cub_idx = c0[:, None] - 1 + jnp.minimum(t, 3)[None, :]  # (o, t)
    cw = _cubic_weights(tc)
    cub_w = jnp.select([t == k for k in range(4)], [cw[k][:, None] for k in range(4)], 0.0)

    idx = jnp.where(mode == AREA, area_idx, jnp.where(mode == BILINEAR, lin_idx, cub_idx))
    w = jnp.where(mode == AREA, area_w, jnp.where(mode == BILINEAR, lin_w, cub_w))
    w = jnp.where((o < n_out)[:, None], w, 0.0)
    return jnp.clip(idx, 0, last), w  # (o, t), (o, t)


def resize_rows(x: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    """Resizes the rows axis: out[:, o] = sum_t w[o, t] x[:, idx[o, t]]; x (c, n_in, m), idx / w (o, t).

    One gather of whole rows per tap: a row gather is a memory copy, far cheaper on a CPU than element
    gathers along the last axis or row gathers from a transposed operand (measured 2-3x)."""
    out = jnp.take(x, idx[:, 0], axis=1) * w[None, :, 0, None]  # (c, o, m)
    for t in range(1, idx.shape[1]):
        out = out + jnp.take(x, idx[:, t], axis=1) * w[None, :, t, None]
    return out


def resize_transposed(x, out_rc, in_sizes, out_sizes, modes, scales, taps: int) -> jax.Array:
    """Resizes each image of a planar batch to its own size on a static canvas, and TRANSPOSES it.

    x: (b, c, R, C) canvas whose valid region is [:r_in, :c_in]; out_rc: the (rows, cols) output canvas;
    in_sizes, out_sizes: (b, 2) int32 (rows, cols); modes: (b,) int32; scales: (b, 2) float32
    source-coordinate scales (rows, cols); taps: `num_taps` of the largest ratio.
    Returns (b, c, cols_out, rows_out): the resized images transposed, zero outside [:c_out, :r_out].

    Both passes are row gathers: rows first, one batched transpose, then the former columns as rows. Every
    other op of the degradation works in either orientation, so the pipeline keeps the transposed result
    instead of paying a second transpose. Each pass runs as its own lax.map over the images: the loop
    writes the first pass to memory; fused into the second pass's gathers it would be recomputed per tap.
    """

    def one_pass(axis):
        def body(args):
            xb, n_in, n_out, mode, scale = args
            idx, w = resize_taps(out_rc[axis], n_in[axis], n_out[axis], mode, scale[axis], taps)
            return resize_rows(xb, idx, w)

        return body

    x = jax.lax.map(one_pass(0), (x, in_sizes, out_sizes, modes, scales))  # (b, c, R_out, C)
    x = jnp.swapaxes(x, 2, 3)  # (b, c, C, R_out)
    return jax.lax.map(one_pass(1), (x, in_sizes, out_sizes, modes, scales))  # (b, c, C_out, R_out)
