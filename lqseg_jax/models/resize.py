"""PyTorch-exact resizes of NHWC maps, shared by UAWarpC and HRDA.

- `resize_area`: torch `F.interpolate(mode="area")` = `adaptive_avg_pool2d`: output pixel i averages the
  input window [floor(i * in / out), ceil((i + 1) * in / out)), so windows are uneven (and may overlap)
  when out does not divide in (e.g. 540 -> 256). Separable: a row-averaging then a column-averaging
  matrix product (fp32, highest matmul precision).
- `resize_bilinear`: torch bilinear with align_corners=False, no antialiasing (re-exported from
  `lqseg_jax.models.layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lqseg_jax.models.layers import resize_bilinear

__all__ = ["adaptive_pool_matrix", "resize_area", "resize_bilinear"]


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) fp32 matrix whose row i averages torch's adaptive-pooling window i."""
    i = np.arange(out_size)
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size
    cols = np.arange(in_size)[None, :]
    inside = (cols >= start[:, None]) & (cols < end[:, None])  # (out, in)
    return (inside / (end - start)[:, None]).astype(np.float32)


def resize_area(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """`area` resize of NHWC `x` to `size` = (h, w), equal to torch `F.interpolate(mode="area")`.

    Computed in fp32, returned in x's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"resize_area: input must be NHWC (4-D), got shape {x.shape}")
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"resize_area: size must be two positive ints (h, w), got {tuple(size)}")
    out_h, out_w = int(size[0]), int(size[1])
    _, in_h, in_w, _ = x.shape
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    hi = jax.lax.Precision.HIGHEST
    if out_h != in_h:
        y = jnp.einsum(
            "oh,bhwc->bowc", adaptive_pool_matrix(in_h, out_h), y, precision=hi
        )  # (b, out_h, in_w, c)
    if out_w != in_w:
        y = jnp.einsum(
            "ow,bhwc->bhoc", adaptive_pool_matrix(in_w, out_w), y, precision=hi
        )  # (b, out_h, out_w, c)
    return y.astype(x.dtype)
