"""Local correlation as Pallas TPU (Mosaic) kernels.

A TPU works on (8, 128) tiles of (sublane, lane); the kernels hold one image row as a (c, w) tile:
channels on sublanes, pixels on lanes (the inputs are transposed to (b, h, c, w) and the row padded to
`wp`, a multiple of 128, with zeros). A displacement along the row is then a lane rotation
(`pltpu.roll`, on the XLU) and the channel sum a reduction over sublanes (VPU adds), and an output row
of one displacement channel is a lane-dense (1, wp) store. Each program owns `block_h` output rows
and reads the `block_h + (p-1)*d` rows of the padded second operand they touch through an
element-indexed (overlapping) block, so the pipeline DMAs every window once.
- forward: for each column shift s = j*d, x1's row is rotated by s once; each of the p displacement
  rows is multiplied with it and summed over sublanes, and the (1, wp) result rotated back by s.
- grad_x1: sum_j roll(sum_i roll(g[k], s) * x2[row i], -s), float32 accumulation.
- grad_x2: with g and x1 zero-padded by ((p-1-r)*d, r*d), grad_x2[:, x] =
  sum_j roll(sum_i gp[row, k] * x1p[row], -(p-1-j)*d) at row y + (p-1-i)*d, float32 accumulation.
Each output block is written by one program: deterministic, no atomics. float32 or bfloat16 inputs;
all arithmetic is float32. Design and memory traffic in README.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .reference import patch_offsets

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MAX_PATCH = 21  # the p*p displacements are unrolled


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Output rows per program (halved until the blocks fit the VMEM budget) and that budget."""

    block_h: int = 8
    vmem_budget: int = 20 * 2**20  # bytes of double-buffered blocks per kernel
    vmem_limit: int = 32 * 2**20  # scoped VMEM asked of Mosaic (blocks + spilled row tiles)


DEFAULT_CONFIG = TpuConfig()


def default_interpret_params() -> pltpu.InterpretParams:
    """TPU interpret mode used when `interpret=True`."""
    return pltpu.InterpretParams()


def _interpret_arg(interpret):
    if interpret is True:
        return default_interpret_params()
    return interpret


def _padded_width(w: int, patch_size: int, dilation_patch: int) -> int:
    """Lanes of a padded row: room for every shift without wrapping, a multiple of 128."""
    return -(-(w + (patch_size - 1) * dilation_patch) // 128) * 128


def _block_h(shape, itemsize: int, patch_size: int, dilation_patch: int, config: TpuConfig) -> int | None:
    """Rows per program whose double-buffered blocks fit config.vmem_budget, or None."""
    _, h, w, c = shape
    wp = _padded_width(w, patch_size, dilation_patch)
    k8 = -(-patch_size * patch_size // 8) * 8
    c8 = -(-c // 8) * 8
    halo = (patch_size - 1) * dilation_patch
    bh = min(config.block_h, h)
    while bh >= 1:
        # the largest kernel (grad_x2): two windows of bh + halo rows (k and c sublanes) and a c-row output
        window = (bh + halo) * (k8 + c8) * wp * itemsize
        out = bh * max(k8, c8) * wp * 4
        if 2 * (window + out) <= config.vmem_budget:
            return bh
        bh //= 2
    return None


def unsupported_reason(x1: jax.ShapeDtypeStruct, patch_size: int, dilation_patch: int) -> str | None:
    """Why the TPU kernels cannot take this call, or None when they can."""
    dtype = jnp.dtype(x1.dtype)
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype.name} is not one of float32, bfloat16"
    if patch_size > MAX_PATCH:
        return f"patch_size {patch_size} > {MAX_PATCH} (the kernels unroll the displacements)"
    if _block_h(x1.shape, dtype.itemsize, patch_size, dilation_patch, DEFAULT_CONFIG) is None:
        return f"one row of shape {x1.shape} with its halo does not fit {DEFAULT_CONFIG.vmem_budget} bytes of VMEM"
    return None


def _roll(x, shift: int):
    """x[:, t] -> out[:, t + shift] along lanes (cyclic); shift may be negative."""
    shift %= x.shape[-1]
    return x if shift == 0 else pltpu.roll(x, shift, 1)


def _forward_kernel(a_ref, x2_ref, o_ref, *, patch, dilation, rows):
    """a_ref (bh, c, wp); x2_ref (bh + halo, c, wp) padded rows; o_ref (bh, p*p, wp)."""

    def body(r, carry):
        a = a_ref[r].astype(jnp.float32)  # (c, wp)
        for j in range(patch):
            shifted = _roll(a, j * dilation)  # (c, wp): x1 at pixel t - s on lane t
            for i in range(patch):
                x2_row = x2_ref[r + i * dilation].astype(jnp.float32)  # (c, wp)
                v = jnp.sum(shifted * x2_row, axis=0, keepdims=True)  # (1, wp)
                o_ref[r, pl.ds(i * patch + j, 1), :] = _roll(v, -j * dilation).astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, rows, body, 0)


def _grad_x1_kernel(g_ref, x2_ref, o_ref, *, patch, dilation, rows):
    """g_ref (bh, p*p, wp); x2_ref (bh + halo, c, wp) padded rows; o_ref (bh, c, wp)."""

    def body(r, carry):
        g = g_ref[r].astype(jnp.float32)  # (p*p, wp)
        acc = jnp.zeros(o_ref.shape[1:], jnp.float32)  # (c, wp)
        for j in range(patch):
            g_shifted = _roll(g, j * dilation)  # (p*p, wp)
            t = jnp.zeros_like(acc)  # (c, wp)
            for i in range(patch):
                k = i * patch + j
                t += g_shifted[k : k + 1] * x2_ref[r + i * dilation].astype(jnp.float32)
            acc += _roll(t, -j * dilation)
        o_ref[r] = acc.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, rows, body, 0)


