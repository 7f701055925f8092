"""Multi-scale deformable attention as Pallas TPU (Mosaic) kernels.

A TPU has no fast per-row gather from VMEM, so the kernels turn the gather into matmuls on the MXU.
Bilinear sampling with zero padding is a separable hat filter: the weight of pixel (yi, xi) for a
sample at pixel coordinates (y, x) is relu(1 - |y - yi|) * relu(1 - |x - xi|), exactly the 4 bilinear
corner weights and 0 everywhere else (and 0 outside the level, which has no pixels there). For a
block of queries and a chunk of positions of one level the kernel builds the dense sampling matrix

    A[q, s] = sum_p a[q, p] * relu(1 - |y[q, p] - ys[s]|) * relu(1 - |x[q, p] - xs[s]|)

on the VPU and contracts it with the value chunk on the MXU: out += A @ V. Work is O(Q * S) per
(b, h), like dense attention; no index arithmetic, no masking, no atomics.
- forward: grid (b*h, q blocks, s chunks), s innermost, float32 accumulator in VMEM.
- backward for locations and weights: same grid; G = g @ V^T (MXU), then per point the hat filters
  and their derivatives reduce G over the chunk (VPU, lane reductions).
- backward for value: grid (b*h, s chunks, q blocks), q innermost: grad_V += A^T @ g. Each output
  chunk is owned by one program sequence, so the result is deterministic.
Each level is padded to a multiple of the chunk size, so a chunk never straddles two levels; the
chunk -> level table is scalar-prefetched into SMEM and picks the (level, point) columns of the
sampling parameters through the BlockSpec index maps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Tile sizes: queries per block (multiple of 8) and positions per chunk (multiple of 128)."""

    block_q: int = 128
    block_s: int = 256


DEFAULT_CONFIG = TpuConfig()


def unsupported_reason(value: jax.ShapeDtypeStruct, sampling_locations: jax.ShapeDtypeStruct) -> str | None:
    """Why the TPU kernels cannot take this call, or None when they can."""
    del sampling_locations
    if jnp.dtype(value.dtype) not in SUPPORTED_DTYPES:
        return f"value dtype {jnp.dtype(value.dtype).name} is not one of float32, bfloat16"
    return None


