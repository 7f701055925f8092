"""Local correlation as Pallas GPU kernels (Triton lowering).

Three kernels on the same grid (b*h rows, blocks of `block_w` pixels along the row); each program owns
its output tile, so the backward is deterministic (no atomics). Design and memory traffic in README.md.
- forward: the program keeps its x1 tile (bw, c) in registers and, for each of the p*p displacements,
  loads the shifted x2 tile from the zero-padded x2 and writes one output channel (a product summed
  over channels).
- grad_x1: the same loop, accumulating g[:, k] * shifted x2 into a (bw, c) float32 tile.
- grad_x2: the transpose of the shift. With g and x1 zero-padded by ((p-1-r)*d, r*d),
  grad_x2[y, x] = sum_k gp[y + (p-1-i)*d, x + (p-1-j)*d, k] * x1p[same pixel]; both operands are read
  at the same shifted pixel, accumulated into a (bw, c) float32 tile.
The displacement rows run in a loop, the p columns of each row are unrolled. Channels are padded to a
power of two (a Triton tile dimension), rows to a multiple of `block_w`. Inputs may be float32,
bfloat16 or float16; all arithmetic is float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from .reference import patch_offsets

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_CHANNELS = 4096  # padded channels of one pixel live in the registers of one program
MAX_PATCH = 21  # the p columns of a displacement row are unrolled


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tile sizes and Triton launch parameters (powers of two)."""

    block_w: int = 32  # pixels of one row per program
    tile_elems: int = 4096  # bound on block_w * padded channels (the float32 tiles held in registers)
    num_warps: int = 4
    num_stages: int = 1


DEFAULT_CONFIG = GpuConfig()


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def unsupported_reason(x1: jax.ShapeDtypeStruct, patch_size: int, dilation_patch: int) -> str | None:
    """Why the GPU kernels cannot take this call, or None when they can."""
    del dilation_patch
    if jnp.dtype(x1.dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(x1.dtype).name} is not one of float32, bfloat16, float16"
    if _pow2(x1.shape[3]) > MAX_CHANNELS:
        return f"channels C={x1.shape[3]} pad to {_pow2(x1.shape[3])} > {MAX_CHANNELS}"
    if patch_size > MAX_PATCH:
        return f"patch_size {patch_size} > {MAX_PATCH} (the kernels unroll a row of displacements)"
    return None


