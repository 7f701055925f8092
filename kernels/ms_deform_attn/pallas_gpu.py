"""Multi-scale deformable attention as Pallas GPU kernels (Triton lowering).

Three kernels (design and memory traffic in README.md):
- forward: grid (q blocks, b*h); each program gathers the 4 bilinear corner rows of value for
  `block_q` queries and every (level, point), and accumulates them in float32 registers.
- query-side backward: same grid; gathers the same rows, dots them with the output cotangent and
  writes grad_locations and grad_attention_weights (each program owns its queries: no atomics).
- value-side backward: deterministic, no atomics. The taps are sorted by the value row they read
  (a stable sort in XLA); `splits` programs share `block_s` rows of value of one (b, h), each walks
  its share of the contiguous run of sorted taps that read those rows, gathers the cotangent rows of
  the tapping queries and reduces them into the rows with a one-hot matmul (exact float32); the
  partial sums are added in a fixed order. Same inputs give bitwise the same grad_value.
Inputs may be float32, bfloat16 or float16; all arithmetic is float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from .reference import level_starts, sampling_taps

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_HEAD_DIM = 256  # head dim padded to a power of two; (block_q, d) float32 tiles must stay in registers
MAX_SAMPLES = 64  # levels * points: the (level, point, corner) loops are unrolled in the kernels


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tile sizes and Triton launch parameters (powers of two)."""

    block_q: int = 64  # queries per program in the forward and query-side backward
    block_s: int = 32  # value rows per program in the value-side backward
    chunk: int = 64  # sorted taps per step of the value-side backward loop
    splits: int = 4  # programs sharing one row block's taps (partial sums added in a fixed order)
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = GpuConfig()


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(d: int) -> int:
    """Head dim rounded up to a power of two, at least 16 (the Triton dot minimum)."""
    return max(16, _pow2(d))


def unsupported_reason(value: jax.ShapeDtypeStruct, sampling_locations: jax.ShapeDtypeStruct) -> str | None:
    """Why the GPU kernels cannot take this call, or None when they can."""
    _, _, _, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if jnp.dtype(value.dtype) not in SUPPORTED_DTYPES:
        return f"value dtype {jnp.dtype(value.dtype).name} is not one of float32, bfloat16, float16"
    if padded_head_dim(d) > MAX_HEAD_DIM:
        return f"head dim D={d} pads to {padded_head_dim(d)} > {MAX_HEAD_DIM}"
    if levels * points > MAX_SAMPLES:
        return f"levels*points={levels * points} > {MAX_SAMPLES} (the kernels unroll that loop)"
    if q * levels * points * 4 >= 2**31:
        return f"Q*L*P*4={q * levels * points * 4} taps per (batch, head) overflow int32 sort keys"
    return None


def _compiler_params(config: GpuConfig) -> plgpu_triton.CompilerParams:
    return plgpu_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _corners(x_loc, y_loc, height: int, width: int, start: int):
    """Bilinear taps of one (level, point) for a block of queries.

    x_loc, y_loc (bq,) normalised. Returns fx, fy (bq,) and 4 corners (tl, tr, bl, br), each
    (row (bq,) int32 clamped into the level, inside (bq,) bool, bilinear weight (bq,)).
    """
    # Clipping to [-2, size + 1] leaves every tap outside the level exactly as before (zero weight,
    # zero gradient) and keeps the float -> int conversion in range for far-away samples.
    x = jnp.clip(x_loc.astype(jnp.float32) * width - 0.5, -2.0, width + 1.0)  # (bq,)
    y = jnp.clip(y_loc.astype(jnp.float32) * height - 0.5, -2.0, height + 1.0)  # (bq,)
    x0f = jnp.floor(x)
    y0f = jnp.floor(y)
    fx = x - x0f  # (bq,)
    fy = y - y0f  # (bq,)
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    corners = []
    for dy in (0, 1):
        for dx in (0, 1):
            cx = x0 + dx  # (bq,)
            cy = y0 + dy  # (bq,)
            inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)  # (bq,)
            row = start + jnp.clip(cy, 0, height - 1) * width + jnp.clip(cx, 0, width - 1)  # (bq,)
            weight = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)  # (bq,)
            corners.append((row, inside, weight))
    return fx, fy, corners


