"""Gaussian and Poisson noise as basicsr's `random_add_{gaussian,poisson}_noise_pt`, for one image.

Per image: Gaussian with probability p, sigma ~ U(noise_range) on the 0-255 scale; else Poisson with
scale ~ U(poisson_scale_range). Either is "gray" (one field shared by R, G and B) with probability
gray_noise_prob. The result is clipped to [0, 1] and not rounded.

Poisson (basicsr): the image (or its grey version 0.2989 R + 0.587 G + 0.114 B) is rounded to 8 bits, v; the
number n of distinct 8-bit values it holds gives vals = 2^ceil(log2 n); noise = Poisson(v vals) / vals - v,
times the scale. We count the distinct values without sorting, by scattering "present" into 256 slots
(pixels outside the image's valid region go to a 257th).

Every noise value comes from one uniform u per pixel and channel (gray: per pixel) by inversion: Gaussian
z = Phi^-1(u); Poisson X = F^-1(u) for F the Poisson(lambda) CDF, exactly (sequential search over 28
terms) for lambda < 8, and above by the Cornish-Fisher quantile to third order (Poisson cumulants all equal
lambda) with Sheppard's correction for the rounding:
    X = floor(lambda + c sqrt(lambda) z + (z^2 - 1)/6 + (z - z^3)/(72 sqrt(lambda)) + 1/2),
    c = sqrt(1 - 1/(12 lambda)).
Its total-variation distance to Poisson(lambda) is 8e-4 at lambda = 8, 2.6e-4 at 16, 3e-5 at 64 (tests/
data_pipelines/test_degradation.py measures it); mean and variance match to 1e-5 relative. Exact samplers
for every lambda (rejection loops, table searches) need per-pixel loops or gathers, ~20x slower on a CPU.

Random bits: "threefry" is jax.random; "hash" (the default) derives a 64-bit seed per image and stage from
the key with jax.random and hashes (seed, pixel index) with two rounds of the lowbias32 integer hash
(C. Wellons), six times faster than threefry on a CPU and statistically fine for image noise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
POISSON_EXACT_BELOW = 8.0
_EXACT_TERMS = 28  # P(X > 28 | lambda < 8) < 2e-9
NOISE_RNGS = ("hash", "threefry")


def _lowbias32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniforms(key: jax.Array, shape: tuple[int, ...], method: str) -> jax.Array:
    """Uniforms in the open interval (0, 1) of `shape` for one image, from a single key."""
    if method == "threefry":
        bits = jax.random.bits(key, shape, jnp.uint32)
    elif method == "hash":
        seed = jax.random.bits(key, (2,), jnp.uint32)
        count = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
        bits = _lowbias32(_lowbias32(count ^ seed[0]) + seed[1])
    else:
        raise ValueError(f"noise rng: expected one of {NOISE_RNGS}, got {method!r}")
    return open_unit(bits)


def open_unit(bits: jax.Array) -> jax.Array:
    """uint32 bits -> float32 uniforms strictly inside (0, 1): the top 23 bits, centred in their cell, so
    the largest is 1 - 2^-24. (With 24 bits the top cell's centre 1 - 2^-25 rounds to exactly 1.0 in float32,
    where the normal quantile is infinite and the Poisson quantile NaN.)"""
    return ((bits >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))


def normal_quantile(u: jax.Array) -> jax.Array:
    return jnp.sqrt(2.0) * jax.lax.erf_inv(2.0 * u - 1.0)


def poisson_quantile(lam: jax.Array, u: jax.Array) -> jax.Array:
    """Poisson(lam) count for uniform u by inversion, see the module docstring. float32, elementwise."""
    small = jnp.minimum(lam, POISSON_EXACT_BELOW)
    p = jnp.exp(-small)
    cdf = p
    exact = jnp.zeros_like(u)
    for k in range(1, _EXACT_TERMS + 1):
        exact = exact + (u > cdf).astype(u.dtype)
        p = p * small * (1.0 / k)
        cdf = cdf + p
    z = normal_quantile(u)
    big = jnp.maximum(lam, POISSON_EXACT_BELOW)
    root = jnp.sqrt(big)
    sheppard = jnp.sqrt(1.0 - 1.0 / (12.0 * big))  # rounding to an integer adds variance 1/12
    quantile = big + sheppard * root * z + (z * z - 1.0) / 6.0 + (z - z * z * z) / (72.0 * root)
    approx = jnp.maximum(jnp.floor(quantile + 0.5), 0.0)
    return jnp.where(lam < POISSON_EXACT_BELOW, exact, approx)


def count_levels(levels: jax.Array, valid: jax.Array) -> jax.Array:
    """Number of distinct values of int32 `levels` (0..255) where `valid` (a presence scatter)."""
    slot = jnp.where(valid, levels, 256).reshape(-1)
    present = jnp.zeros(257, jnp.int32).at[slot].max(1, mode="promise_in_bounds")
    return jnp.sum(present[:256])


def _levels(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(x * 255.0), 0.0, 255.0)


def _poisson_noise(img: jax.Array, valid: jax.Array, u: jax.Array) -> jax.Array:
    """basicsr's Poisson noise (before the scale) of img (k, H, W) given uniforms u like img."""
    level = _levels(img)
    n = count_levels(level.astype(jnp.int32), jnp.broadcast_to(valid > 0, level.shape))
    vals = jnp.left_shift(1, 32 - jax.lax.clz(n - 1)).astype(jnp.float32)  # 2^ceil(log2 n)
    v = level / 255.0
    return poisson_quantile(v * vals, u) / vals - v