def default_interpret_params() -> pltpu.InterpretParams:
    """TPU interpret mode used when `interpret=True`."""
    return pltpu.InterpretParams()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static layout of the padded level-major position axis."""

    chunk: int  # positions per chunk
    padded_sizes: tuple[int, ...]  # per level, multiple of chunk
    padded_starts: tuple[int, ...]
    chunk_level: np.ndarray  # (n_chunks,) level of each chunk
    chunk_first: np.ndarray  # (n_chunks,) 1 on the first chunk of a level
    coords: np.ndarray  # (2, s_pad) pixel row and column of each padded position


def _layout(spatial_shapes: tuple[tuple[int, int], ...], block_s: int) -> _Layout:
    chunk = min(block_s, _round_up(max(h * w for h, w in spatial_shapes), 128))
    sizes = tuple(_round_up(h * w, chunk) for h, w in spatial_shapes)
    starts = tuple(int(x) for x in np.cumsum([0, *sizes[:-1]]))
    levels = np.concatenate([np.full(n // chunk, lvl, np.int32) for lvl, n in enumerate(sizes)])
    first = np.concatenate([(np.arange(n // chunk) == 0).astype(np.int32) for n in sizes])
    coords = np.zeros((2, sum(sizes)), np.float32)
    for (h, w), start in zip(spatial_shapes, starts):
        ys, xs = np.divmod(np.arange(h * w), w)
        coords[0, start : start + h * w] = ys
        coords[1, start : start + h * w] = xs
    return _Layout(chunk, sizes, starts, levels, first, coords)


def _hat(u):
    """Bilinear weight relu(1 - |u|) and its derivative, u = sample - pixel coordinate.

    The derivative follows the floor-based formula of the original op (and of autodiff of the
    reference) also at integer u: -1 on [0, 1), +1 on [-1, 0), 0 elsewhere.
    """
    weight = jnp.maximum(1.0 - jnp.abs(u), 0.0)
    slope = jnp.where((u >= 0.0) & (u < 1.0), -1.0, jnp.where((u >= -1.0) & (u < 0.0), 1.0, 0.0))
    return weight, slope


def _sampling_matrix(coords, samp, points: int):
    """coords (2, ts) pixel (row, col); samp (bq, 3p) = [x | y | a] -> A (bq, ts) float32."""
    ys = coords[0:1, :]  # (1, ts)
    xs = coords[1:2, :]  # (1, ts)
    mat = jnp.zeros((samp.shape[0], coords.shape[1]), jnp.float32)  # (bq, ts)
    for p in range(points):
        x = samp[:, p : p + 1]  # (bq, 1)
        y = samp[:, points + p : points + p + 1]  # (bq, 1)
        a = samp[:, 2 * points + p : 2 * points + p + 1]  # (bq, 1)
        hx = jnp.maximum(1.0 - jnp.abs(x - xs), 0.0)  # (bq, ts)
        hy = jnp.maximum(1.0 - jnp.abs(y - ys), 0.0)  # (bq, ts)
        mat += (a * hy) * hx
    return mat


def _forward_kernel(level_ref, v_ref, coords_ref, samp_ref, o_ref, acc_ref, *, points):
    """v_ref (ts, d); coords_ref (2, ts); samp_ref (bq, 3p); o_ref (bq, d); acc_ref (bq, d) f32."""
    del level_ref  # used by the index maps
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    mat = _sampling_matrix(coords_ref[...], samp_ref[...], points)  # (bq, ts)
    acc_ref[...] += jnp.dot(
        mat,
        v_ref[...].astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # (bq, d)

    @pl.when(c == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _sampling_backward_kernel(level_ref, first_ref, v_ref, coords_ref, samp_ref, g_ref, out_ref, *, points):
    """Grads of [x | y | a] for one query block and level, accumulated over that level's chunks.

    v_ref (ts, d); coords_ref (2, ts); samp_ref (bq, 3p); g_ref (bq, d); out_ref (bq, 3p) float32.
    """
    del level_ref  # used by the index maps
    c = pl.program_id(2)

    @pl.when(first_ref[c] == 1)
    def _init():
        out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

    gv = lax.dot_general(
        g_ref[...].astype(jnp.float32),
        v_ref[...].astype(jnp.float32),
        (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # (bq, ts): <g[q], V[s]>
    coords = coords_ref[...]
    samp = samp_ref[...]
    ys = coords[0:1, :]  # (1, ts)
    xs = coords[1:2, :]  # (1, ts)
    for p in range(points):
        a = samp[:, 2 * points + p : 2 * points + p + 1]  # (bq, 1)
        hx, dhx = _hat(samp[:, p : p + 1] - xs)  # (bq, ts) x2
        hy, dhy = _hat(samp[:, points + p : points + p + 1] - ys)  # (bq, ts) x2
        hy_g = hy * gv  # (bq, ts)
        out_ref[:, p : p + 1] += a * jnp.sum(hy_g * dhx, axis=1, keepdims=True)
        out_ref[:, points + p : points + p + 1] += a * jnp.sum(dhy * hx * gv, axis=1, keepdims=True)
        out_ref[:, 2 * points + p : 2 * points + p + 1] += jnp.sum(hy_g * hx, axis=1, keepdims=True)


def _value_backward_kernel(level_ref, coords_ref, samp_ref, g_ref, gv_ref, acc_ref, *, points):
    """coords_ref (2, ts); samp_ref (bq, 3p); g_ref (bq, d); gv_ref (ts, d); acc_ref (ts, d) f32."""
    del level_ref  # used by the index maps
    qi = pl.program_id(2)

    @pl.when(qi == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    mat = _sampling_matrix(coords_ref[...], samp_ref[...], points)  # (bq, ts)
    acc_ref[...] += lax.dot_general(
        mat,
        g_ref[...].astype(jnp.float32),
        (((0,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # (ts, d)

    @pl.when(qi == pl.num_programs(2) - 1)
    def _store():
        gv_ref[...] = acc_ref[...].astype(gv_ref.dtype)


def _pad_positions(x, spatial_shapes, layout: _Layout):
    """(n, s, ...) in level order -> (n, s_pad, ...) with every level zero-padded to its padded size."""
    parts = []
    start = 0
    for (h, w), size in zip(spatial_shapes, layout.padded_sizes):
        part = x[:, start : start + h * w]
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, size - h * w)
        parts.append(jnp.pad(part, pad))
        start += h * w
    return jnp.concatenate(parts, axis=1)


def _unpad_positions(x, spatial_shapes, layout: _Layout):
    """(n, s_pad, ...) -> (n, s, ...)."""
    parts = [x[:, start : start + h * w] for (h, w), start in zip(spatial_shapes, layout.padded_starts)]
    return jnp.concatenate(parts, axis=1)


def _prepare(value, spatial_shapes, sampling_locations, attention_weights, layout, block_q):
    """value (b*h, s_pad, d); sampling parameters (l, b*h, qp, 3p) = [x | y | a] in pixel units."""
    b, s, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    qp = _round_up(q, block_q)
    v = value.transpose(0, 2, 1, 3).reshape(b * heads, s, d)  # (b*h, s, d)
    v = _pad_positions(v, spatial_shapes, layout)  # (b*h, s_pad, d)
    ws = jnp.asarray([w for _, w in spatial_shapes], jnp.float32)[:, None]  # (l, 1)
    hs = jnp.asarray([h for h, _ in spatial_shapes], jnp.float32)[:, None]  # (l, 1)
    loc = sampling_locations.astype(jnp.float32)
    x = loc[..., 0] * ws - 0.5  # (b, q, h, l, p)
    y = loc[..., 1] * hs - 0.5  # (b, q, h, l, p)
    samp = jnp.stack([x, y, attention_weights.astype(jnp.float32)], axis=4)  # (b, q, h, l, 3, p)
    samp = samp.transpose(3, 0, 2, 1, 4, 5).reshape(levels, b * heads, q, 3 * points)
    samp = jnp.pad(samp, ((0, 0), (0, 0), (0, qp - q), (0, 0)))  # (l, b*h, qp, 3p)
    return v, samp, qp


def _block_q(q: int, config: TpuConfig) -> int:
    return min(config.block_q, _round_up(q, 8))


def _interpret_arg(interpret):
    if interpret is True:
        return default_interpret_params()
    return interpret


@functools.partial(jax.jit, static_argnames=("spatial_shapes", "interpret", "config"))
def forward(
    value: jnp.ndarray,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
    *,
    interpret=False,
    config: TpuConfig = DEFAULT_CONFIG,
) -> jnp.ndarray:
    """(b, s, h, d), (b, q, h, l, p, 2), (b, q, h, l, p) -> (b, q, h*d) in value.dtype."""
    b, _, heads, d = value.shape
    _, q, _, _, points, _ = sampling_locations.shape
    layout = _layout(spatial_shapes, config.block_s)
    block_q = _block_q(q, config)
    v, samp, qp = _prepare(value, spatial_shapes, sampling_locations, attention_weights, layout, block_q)
    ts = layout.chunk
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b * heads, qp // block_q, len(layout.chunk_level)),
        in_specs=[
            pl.BlockSpec((None, ts, d), lambda bh, qi, c, lvl: (bh, c, 0)),
            pl.BlockSpec((2, ts), lambda bh, qi, c, lvl: (0, c)),
            pl.BlockSpec((None, None, block_q, 3 * points), lambda bh, qi, c, lvl: (lvl[c], bh, qi, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, d), lambda bh, qi, c, lvl: (bh, qi, 0)),
        scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_forward_kernel, points=points),
        out_shape=jax.ShapeDtypeStruct((b * heads, qp, d), value.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="ms_deform_attn_fwd_tpu",
    )(jnp.asarray(layout.chunk_level), v, jnp.asarray(layout.coords), samp)  # (b*h, qp, d)
    out = out[:, :q].reshape(b, heads, q, d).transpose(0, 2, 1, 3)  # (b, q, h, d)
    return out.reshape(b, q, heads * d)


@functools.partial(jax.jit, static_argnames=("spatial_shapes", "interpret", "config"))
def backward(
    value: jnp.ndarray,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
    grad_output: jnp.ndarray,
    *,
    interpret=False,
    config: TpuConfig = DEFAULT_CONFIG,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Gradients of `forward` for value, sampling_locations, attention_weights (their dtypes)."""
    b, s, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    layout = _layout(spatial_shapes, config.block_s)
    block_q = _block_q(q, config)
    v, samp, qp = _prepare(value, spatial_shapes, sampling_locations, attention_weights, layout, block_q)
    g = grad_output.reshape(b, q, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, q, d)
    g = jnp.pad(g, ((0, 0), (0, qp - q), (0, 0)))  # (b*h, qp, d)
    ts = layout.chunk
    n_chunks = len(layout.chunk_level)
    n_q = qp // block_q
    interpret = _interpret_arg(interpret)
    chunk_level = jnp.asarray(layout.chunk_level)
    coords = jnp.asarray(layout.coords)

    samp_spec = pl.BlockSpec(
        (None, None, block_q, 3 * points), lambda bh, qi, c, lvl, first: (lvl[c], bh, qi, 0)
    )
    gsamp = pl.pallas_call(
        functools.partial(_sampling_backward_kernel, points=points),
        out_shape=jax.ShapeDtypeStruct(samp.shape, jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b * heads, n_q, n_chunks),
            in_specs=[
                pl.BlockSpec((None, ts, d), lambda bh, qi, c, lvl, first: (bh, c, 0)),
                pl.BlockSpec((2, ts), lambda bh, qi, c, lvl, first: (0, c)),
                samp_spec,
                pl.BlockSpec((None, block_q, d), lambda bh, qi, c, lvl, first: (bh, qi, 0)),
            ],
            out_specs=samp_spec,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="ms_deform_attn_bwd_sampling_tpu",
    )(chunk_level, jnp.asarray(layout.chunk_first), v, coords, samp, g)  # (l, b*h, qp, 3p)

    gv = pl.pallas_call(
        functools.partial(_value_backward_kernel, points=points),
        out_shape=jax.ShapeDtypeStruct(v.shape, value.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b * heads, n_chunks, n_q),
            in_specs=[
                pl.BlockSpec((2, ts), lambda bh, c, qi, lvl: (0, c)),
                pl.BlockSpec((None, None, block_q, 3 * points), lambda bh, c, qi, lvl: (lvl[c], bh, qi, 0)),
                pl.BlockSpec((None, block_q, d), lambda bh, c, qi, lvl: (bh, qi, 0)),
            ],
            out_specs=pl.BlockSpec((None, ts, d), lambda bh, c, qi, lvl: (bh, c, 0)),
            scratch_shapes=[pltpu.VMEM((ts, d), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="ms_deform_attn_bwd_value_tpu",
    )(chunk_level, coords, samp, g)  # (b*h, s_pad, d)

    gv = _unpad_positions(gv, spatial_shapes, layout).reshape(b, heads, s, d).transpose(0, 2, 1, 3)
    gsamp = gsamp[:, :, :q].reshape(levels, b, heads, q, 3, points)  # (l, b, h, q, 3, p)
    ws = jnp.asarray([w for _, w in spatial_shapes], jnp.float32)[
        :, None, None, None, None
    ]  # (l, 1, 1, 1, 1)
    hs = jnp.asarray([h for h, _ in spatial_shapes], jnp.float32)[
        :, None, None, None, None
    ]  # (l, 1, 1, 1, 1)
    gloc = jnp.stack([gsamp[:, :, :, :, 0] * ws, gsamp[:, :, :, :, 1] * hs], axis=-1)  # (l, b, h, q, p, 2)
    gloc = gloc.transpose(1, 3, 2, 0, 4, 5)  # (b, q, h, l, p, 2)
    gattn = gsamp[:, :, :, :, 2].transpose(1, 3, 2, 0, 4)  # (b, q, h, l, p)
    return gv, gloc.astype(sampling_locations.dtype), gattn.astype(attention_weights.dtype)