def _forward_kernel(v_ref, loc_ref, attn_ref, o_ref, *, spatial_shapes, points):
    """v_ref (s, dp); loc_ref (l*p*2, bq); attn_ref (l*p, bq); o_ref (bq, dp)."""
    starts = level_starts(spatial_shapes)
    acc = jnp.zeros(o_ref.shape, jnp.float32)  # (bq, dp)
    for lvl, (height, width) in enumerate(spatial_shapes):
        for p in range(points):
            j = lvl * points + p
            a = attn_ref[j, :].astype(jnp.float32)  # (bq,)
            _, _, corners = _corners(
                loc_ref[2 * j, :], loc_ref[2 * j + 1, :], height, width, int(starts[lvl])
            )
            for row, inside, weight in corners:
                coef = jnp.where(inside, weight, 0.0) * a  # (bq,)
                acc += coef[:, None] * v_ref[row, :].astype(jnp.float32)  # (bq, dp)
    o_ref[...] = acc.astype(o_ref.dtype)


def _query_backward_kernel(v_ref, loc_ref, attn_ref, g_ref, gloc_ref, gattn_ref, *, spatial_shapes, points):
    """v_ref (s, dp); loc_ref (l*p*2, bq); attn_ref (l*p, bq); g_ref (bq, dp) -> gloc_ref, gattn_ref."""
    starts = level_starts(spatial_shapes)
    g = g_ref[...].astype(jnp.float32)  # (bq, dp)
    for lvl, (height, width) in enumerate(spatial_shapes):
        for p in range(points):
            j = lvl * points + p
            a = attn_ref[j, :].astype(jnp.float32)  # (bq,)
            fx, fy, corners = _corners(
                loc_ref[2 * j, :], loc_ref[2 * j + 1, :], height, width, int(starts[lvl])
            )
            dots = [
                jnp.where(inside, jnp.sum(v_ref[row, :].astype(jnp.float32) * g, axis=1), 0.0)  # (bq,)
                for row, inside, _ in corners
            ]
            tl, tr, bl, br = dots
            gattn_ref[j, :] = sum(w * dot for (_, _, w), dot in zip(corners, dots))
            gfx = a * ((1.0 - fy) * (tr - tl) + fy * (br - bl))  # (bq,)
            gfy = a * ((1.0 - fx) * (bl - tl) + fx * (br - tr))  # (bq,)
            gloc_ref[2 * j, :] = gfx * width
            gloc_ref[2 * j + 1, :] = gfy * height


