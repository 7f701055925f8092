"""Mix Transformer (MiT, the SegFormer encoder) B0-B5 in Flax NNX, NHWC.

Follows refign `models/backbones/mix_transformer.py` (= DAFormer's mmseg MiT): attribute names mirror
its modules (`patch_embed1..4.{proj,norm}`, `block1..4.{i}.{norm1, attn.{q,kv,proj,sr,norm}, norm2,
mlp.{fc1,dwconv.dwconv,fc2}}`, `norm1..4`), so a checkpoint converts by renames only.

Numerics as the original: LayerNorm eps 1e-6 in blocks and stage norms (`layer_norm_eps`; transformers'
`SegformerModel` uses 1e-5 there), 1e-5 in patch-embed and spatial-reduction norms; spatial reduction
is a conv with kernel = stride = sr (floor, as torch) + LayerNorm; Mix-FFN fc1 -> 3x3 depthwise conv ->
exact GELU -> fc2; stochastic depth linear from 0 to `drop_path_rate` over all blocks, active in train
mode only. Parameters fp32; `dtype` sets the compute dtype (LayerNorm and softmax stay fp32).

`block_remat` (memory for compute, off by default): each transformer block runs under `nnx.remat` with
the named `jax.checkpoint_policies` policy, so a backward pass keeps what the policy saves
("nothing_saveable": only each block's input) and recomputes the rest of the block; outputs and
gradients are unchanged. XLA may schedule those recomputations early, all at once (XLA CPU does:
benchmarks/RESULTS.md); "gated" keeps only each block's input too, through a `jax.custom_vjp` whose
backward recomputes the block behind an optimization barrier with the block's output cotangent, so the
recomputation cannot run before the backward pass reaches that block.

`scan_blocks` (off by default) runs each stage's blocks as one `jax.lax.scan` over their parameters,
stacked at call time (the module and parameter layout stay as above), with the scan body under
jax.checkpoint keeping only each block's input: the backward pass is a loop recomputing one block per
iteration, which a compiler cannot hoist. Each block's stochastic-depth rate is scanned data and its mask
comes from that block's own "dropout" key stream, so outputs, gradients and drop-path draws are those of
the unrolled blocks. It replaces `block_remat` (the two together raise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lqseg_jax.models.layers import DropPath

# The original: trunc_normal_(std=.02, a=-2, b=2). The bounds are absolute, i.e. +-100 std, so the
# truncation never acts: a plain normal is the same distribution.
_LINEAR_INIT = jax.nn.initializers.normal(0.02)
PATCH_SIZES = (7, 3, 3, 3)
PATCH_STRIDES = (4, 2, 2, 2)
# block_remat: what each block keeps for the backward pass, as jax.checkpoint_policies names, or "gated"
BLOCK_REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "gated")

MIT_PRESETS: dict[str, dict] = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
for _preset in MIT_PRESETS.values():
    _preset.update(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratio=4, qkv_bias=True)


def _conv_init(kernel_size: int, out_channels: int, groups: int = 1) -> jax.nn.initializers.Initializer:
    """The original's conv init: N(0, sqrt(2 / fan_out)), fan_out = k * k * out / groups."""
    fan_out = kernel_size * kernel_size * out_channels // groups
    return jax.nn.initializers.normal(math.sqrt(2.0 / fan_out))


def _linear(in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_init=_LINEAR_INIT, rngs=rngs
    )


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


def stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Feature-map size of each stage for an input of (height, width), with torch conv arithmetic."""
    sizes = []
    for k, s in zip(PATCH_SIZES, PATCH_STRIDES):
        pad = k // 2
        height = (height + 2 * pad - k) // s + 1
        width = (width + 2 * pad - k) // s + 1
        sizes.append((height, width))
    return sizes


class OverlapPatchEmbed(nnx.Module):
    """Strided conv with padding k // 2, then LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        pad = patch_size // 2
        self.proj = nnx.Conv(
            in_chans,
            embed_dim,
            (patch_size, patch_size),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            dtype=dtype,
            kernel_init=_conv_init(patch_size, embed_dim),
            rngs=rngs,
        )
        self.norm = _layer_norm(embed_dim, 1e-5, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)  # (b, h', w', c)
        return self.norm(x.astype(jnp.float32)).astype(self.dtype)  # (b, h', w', c)