def grey_plane(x: jax.Array) -> jax.Array:
    """torchvision's rgb_to_grayscale of planar images (..., 3, H, W) -> (..., 1, H, W)."""
    r, g, b = GRAY_WEIGHTS
    return r * x[..., 0:1, :, :] + g * x[..., 1:2, :, :] + b * x[..., 2:3, :, :]


def add_noise(x, grey, valid, key, params: dict, method: str) -> jax.Array:
    """Adds one image's noise. x (3, H, W); grey (1, H, W) its grey version (`grey_plane`, computed outside
    the per-image loop, where XLA CPU handles it ~10x faster); valid (1, H, W) float mask; key: the image's
    noise key; params: gaussian, sigma, poisson_scale, gray (scalars). Returns clip(x + noise, 0, 1) on the
    valid region, 0 outside.

    One branch per kind (Gaussian / Poisson x colour / gray) is picked with lax.switch, so only the drawn
    noise is computed. Each branch returns (colour noise (3, H, W), gray noise (1, H, W)), the other one zero:
    the gray plane is broadcast over the channels only after the switch has written it to memory (broadcast
    inside, XLA would compute it three times)."""
    plane = (1, *x.shape[1:])
    zeros_color, zeros_gray = jnp.zeros_like(x), jnp.zeros_like(grey)
    sigma = params["sigma"] / 255.0

    def gaussian_color():
        return normal_quantile(uniforms(key, x.shape, method)) * sigma, zeros_gray

    def gaussian_gray():
        return zeros_color, normal_quantile(uniforms(key, plane, method)) * sigma

    def poisson_color():
        return _poisson_noise(x, valid, uniforms(key, x.shape, method)) * params["poisson_scale"], zeros_gray

    def poisson_gray():
        return zeros_color, _poisson_noise(grey, valid, uniforms(key, plane, method)) * params[
            "poisson_scale"
        ]

    branch = 2 * (1 - params["gaussian"].astype(jnp.int32)) + params["gray"].astype(jnp.int32)
    color, gray = jax.lax.switch(branch, (gaussian_color, gaussian_gray, poisson_color, poisson_gray))
    return jnp.clip(x + color + gray, 0.0, 1.0) * valid  # (3, H, W)