def _value_backward_kernel(
    offs_ref, key_ref, order_ref, coef_ref, g_ref, gv_ref, *, taps, block_s, chunk, n_taps, splits, n_blocks
):
    """Part j of rows [si*block_s, (si+1)*block_s) of grad_value for one (b, h).

    offs_ref (b*h, n_s+1) start of each row block in the sorted taps; key_ref (k,) sorted rows;
    order_ref (k,) tap id (q*taps + t) of each sorted tap; coef_ref (k,) coefficient per tap id;
    g_ref (q, dp) output cotangent; gv_ref (block_s, dp) float32 partial sum over the j-th of `splits`
    equal shares of the block's taps. Row blocks run in reverse order: the coarse levels, whose rows
    are read by the most taps, start first.
    """
    si = n_blocks - 1 - pl.program_id(0)
    part = pl.program_id(1)
    bh = pl.program_id(2)
    begin = offs_ref[bh, si]
    end = offs_ref[bh, si + 1]
    rows = si * block_s + lax.broadcasted_iota(jnp.int32, (block_s, chunk), 0)  # (bs, chunk)

    def step(i, acc):
        pos = begin + i * chunk + lax.broadcasted_iota(jnp.int32, (chunk,), 0)  # (chunk,)
        live = pos < end  # (chunk,)
        pos = jnp.minimum(pos, n_taps - 1)
        key = key_ref[pos]  # (chunk,)
        tap = order_ref[pos]  # (chunk,)
        coef = jnp.where(live, coef_ref[tap], 0.0)  # (chunk,)
        contrib = coef[:, None] * g_ref[tap // taps, :].astype(jnp.float32)  # (chunk, dp)
        onehot = ((key[None, :] == rows) & live[None, :]).astype(jnp.float32)  # (bs, chunk)
        return acc + jnp.dot(onehot, contrib, precision=lax.Precision.HIGHEST)  # (bs, dp)

    n_steps = (end - begin + chunk - 1) // chunk
    lo = n_steps * part // splits
    hi = n_steps * (part + 1) // splits
    gv_ref[...] = lax.fori_loop(lo, hi, step, jnp.zeros(gv_ref.shape, jnp.float32))


def _prepare(value, sampling_locations, attention_weights, block_q: int):
    """Kernel layouts: value (b, s, h, dp); locations (b*h, l*p*2, qp); weights (b*h, l*p, qp)."""
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    dp = padded_head_dim(d)
    qp = -(-q // block_q) * block_q
    v = jnp.pad(value, ((0, 0), (0, 0), (0, 0), (0, dp - d)))  # (b, s, h, dp)
    loc = sampling_locations.transpose(0, 2, 3, 4, 5, 1).reshape(b * heads, levels * points * 2, q)
    loc = jnp.pad(loc, ((0, 0), (0, 0), (0, qp - q)))  # (b*h, l*p*2, qp)
    attn = attention_weights.transpose(0, 2, 3, 4, 1).reshape(b * heads, levels * points, q)
    attn = jnp.pad(attn, ((0, 0), (0, 0), (0, qp - q)))  # (b*h, l*p, qp)
    return v, loc, attn, dp, qp


def _query_specs(s: int, heads: int, dp: int, samples: int, block_q: int):
    value_spec = pl.BlockSpec((None, s, None, dp), lambda qi, bh: (bh // heads, 0, bh % heads, 0))
    loc_spec = pl.BlockSpec((None, samples * 2, block_q), lambda qi, bh: (bh, 0, qi))
    attn_spec = pl.BlockSpec((None, samples, block_q), lambda qi, bh: (bh, 0, qi))
    row_spec = pl.BlockSpec((None, block_q, None, dp), lambda qi, bh: (bh // heads, qi, bh % heads, 0))
    return value_spec, loc_spec, attn_spec, row_spec


@functools.partial(jax.jit, static_argnames=("spatial_shapes", "interpret", "config"))
def forward(
    value: jnp.ndarray,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
    *,
    interpret=False,
    config: GpuConfig = DEFAULT_CONFIG,
) -> jnp.ndarray:
    """(b, s, h, d), (b, q, h, l, p, 2), (b, q, h, l, p) -> (b, q, h*d) in value.dtype."""
    b, s, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    block_q = min(config.block_q, _pow2(q))
    v, loc, attn, dp, qp = _prepare(value, sampling_locations, attention_weights, block_q)
    value_spec, loc_spec, attn_spec, row_spec = _query_specs(s, heads, dp, levels * points, block_q)
    out = pl.pallas_call(
        functools.partial(_forward_kernel, spatial_shapes=spatial_shapes, points=points),
        out_shape=jax.ShapeDtypeStruct((b, qp, heads, dp), value.dtype),
        grid=(qp // block_q, b * heads),
        in_specs=[value_spec, loc_spec, attn_spec],
        out_specs=row_spec,
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="ms_deform_attn_fwd",
    )(v, loc, attn)  # (b, qp, h, dp)
    return out[:, :q, :, :d].reshape(b, q, heads * d)


def _sorted_taps(spatial_shapes, sampling_locations, attention_weights, s_pad: int, block_s: int):
    """Taps of every (b, h) sorted by the value row they read (stable), and row-block offsets.

    Returns keys (b*h, k) sorted rows (s_pad for taps outside their level, which sort last and are
    never read), order (b*h, k) tap id q*taps + t of each sorted tap, coef (b*h, k) by tap id, and
    offs (b*h, s_pad/block_s + 1) the first sorted position of each block of block_s rows.
    """
    b, q, heads, levels, points, _ = sampling_locations.shape
    flat, coef, inside = sampling_taps(spatial_shapes, sampling_locations, attention_weights)
    n_taps = q * levels * points * 4
    keys = jnp.where(inside, flat, s_pad).transpose(0, 2, 1, 3, 4, 5).reshape(b * heads, n_taps)
    coef = coef.transpose(0, 2, 1, 3, 4, 5).reshape(b * heads, n_taps)  # (b*h, k)
    tap_ids = lax.broadcasted_iota(jnp.int32, keys.shape, 1)  # (b*h, k)
    keys, order = lax.sort((keys, tap_ids), dimension=1, num_keys=1, is_stable=True)  # (b*h, k) x2
    bounds = jnp.arange(0, s_pad + 1, block_s, dtype=jnp.int32)  # (n_s+1,)
    offs = jax.vmap(lambda k: jnp.searchsorted(k, bounds, side="left", method="scan_unrolled"))(keys).astype(
        jnp.int32
    )
    return keys, order, coef, offs


@functools.partial(jax.jit, static_argnames=("spatial_shapes", "interpret", "config"))
def backward(
    value: jnp.ndarray,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
    grad_output: jnp.ndarray,
    *,
    interpret=False,
    config: GpuConfig = DEFAULT_CONFIG,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Gradients of `forward` for value, sampling_locations, attention_weights (their dtypes)."""
    b, s, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    samples = levels * points
    block_q = min(config.block_q, _pow2(q))
    v, loc, attn, dp, qp = _prepare(value, sampling_locations, attention_weights, block_q)
    g = grad_output.reshape(b, q, heads, d)
    g = jnp.pad(g, ((0, 0), (0, qp - q), (0, 0), (0, dp - d)))  # (b, qp, h, dp)

    value_spec, loc_spec, attn_spec, row_spec = _query_specs(s, heads, dp, samples, block_q)
    gloc, gattn = pl.pallas_call(
        functools.partial(_query_backward_kernel, spatial_shapes=spatial_shapes, points=points),
        out_shape=(
            jax.ShapeDtypeStruct(loc.shape, jnp.float32),
            jax.ShapeDtypeStruct(attn.shape, jnp.float32),
        ),
        grid=(qp // block_q, b * heads),
        in_specs=[value_spec, loc_spec, attn_spec, row_spec],
        out_specs=(loc_spec, attn_spec),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="ms_deform_attn_bwd_query",
    )(v, loc, attn, g)  # (b*h, l*p*2, qp), (b*h, l*p, qp)
    gloc = gloc[:, :, :q].reshape(b, heads, levels, points, 2, q).transpose(0, 5, 1, 2, 3, 4)
    gattn = gattn[:, :, :q].reshape(b, heads, levels, points, q).transpose(0, 4, 1, 2, 3)

    block_s = config.block_s
    s_pad = -(-s // block_s) * block_s
    keys, order, coef, offs = _sorted_taps(
        spatial_shapes, sampling_locations, attention_weights, s_pad, block_s
    )
    n_taps = keys.shape[1]
    n_blocks = s_pad // block_s
    splits = config.splits
    rev = n_blocks - 1
    taps_spec = pl.BlockSpec((None, n_taps), lambda si, j, bh: (bh, 0))
    parts = pl.pallas_call(
        functools.partial(
            _value_backward_kernel,
            taps=samples * 4,
            block_s=block_s,
            chunk=config.chunk,
            n_taps=n_taps,
            splits=splits,
            n_blocks=n_blocks,
        ),
        out_shape=jax.ShapeDtypeStruct((splits, b, s_pad, heads, dp), jnp.float32),
        grid=(n_blocks, splits, b * heads),
        in_specs=[
            pl.BlockSpec(offs.shape, lambda si, j, bh: (0, 0)),
            taps_spec,
            taps_spec,
            taps_spec,
            pl.BlockSpec((None, qp, None, dp), lambda si, j, bh: (bh // heads, 0, bh % heads, 0)),
        ],
        out_specs=pl.BlockSpec(
            (None, None, block_s, None, dp), lambda si, j, bh: (j, bh // heads, rev - si, bh % heads, 0)
        ),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="ms_deform_attn_bwd_value",
    )(offs, keys, order, coef, g)  # (splits, b, s_pad, h, dp)
    gv = parts[0]
    for j in range(1, splits):  # fixed order: deterministic
        gv = gv + parts[j]
    return (
        gv[:, :s, :, :d].astype(value.dtype),
        gloc.astype(sampling_locations.dtype),
        gattn.astype(attention_weights.dtype),
    )
