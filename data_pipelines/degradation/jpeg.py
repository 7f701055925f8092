"""JPEG compression round trip as basicsr's DiffJPEG(differentiable=False), batched with per-image quality.

Steps (images as 0-255 floats, nothing rounded to integers except the DCT coefficients):
1. RGB -> YCbCr (JFIF matrix, +128 on the chroma).
2. 4:2:0: Cb and Cr averaged over 2 x 2 blocks.
3. 8 x 8 orthonormal DCT-II of (plane - 128) per block.
4. Quantisation: round(coef / (table * f)) * (table * f) with torch.round semantics (half to even), where
   f = 50 / q for q < 50 else (200 - 2 q) / 100, q a float (not rounded to an integer).
5. Inverse DCT, chroma upsampled by repeating each sample 2 x 2, YCbCr -> RGB, clamp to [0, 255].

DiffJPEG differs from libjpeg in ways we keep, because RASS trained with it: the quantisation tables are
the standard Annex K tables TRANSPOSED (its tables are stored `.T` while its DCT output is indexed [vertical,
horizontal]), they are scaled as floats (libjpeg rounds and clips them to 1..255), pixels stay floats
(libjpeg rounds them to 8 bits before and after), chroma is upsampled by repetition (libjpeg's default
is a triangle filter) and the image is padded with zeros (black) to a multiple of 16 on the bottom and
right, which darkens the last partial blocks. Callers pass a canvas whose size is a multiple of 16 and that
is zero outside each image's valid region, which gives exactly that padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Annex K tables, rows = vertical frequency, as in the JPEG standard
LUMA_TABLE = np.array(
    [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
     [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
     [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float32,
)  # fmt: skip
CHROMA_TABLE = np.full((8, 8), 99, np.float32)
CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

_RGB_TO_YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32
)
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], np.float32)


def quality_factor(quality: jax.Array) -> jax.Array:
    """DiffJPEG's table scale for a (float) quality in (0, 100]."""
    return jnp.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality) / 100.0


def dct_matrix() -> np.ndarray:
    """Orthonormal 8-point DCT-II matrix D[u, x] = a(u)/2 cos((2x + 1) u pi / 16)."""
    u, x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    alpha = np.where(u == 0, 1 / math.sqrt(2), 1.0)
    return (alpha / 2 * np.cos((2 * x + 1) * u * math.pi / 16)).astype(np.float32)


def _block_codec(planes: jax.Array, table: jax.Array) -> jax.Array:
    """DCT, quantise with `table` (8, 8), dequantise, inverse DCT of every 8 x 8 block of planes (k, H, W)."""
    k, h, w = planes.shape
    d = jnp.asarray(dct_matrix())
    blocks = (planes - 128.0).reshape(k, h // 8, 8, w // 8, 8)  # (k, i, x, j, y)
    coef = jnp.einsum("ux,kixjy,vy->kiujv", d, blocks, d)  # (k, i, u, j, v)
    t = table[None, None, :, None, :]  # (1, 1, u, 1, v)
    coef = jnp.round(coef / t) * t
    blocks = jnp.einsum("ux,kiujv,vy->kixjy", d, coef, d)  # (k, i, x, j, y)
    return blocks.reshape(k, h, w) + 128.0


def jpeg(x: jax.Array, quality: jax.Array, transposed: bool = False) -> jax.Array:
    """JPEG round trip of one image x (3, H, W) in [0, 1] (H, W multiples of 16) at quality (scalar).

    transposed: x holds the image transposed, (3, W, H); the blocks' coefficients are then transposed too,
    so the tables are, and the result is exactly the transpose of the round trip of the upright image."""
    c, h, w = x.shape
    if c != 3 or h % 16 or w % 16:
        raise ValueError(f"jpeg: expected (3, H, W) with H, W multiples of 16, got {x.shape}")
    ycc = jnp.einsum("kc,chw->khw", jnp.asarray(_RGB_TO_YCC), x * 255.0)  # (3, H, W), chroma centred on 0
    chroma = ycc[1:]
    chroma = 0.25 * (
        chroma[:, 0::2, 0::2] + chroma[:, 1::2, 0::2] + chroma[:, 0::2, 1::2] + chroma[:, 1::2, 1::2]
    )
    f = quality_factor(quality)
    luma_table, chroma_table = (LUMA_TABLE, CHROMA_TABLE) if transposed else (LUMA_TABLE.T, CHROMA_TABLE.T)
    luma = _block_codec(ycc[:1], jnp.asarray(luma_table) * f)  # (1, H, W)
    chroma = _block_codec(chroma + 128.0, jnp.asarray(chroma_table) * f) - 128.0  # (2, H/2, W/2)
    chroma = jnp.broadcast_to(chroma[:, :, None, :, None], (2, h // 2, 2, w // 2, 2)).reshape(2, h, w)
    rgb = jnp.einsum("ck,khw->chw", jnp.asarray(_YCC_TO_RGB), jnp.concatenate([luma, chroma]))  # (3, H, W)
    return jnp.clip(rgb, 0.0, 255.0) / 255.0
