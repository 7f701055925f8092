"""Static sub-canvases ("buckets") for images of random size, so that work follows an image's area.

After a random resize an image sits in the top-left corner of a static canvas sized for the largest size
the config allows. A per-image op run on the whole canvas costs the canvas's area; run on the smallest of a
few static sub-canvases that holds the image (picked with lax.switch inside the per-image loop), it costs
about the image's. Every branch has a static shape, so a new random size never compiles anything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_BUCKETS = 6


def ceil16(n: int) -> int:
    return -(-n // 16) * 16


def buckets(canvas: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """k / n of `canvas` for k = 1..n, multiples of 16 (the JPEG's blocks), n <= MAX_BUCKETS and each at
    least 32 pixels; the last is `canvas` itself (a multiple of 16)."""
    r, c = canvas
    n = max(1, min(MAX_BUCKETS, min(r, c) // 32))
    return tuple((ceil16(-(-r * k // n)), ceil16(-(-c * k // n))) for k in range(1, n + 1))


def bucket_index(sizes: jax.Array, canvases: tuple[tuple[int, int], ...]) -> jax.Array:
    """(b,) int32: for each valid size (b, 2) (rows, cols), the first of `canvases` that holds it."""
    fits = jnp.stack([(sizes[:, 0] <= r) & (sizes[:, 1] <= c) for r, c in canvases], 1)  # (b, n)
    return jnp.argmax(fits, axis=1).astype(jnp.int32)  # the last (the canvas) always fits


def pad_to(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """x (c, r, k) zero-padded at the bottom and right to (c, rows, cols)."""
    return jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2])))