def _block_w(w: int, cp: int, config: GpuConfig) -> int:
    return max(1, min(config.block_w, _pow2(w), config.tile_elems // cp))


def _forward_kernel(x1_ref, x2_ref, o_ref, *, h, patch, dilation, block_w):
    """x1_ref (bw, cp); x2_ref (hp, wp, cp) padded image; o_ref (bw, p*p)."""
    y = pl.program_id(0) % h
    x0 = pl.program_id(1) * block_w
    a = x1_ref[...].astype(jnp.float32)  # (bw, cp)

    def row(i, carry):
        for j in range(patch):
            win = x2_ref[y + i * dilation, pl.ds(x0 + j * dilation, block_w), :].astype(
                jnp.float32
            )  # (bw, cp)
            o_ref[:, i * patch + j] = jnp.sum(a * win, axis=1).astype(o_ref.dtype)  # (bw,)
        return carry

    lax.fori_loop(0, patch, row, 0)


def _grad_x1_kernel(g_ref, x2_ref, o_ref, *, h, patch, dilation, block_w):
    """g_ref (bw, p*p); x2_ref (hp, wp, cp) padded image; o_ref (bw, cp)."""
    y = pl.program_id(0) % h
    x0 = pl.program_id(1) * block_w

    def row(i, acc):
        for j in range(patch):
            gk = g_ref[:, i * patch + j].astype(jnp.float32)  # (bw,)
            win = x2_ref[y + i * dilation, pl.ds(x0 + j * dilation, block_w), :].astype(
                jnp.float32
            )  # (bw, cp)
            acc += gk[:, None] * win
        return acc

    o_ref[...] = lax.fori_loop(0, patch, row, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def _grad_x2_kernel(gp_ref, x1p_ref, o_ref, *, h, patch, dilation, block_w):
    """gp_ref (hp, wp, p*p) and x1p_ref (hp, wp, cp) padded by (p-1-r)*d before; o_ref (bw, cp)."""
    y = pl.program_id(0) % h
    x0 = pl.program_id(1) * block_w

    def row(i, acc):
        oy = y + (patch - 1 - i) * dilation
        for j in range(patch):
            cols = pl.ds(x0 + (patch - 1 - j) * dilation, block_w)
            gk = gp_ref[oy, cols, i * patch + j].astype(jnp.float32)  # (bw,)
            acc += gk[:, None] * x1p_ref[oy, cols, :].astype(jnp.float32)  # (bw, cp)
        return acc

    o_ref[...] = lax.fori_loop(0, patch, row, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def _compiler_params(config: GpuConfig) -> plgpu_triton.CompilerParams:
    return plgpu_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _layout(x1, patch_size: int, config: GpuConfig):
    """(block_w, padded width wq, padded channels cp)."""
    _, _, w, c = x1.shape
    cp = _pow2(c)
    bw = _block_w(w, cp, config)
    return bw, -(-w // bw) * bw, cp


def _pad_image(x, before: int, after: int, wq: int, cp: int):
    """(b, h, w, c) -> (b, before + h + after, before + wq + after, cp), zeros outside."""
    _, _, w, c = x.shape
    return jnp.pad(x, ((0, 0), (before, after), (before, after + wq - w), (0, cp - c)))


def _call(kernel, out_shape, in_specs, out_spec, grid, config, interpret, name, *args):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name=name,
    )(*args)


@functools.partial(jax.jit, static_argnames=("patch_size", "dilation_patch", "interpret", "config"))
def forward(
    x1: jnp.ndarray,
    x2: jnp.ndarray,
    *,
    patch_size: int,
    dilation_patch: int,
    interpret=False,
    config: GpuConfig = DEFAULT_CONFIG,
) -> jnp.ndarray:
    """(b, h, w, c) x2 -> (b, h, w, p*p) in x1.dtype."""
    b, h, w, _ = x1.shape
    k = patch_size * patch_size
    bw, wq, cp = _layout(x1, patch_size, config)
    before, after = patch_offsets(patch_size, dilation_patch)
    a = _pad_image(x1, 0, 0, wq, cp)  # (b, h, wq, cp)
    x2p = _pad_image(x2, before, after, wq, cp)  # (b, hp, wp, cp)
    out = _call(
        functools.partial(_forward_kernel, h=h, patch=patch_size, dilation=dilation_patch, block_w=bw),
        jax.ShapeDtypeStruct((b, h, wq, k), x1.dtype),
        [
            pl.BlockSpec((None, None, bw, cp), lambda bh, xi: (bh // h, bh % h, xi, 0)),
            pl.BlockSpec((None, *x2p.shape[1:]), lambda bh, xi: (bh // h, 0, 0, 0)),
        ],
        pl.BlockSpec((None, None, bw, k), lambda bh, xi: (bh // h, bh % h, xi, 0)),
        (b * h, wq // bw),
        config,
        interpret,
        "local_correlation_fwd",
        a,
        x2p,
    )  # (b, h, wq, p*p)
    return out[:, :, :w]


@functools.partial(jax.jit, static_argnames=("patch_size", "dilation_patch", "interpret", "config"))
def backward(
    x1: jnp.ndarray,
    x2: jnp.ndarray,
    grad_output: jnp.ndarray,
    *,
    patch_size: int,
    dilation_patch: int,
    interpret=False,
    config: GpuConfig = DEFAULT_CONFIG,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Gradients of `forward` for x1 and x2 (their dtype)."""
    b, h, w, c = x1.shape
    k = patch_size * patch_size
    bw, wq, cp = _layout(x1, patch_size, config)
    before, after = patch_offsets(patch_size, dilation_patch)
    kernel_args = dict(h=h, patch=patch_size, dilation=dilation_patch, block_w=bw)
    tile = pl.BlockSpec((None, None, bw, cp), lambda bh, xi: (bh // h, bh % h, xi, 0))
    grid = (b * h, wq // bw)
    out_shape = jax.ShapeDtypeStruct((b, h, wq, cp), x1.dtype)

    g = jnp.pad(grad_output, ((0, 0), (0, 0), (0, wq - w), (0, 0)))  # (b, h, wq, p*p)
    x2p = _pad_image(x2, before, after, wq, cp)  # (b, hp, wp, cp)
    g1 = _call(
        functools.partial(_grad_x1_kernel, **kernel_args),
        out_shape,
        [
            pl.BlockSpec((None, None, bw, k), lambda bh, xi: (bh // h, bh % h, xi, 0)),
            pl.BlockSpec((None, *x2p.shape[1:]), lambda bh, xi: (bh // h, 0, 0, 0)),
        ],
        tile,
        grid,
        config,
        interpret,
        "local_correlation_bwd_x1",
        g,
        x2p,
    )  # (b, h, wq, cp)

    gp = _pad_image(grad_output, after, before, wq, k)  # (b, hp, wp, p*p)
    x1p = _pad_image(x1, after, before, wq, cp)  # (b, hp, wp, cp)
    g2 = _call(
        functools.partial(_grad_x2_kernel, **kernel_args),
        out_shape,
        [
            pl.BlockSpec((None, *gp.shape[1:]), lambda bh, xi: (bh // h, 0, 0, 0)),
            pl.BlockSpec((None, *x1p.shape[1:]), lambda bh, xi: (bh // h, 0, 0, 0)),
        ],
        tile,
        grid,
        config,
        interpret,
        "local_correlation_bwd_x2",
        gp,
        x1p,
    )  # (b, h, wq, cp)
    return g1[:, :, :w, :c], g2[:, :, :w, :c]
