"""Local correlation in pure JAX: the reference every kernel is tested against.

Semantics of spatial-correlation-sampler with kernel size 1, stride 1, no padding (refign.md section 5),
in NHWC: for inputs x1, x2 (b, h, w, c) and a patch of p x p displacements with r = (p - 1) // 2,

    out[n, y, x, i*p + j] = sum_c x1[n, y, x, c] * x2[n, y + (i - r)*d, x + (j - r)*d, c]

with d = dilation_patch, terms with x2 outside the image taken as zero, and no 1/c normalisation.
Channel (dy + r)*p + (dx + r) holds displacement (dy*d, dx*d). x2 is zero-padded once and each of the
p*p shifted windows is multiplied with x1 and summed over channels; autodiff gives both gradients.

Computation runs in float32 (float64 for float64 inputs, so `check_grads` can use finite differences in
double precision); the output has the inputs' dtype.
"""

from __future__ import annotations

import jax.numpy as jnp


def patch_offsets(patch_size: int, dilation_patch: int) -> tuple[int, int]:
    """(before, after): the padding of x2 above/left and below/right that every displacement needs."""
    r = (patch_size - 1) // 2
    return r * dilation_patch, (patch_size - 1 - r) * dilation_patch


def compute_dtype(*arrays: jnp.ndarray) -> jnp.dtype:
    """float32, or float64 when an input is float64 (x64 mode)."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def local_correlation_reference(
    x1: jnp.ndarray, x2: jnp.ndarray, *, patch_size: int = 9, dilation_patch: int = 1
) -> jnp.ndarray:
    """x1, x2 (b, h, w, c) -> (b, h, w, patch_size**2) in x1's dtype, accumulated in float32."""
    _, h, w, _ = x1.shape
    dtype = compute_dtype(x1, x2)
    before, after = patch_offsets(patch_size, dilation_patch)
    a = x1.astype(dtype)  # (b, h, w, c)
    padded = jnp.pad(x2.astype(dtype), ((0, 0), (before, after), (before, after), (0, 0)))  # (b, hp, wp, c)
    outs = []
    for i in range(patch_size):
        for j in range(patch_size):
            oy, ox = i * dilation_patch, j * dilation_patch
            window = padded[:, oy : oy + h, ox : ox + w, :]  # (b, h, w, c)
            outs.append(jnp.sum(a * window, axis=-1))  # (b, h, w)
    return jnp.stack(outs, axis=-1).astype(x1.dtype)  # (b, h, w, p*p)