class Attention(nnx.Module):
    """Efficient self-attention: keys/values from a spatially reduced map (conv k = s = sr_ratio + LN)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool, *, dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.dtype = dtype
        self.q = _linear(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.kv = _linear(dim, 2 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = _linear(dim, dim, use_bias=True, dtype=dtype, rngs=rngs)
        if sr_ratio > 1:
            self.sr = nnx.Conv(
                dim,
                dim,
                (sr_ratio, sr_ratio),
                strides=sr_ratio,
                padding="VALID",
                dtype=dtype,
                kernel_init=_conv_init(sr_ratio, dim),
                rngs=rngs,
            )
            self.norm = _layer_norm(dim, 1e-5, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, h * w, heads, head_dim)  # (b, n, heads, d)
        if self.sr_ratio > 1:
            x = self.sr(x.astype(self.dtype))  # (b, h // sr, w // sr, c)
            x = self.norm(x.astype(jnp.float32))  # (b, h // sr, w // sr, c) fp32
        kv = self.kv(x).reshape(b, -1, 2, heads, head_dim)  # (b, m, 2, heads, d): k then v, as torch
        out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])  # (b, n, heads, d), softmax fp32
        return self.proj(out.reshape(b, h, w, c))  # (b, h, w, c)


class DWConv(nnx.Module):
    """3x3 depthwise conv with bias (`dwconv.dwconv` in the checkpoints)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.dwconv = nnx.Conv(
            dim,
            dim,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=dim,
            dtype=dtype,
            kernel_init=_conv_init(3, dim, groups=dim),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dwconv(x)  # (b, h, w, c)


class Mlp(nnx.Module):
    """Mix-FFN: fc1 -> depthwise 3x3 conv -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden, use_bias=True, dtype=dtype, rngs=rngs)
        self.dwconv = DWConv(hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(hidden, dim, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.fc1(x)  # (b, h, w, hidden)
        x = self.dwconv(x)  # (b, h, w, hidden)
        x = jax.nn.gelu(x, approximate=False)  # (b, h, w, hidden)
        return self.fc2(x)  # (b, h, w, c)


class Block(nnx.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        layer_norm_eps: float,
        *,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.norm1 = _layer_norm(dim, layer_norm_eps, rngs)
        self.attn = Attention(dim, num_heads, sr_ratio, qkv_bias, dtype=dtype, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.norm2 = _layer_norm(dim, layer_norm_eps, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, keep_prob: jax.Array | None = None) -> jax.Array:
        """`keep_prob` (a traced fp32 scalar, 1 - rate) replaces the static drop-path rate (scan_blocks)."""
        x = x + self._drop_path(self.attn(self.norm1(x.astype(jnp.float32))), keep_prob)  # (b, h, w, c)
        return x + self._drop_path(self.mlp(self.norm2(x.astype(jnp.float32))), keep_prob)  # (b, h, w, c)

    def _drop_path(self, y: jax.Array, keep_prob: jax.Array | None) -> jax.Array:
        if keep_prob is None:
            return self.drop_path(y)  # (b, h, w, c)
        if self.drop_path.deterministic:
            return y
        # nnx.Dropout's draw with the rate as data: the key is the stream's next one, as the DropPath would
        # draw it, but the stream only advances where the rate is positive (a rate-0 DropPath draws nothing)
        stream = self.drop_path.rngs
        key = jax.random.fold_in(stream.key[...], stream.count[...])
        stream.count[...] += (keep_prob < 1).astype(stream.count.dtype)
        keep = jax.random.bernoulli(key, keep_prob, (y.shape[0], 1, 1, 1))  # (b, 1, 1, 1)
        return jnp.where(keep, y / keep_prob.astype(y.dtype), jnp.zeros_like(y))  # (b, h, w, c)


def _call(block: Block, x: jax.Array) -> jax.Array:
    return block(x)  # (b, h, w, c)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)  # integer counts, RNG keys


def _gated_call(block: Block, x: jax.Array) -> jax.Array:
    """block(x), keeping only x (and the block's state) for the backward pass, which recomputes the block
    after its output cotangent has arrived: the input and the cotangent go through one optimization
    barrier, so a compiler cannot schedule the recomputation early (as it may with jax.checkpoint)."""
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    def apply(params, rest, x):
        module = nnx.merge(graphdef, params, rest, copy=True)
        y = module(x)  # (b, h, w, c)
        return y, nnx.state(module, nnx.Not(nnx.Param))  # drop-path RNG counts advanced

    @jax.custom_vjp
    def run(params, rest, x):
        return apply(params, rest, x)

    def run_fwd(params, rest, x):
        return apply(params, rest, x), (params, rest, x)

    def run_bwd(saved, cotangents):
        ct_y = cotangents[0]  # (b, h, w, c)
        saved, ct_y = jax.lax.optimization_barrier((saved, ct_y))
        params, rest, x = saved
        _, vjp = jax.vjp(lambda p, xx: apply(p, rest, xx)[0], params, x)
        ct_params, ct_x = vjp(ct_y)
        return ct_params, jax.tree.map(_zero_cotangent, rest), ct_x

    run.defvjp(run_fwd, run_bwd)
    y, rest = run(params, rest, x)
    nnx.update(block, rest)
    return y  # (b, h, w, c)


def _scan_stage(blocks: Sequence[Block], x: jax.Array) -> jax.Array:
    """The stage's blocks as one jax.lax.scan over their stacked states, the body under jax.checkpoint
    (only each block's input saved): the backward pass is a loop that recomputes one block per iteration.
    Each block's drop-path rate goes in as scanned data (keep probability), its drop-path key stream
    too; the advanced streams are written back to the blocks."""
    if len({b.drop_path.deterministic for b in blocks}) > 1:
        raise ValueError(
            "MixVisionTransformer: scan_blocks needs a stage's blocks all in train or all in eval mode"
        )
    graphdef = nnx.graphdef(blocks[0])  # the blocks differ only in their static drop-path rate
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *[nnx.state(b) for b in blocks])  # (depth, ...) leaves
    keep_prob = jnp.asarray([1.0 - b.drop_path.rate for b in blocks], jnp.float32)  # (depth,)

    @partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    def body(x, scanned):
        state, keep = scanned
        block = nnx.merge(graphdef, state, copy=True)
        return block(x, keep), nnx.state(block, nnx.RngState)  # (b, h, w, c), advanced streams

    x, streams = jax.lax.scan(body, x, (stacked, keep_prob))  # (b, h, w, c)
    for i, block in enumerate(blocks):
        nnx.update(block, jax.tree.map(lambda v, i=i: v[i], streams))
    return x  # (b, h, w, c)


class MixVisionTransformer(nnx.Module):
    """MiT encoder. Input (b, h, w, in_chans), already normalised; output the 4 stage features (b, h_s, w_s,
    embed_dims[s]) at strides 4, 8, 16, 32 in the compute dtype. Torch conv arithmetic: any h, w at least
    `min_input_side()` (29 for sr ratios 8/4/2/1), square or not, divisible by 32 or not.

    Train/eval mode (`model.train()`, `model.eval()`) switches stochastic depth; its randomness comes from
    the "dropout" stream of `rngs` (or "default" when there is none).
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        depths: Sequence[int] = (3, 6, 40, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float = 4,
        qkv_bias: bool = True,
        in_chans: int = 3,
        drop_path_rate: float = 0.1,
        layer_norm_eps: float = 1e-6,
        dtype=jnp.float32,
        block_remat: str | None = None,
        scan_blocks: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        if block_remat is not None and block_remat not in BLOCK_REMAT_POLICIES:
            raise ValueError(
                f"MixVisionTransformer: block_remat must be None or one of {', '.join(BLOCK_REMAT_POLICIES)} "
                f"(jax.checkpoint_policies), got {block_remat!r}"
            )
        if scan_blocks and block_remat is not None:
            raise ValueError(
                f"MixVisionTransformer: scan_blocks already rematerialises each block (only its input "
                f"saved); block_remat must be None with it, got {block_remat!r}"
            )
        for name, seq in dict(
            embed_dims=embed_dims, num_heads=num_heads, depths=depths, sr_ratios=sr_ratios
        ).items():
            if len(seq) != 4:
                raise ValueError(
                    f"MixVisionTransformer: {name} must have 4 entries (one per stage), got {seq}"
                )
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.depths = tuple(int(d) for d in depths)
        self.sr_ratios = tuple(int(s) for s in sr_ratios)
        self.in_chans = in_chans
        self.dtype = dtype
        self.block_remat = block_remat
        self.scan_blocks = scan_blocks
        rates = np.linspace(0.0, drop_path_rate, sum(self.depths))  # stochastic depth decay rule
        cur = 0
        in_dim = in_chans
        for s in range(4):
            dim = self.embed_dims[s]
            embed = OverlapPatchEmbed(in_dim, dim, PATCH_SIZES[s], PATCH_STRIDES[s], dtype=dtype, rngs=rngs)
            blocks = nnx.List(
                [
                    Block(
                        dim,
                        num_heads[s],
                        self.sr_ratios[s],
                        mlp_ratio,
                        qkv_bias,
                        float(rates[cur + i]),
                        layer_norm_eps,
                        dtype=dtype,
                        rngs=rngs,
                    )
                    for i in range(self.depths[s])
                ]
            )
            setattr(self, f"patch_embed{s + 1}", embed)
            setattr(self, f"block{s + 1}", blocks)
            setattr(self, f"norm{s + 1}", _layer_norm(dim, layer_norm_eps, rngs))
            cur += self.depths[s]
            in_dim = dim

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> MixVisionTransformer:
        """`name` in b0..b5 (or mit_b0..mit_b5); kwargs (rngs, dtype, drop_path_rate, ...) go to __init__."""
        key = name.removeprefix("mit_")
        if key not in MIT_PRESETS:
            raise ValueError(f"unknown MiT preset '{name}'; expected one of {sorted(MIT_PRESETS)}")
        return cls(**MIT_PRESETS[key], **kwargs)

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(
                f"MixVisionTransformer: input must be NHWC with {self.in_chans} channels, got shape {x.shape}"
            )
        sizes = stage_sizes(x.shape[1], x.shape[2])
        for s, ((h, w), sr) in enumerate(zip(sizes, self.sr_ratios)):
            if min(h, w) < sr:
                raise ValueError(
                    f"MixVisionTransformer: input {x.shape[1]}x{x.shape[2]} is too small: stage {s + 1} is "
                    f"{h}x{w}, smaller than its spatial reduction {sr} (each side needs >= "
                    f"{self.min_input_side()} pixels)"
                )

    def min_input_side(self) -> int:
        """The smallest input side for which every stage is at least as large as its spatial reduction."""
        side = 1
        while any(h < sr for (h, _), sr in zip(stage_sizes(side, side), self.sr_ratios)):
            side += 1
        return side

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        self._check_input(x)
        x = x.astype(self.dtype)  # (b, h, w, in_chans)
        run_block = _call
        if self.block_remat == "gated":
            run_block = _gated_call
        elif self.block_remat is not None:
            run_block = nnx.remat(_call, policy=getattr(jax.checkpoint_policies, self.block_remat))
        outs = []
        for s in range(1, 5):
            x = getattr(self, f"patch_embed{s}")(x)  # (b, h_s, w_s, c_s)
            blocks = getattr(self, f"block{s}")
            if self.scan_blocks:
                x = _scan_stage(blocks, x)  # (b, h_s, w_s, c_s)
            else:
                for blk in blocks:
                    x = run_block(blk, x)  # (b, h_s, w_s, c_s)
            x = getattr(self, f"norm{s}")(x.astype(jnp.float32)).astype(self.dtype)  # (b, h_s, w_s, c_s)
            outs.append(x)
        return outs