def _grad_x2_kernel(gp_ref, x1p_ref, o_ref, *, patch, dilation, rows):
    """gp_ref (bh + halo, p*p, wp), x1p_ref (bh + halo, c, wp) padded by (p-1-r)*d; o_ref (bh, c, wp)."""

    def body(r, carry):
        acc = jnp.zeros(o_ref.shape[1:], jnp.float32)  # (c, wp)
        for j in range(patch):
            t = jnp.zeros_like(acc)  # (c, wp)
            for i in range(patch):
                k = i * patch + j
                row = r + (patch - 1 - i) * dilation
                gk = gp_ref[row, pl.ds(k, 1), :].astype(jnp.float32)  # (1, wp)
                t += gk * x1p_ref[row].astype(jnp.float32)
            acc += _roll(t, -(patch - 1 - j) * dilation)
        o_ref[r] = acc.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, rows, body, 0)


def _rows_padded(x, before: int, after: int, hq: int, wp: int):
    """(b, h, w, c) -> (b, before + hq + after, c, wp): transposed, zero rows and lanes around."""
    _, h, w, _ = x.shape
    xt = x.transpose(0, 1, 3, 2)  # (b, h, c, w)
    return jnp.pad(xt, ((0, 0), (before, after + hq - h), (0, 0), (before, wp - w - before)))


def _call(kernel, out_shape, in_specs, out_spec, grid, config, interpret, name, *args):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=config.vmem_limit
        ),
        interpret=_interpret_arg(interpret),
        name=name,
    )(*args)


def _geometry(x1, patch_size: int, dilation_patch: int, config: TpuConfig):
    _, h, w, _ = x1.shape
    bh = _block_h(x1.shape, jnp.dtype(x1.dtype).itemsize, patch_size, dilation_patch, config)
    if bh is None:
        raise ValueError(f"local_correlation pallas_tpu: rows of {x1.shape} do not fit config {config}")
    hq = -(-h // bh) * bh
    return bh, hq, _padded_width(w, patch_size, dilation_patch)


def _specs(bh: int, halo: int):
    """Blocks of bh rows, and windows of bh + halo rows starting at the block's first row."""

    def rows(n):
        return pl.BlockSpec((None, bh, n[0], n[1]), lambda bi, yi: (bi, yi, 0, 0))

    def window(n):
        # Mosaic takes element (overlapping) indexing only when every blocked dimension uses it.
        shape = (None, pl.Element(bh + halo), pl.Element(n[0]), pl.Element(n[1]))
        return pl.BlockSpec(shape, lambda bi, yi: (bi, yi * bh, 0, 0))

    return rows, window


@functools.partial(jax.jit, static_argnames=("patch_size", "dilation_patch", "interpret", "config"))
def forward(
    x1: jnp.ndarray,
    x2: jnp.ndarray,
    *,
    patch_size: int,
    dilation_patch: int,
    interpret=False,
    config: TpuConfig = DEFAULT_CONFIG,
) -> jnp.ndarray:
    """(b, h, w, c) x2 -> (b, h, w, p*p) in x1.dtype."""
    b, h, w, c = x1.shape
    k = patch_size * patch_size
    bh, hq, wp = _geometry(x1, patch_size, dilation_patch, config)
    before, after = patch_offsets(patch_size, dilation_patch)
    rows, window = _specs(bh, before + after)
    a = _rows_padded(x1, 0, 0, hq, wp)  # (b, hq, c, wp)
    x2p = _rows_padded(x2, before, after, hq, wp)  # (b, hq + halo, c, wp)
    out = _call(
        functools.partial(_forward_kernel, patch=patch_size, dilation=dilation_patch, rows=bh),
        jax.ShapeDtypeStruct((b, hq, k, wp), x1.dtype),
        [rows((c, wp)), window((c, wp))],
        rows((k, wp)),
        (b, hq // bh),
        config,
        interpret,
        "local_correlation_fwd_tpu",
        a,
        x2p,
    )  # (b, hq, p*p, wp)
    return out[:, :h, :, :w].transpose(0, 1, 3, 2)


@functools.partial(jax.jit, static_argnames=("patch_size", "dilation_patch", "interpret", "config"))
def backward(
    x1: jnp.ndarray,
    x2: jnp.ndarray,
    grad_output: jnp.ndarray,
    *,
    patch_size: int,
    dilation_patch: int,
    interpret=False,
    config: TpuConfig = DEFAULT_CONFIG,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Gradients of `forward` for x1 and x2 (their dtype)."""
    b, h, w, c = x1.shape
    k = patch_size * patch_size
    bh, hq, wp = _geometry(x1, patch_size, dilation_patch, config)
    before, after = patch_offsets(patch_size, dilation_patch)
    rows, window = _specs(bh, before + after)
    kernel_args = dict(patch=patch_size, dilation=dilation_patch, rows=bh)
    out_shape = jax.ShapeDtypeStruct((b, hq, c, wp), x1.dtype)
    grid = (b, hq // bh)

    g = _rows_padded(grad_output, 0, 0, hq, wp)  # (b, hq, p*p, wp)
    x2p = _rows_padded(x2, before, after, hq, wp)  # (b, hq + halo, c, wp)
    g1 = _call(
        functools.partial(_grad_x1_kernel, **kernel_args),
        out_shape,
        [rows((k, wp)), window((c, wp))],
        rows((c, wp)),
        grid,
        config,
        interpret,
        "local_correlation_bwd_x1_tpu",
        g,
        x2p,
    )  # (b, hq, c, wp)

    gp = _rows_padded(grad_output, after, before, hq, wp)  # (b, hq + halo, p*p, wp)
    x1p = _rows_padded(x1, after, before, hq, wp)  # (b, hq + halo, c, wp)
    g2 = _call(
        functools.partial(_grad_x2_kernel, **kernel_args),
        out_shape,
        [window((k, wp)), window((c, wp))],
        rows((c, wp)),
        grid,
        config,
        interpret,
        "local_correlation_bwd_x2_tpu",
        gp,
        x1p,
    )  # (b, hq, c, wp)
    return tuple(x[:, :h, :, :w].transpose(0, 1, 3, 2) for x in (g1, g2))
