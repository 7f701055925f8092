"""RAM (Recognize Anything, ram_swin_large_14m) tagging path in Flax NNX, as RASS runs it (ram.md section 2).

Attribute names mirror RASS's `RAMLora` state dict minus the LoRA factors (`visual_encoder.layers.0.blocks.1.
attn.qkv`, `tagging_head.encoder.layer.0.crossattention.self.query`, `label_embed`, `fc`, ...), so a
converter is a table (lqseg_jax/convert/ram.py). Only what `generate_tag` reads is built: the Tag2Text
leftovers (`tag_encoder`, `text_decoder`) are not.

    x (b, H, W, 3) in [-1, 1] -> `preprocess`: x*0.5+0.5, bilinear squash to 384x384 (align_corners=False,
        no antialias, torchvision 0.16 on a tensor), ImageNet normalisation
    SwinTransformer (Swin-L/384, window 12; stage 3 clamped to its 12x12 resolution: no shift)
        -> cat[mean token, 144 tokens] (b, 145, 1536)
    image_proj (b, 145, 512); queries relu(wordvec_proj(label_embed)) (4585, 768)
    tagging_head: 2 x [cross-attention (4 heads of 192, K/V from 512) + post-norm, FFN + post-norm],
        no self-attention, LayerNorm eps 1e-12
    fc -> logits (b, 4585); `tag_mask`: fp16(sigmoid(logits)) > thresholds (fp32), as RASS compares.

Precision: parameters fp32; `dtype` sets the compute dtype of convolutions, linears and attention;
LayerNorms and softmax run in fp32, logits are returned in fp32. Train mode (`model.train()`) turns on the
original's stochastic parts: Swin drop-path (linspace(0, 0.1) over the 24 blocks) and the head's dropout
0.1 (attention probabilities and both dense outputs); they draw from the "dropout" stream of `rngs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import resize_bilinear
from .sd_unet import LayerNorm

Dtype = Any

NUM_TAGS = 4585
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHIFT_MASK_VALUE = -100.0  # Swin's attention mask between different shifted regions (not -inf)


@dataclasses.dataclass(frozen=True)
class RAMConfig:
    """ram_swin_large_14m as RASS builds it (config_swinL_384.json, q2l_config.json with encoder_width 512)."""

    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    swin_eps: float = 1e-5
    num_classes: int = NUM_TAGS
    embed_width: int = 512  # image_proj output, label_embed width, the head's encoder_width
    hidden_size: int = 768
    head_layers: int = 2
    head_heads: int = 4
    intermediate_size: int = 3072
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    head_eps: float = 1e-12

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"RAMConfig: {len(self.depths)} depths but {len(self.num_heads)} num_heads")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"RAMConfig: image_size {self.image_size} not divisible by patch {self.patch_size}"
            )
        for i, (res, win) in enumerate(zip(self.resolutions, self.windows, strict=True)):
            if res % win:
                raise ValueError(f"RAMConfig: stage {i} resolution {res} not divisible by its window {win}")
        if self.hidden_size % self.head_heads:
            raise ValueError(
                f"RAMConfig: hidden_size {self.hidden_size} not divisible by {self.head_heads} heads"
            )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Token grid side per stage (96, 48, 24, 12 for Swin-L/384)."""
        r = self.image_size // self.patch_size
        return tuple(r // 2**i for i in range(len(self.depths)))

    @property
    def windows(self) -> tuple[int, ...]:
        """Window side per stage: the configured window, clamped to the stage's resolution (Swin's rule)."""
        return tuple(min(self.window_size, r) for r in self.resolutions)

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


# ----------------------------------------------------------------------------------------------------------
# Swin helpers (numpy, static)


def relative_position_index(window: int) -> np.ndarray:
    """(w*w, w*w) index into the (2w-1)^2 bias table, row offset major (Swin's buffer)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(
        2, -1
    )  # (2, T)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, T, T)
    return rel[0] * (2 * window - 1) + rel[1]  # (T, T)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(b, H, W, c) -> (b * nW, window * window, c), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)  # (b, nh, ws, nw, ws, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)  # (b*nW, T, c)


def window_reverse(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """(b * nW, window * window, c) -> (b, H, W, c)."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, w // window, window, window, c)  # (b, nh, nw, ws, ws, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)  # (b, H, W, c)


def shift_attention_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """(nW, T, T) additive mask of a shifted block: 0 within a region, -100 across regions."""
    regions = np.zeros((h, w), np.float32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for hs in cuts:
        for ws in cuts:
            regions[hs, ws] = count
            count += 1
    ids = window_partition(regions[None, :, :, None], window)[..., 0]  # (nW, T), numpy
    diff = ids[:, None, :] - ids[:, :, None]  # (nW, T, T)
    return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Swin transformer


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(
            3, cfg.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype, rngs=rngs
        )
        self.norm = LayerNorm(cfg.embed_dim, cfg.swin_eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))  # (b, H/4, W/4, c)


class WindowAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, window: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.window = window
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)  # rows [q; k; v]
        self.relative_position_bias_table = nnx.Param(
            jax.nn.initializers.truncated_normal(0.02)(rngs.params(), ((2 * window - 1) ** 2, heads))
        )
        self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        n, t, c = x.shape  # n = b * nW windows of t tokens
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads)  # (n, t, 3, heads, d)
        idx = relative_position_index(self.window)  # (t, t)
        bias = self.relative_position_bias_table[...][idx].transpose(2, 0, 1)  # (heads, t, t)
        bias = bias[None].astype(jnp.float32)  # (1, heads, t, t)
        if mask is not None:
            nw = mask.shape[0]
            bias = bias + jnp.asarray(mask)[:, None]  # (nW, heads, t, t)
            bias = jnp.broadcast_to(bias[None], (n // nw, *bias.shape)).reshape(n, *bias.shape[1:])
        out = jax.nn.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias.astype(qkv.dtype)
        )  # (n, t, heads, d), scale d**-0.5, softmax in fp32
        return self.proj(out.reshape(n, t, c))  # (n, t, c)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # (..., dim)


class SwinTransformerBlock(nnx.Module):
    """Pre-norm window attention (cyclic shift of window // 2 in odd blocks unless clamped) + MLP."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        heads: int,
        window: int,
        shift: int,
        cfg: RAMConfig,
        drop_path: float,
        *,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.resolution = resolution
        self.window = window
        self.shift = shift
        self.norm1 = LayerNorm(dim, cfg.swin_eps, rngs=rngs)
        self.attn = WindowAttention(dim, heads, window, dtype=dtype, rngs=rngs)
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), deterministic=True, rngs=rngs)
        self.norm2 = LayerNorm(dim, cfg.swin_eps, rngs=rngs)
        self.mlp = Mlp(dim, dim * cfg.mlp_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, c = x.shape
        r, ws, s = self.resolution, self.window, self.shift
        h = self.norm1(x).reshape(b, r, r, c)  # (b, r, r, c)
        if s:
            h = jnp.roll(h, (-s, -s), axis=(1, 2))
        mask = shift_attention_mask(r, r, ws, s) if s else None  # (nW, T, T)
        h = self.attn(window_partition(h, ws), mask)  # (b*nW, T, c)
        h = window_reverse(h, ws, r, r)  # (b, r, r, c)
        if s:
            h = jnp.roll(h, (s, s), axis=(1, 2))
        x = x + self.drop_path(h.reshape(b, length, c))  # (b, L, c)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (b, L, c)


class PatchMerging(nnx.Module):
    """2x2 neighbours concatenated row offset first ([r0c0, r1c0, r0c1, r1c1]), LayerNorm(4c), Linear 4c -> 2c."""

    def __init__(self, dim: int, resolution: int, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.resolution = resolution
        self.norm = LayerNorm(4 * dim, cfg.swin_eps, rngs=rngs)
        self.reduction = nnx.Linear(4 * dim, 2 * dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, c = x.shape
        r = self.resolution
        x = x.reshape(b, r, r, c)  # (b, r, r, c)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))  # (b, L/4, 2c)


class BasicLayer(nnx.Module):
    def __init__(self, i: int, cfg: RAMConfig, drop_paths: Sequence[float], *, dtype: Dtype, rngs: nnx.Rngs):
        dim = cfg.embed_dim * 2**i
        res, win = cfg.resolutions[i], cfg.windows[i]
        shift = 0 if res <= cfg.window_size else cfg.window_size // 2
        self.blocks = nnx.List(
            [
                SwinTransformerBlock(
                    dim,
                    res,
                    cfg.num_heads[i],
                    win,
                    shift if j % 2 else 0,
                    cfg,
                    drop_paths[j],
                    dtype=dtype,
                    rngs=rngs,
                )
                for j in range(cfg.depths[i])
            ]
        )
        last = i == len(cfg.depths) - 1
        self.downsample = None if last else PatchMerging(dim, res, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)  # (b, L, c)
        return x if self.downsample is None else self.downsample(x)


class SwinTransformer(nnx.Module):
    """RAM's `visual_encoder`: NHWC image (b, S, S, 3) -> cat[mean token, tokens] (b, 1 + (S/32)^2, 8c)."""

    def __init__(self, cfg: RAMConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.image_size = cfg.image_size
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = np.cumsum((0, *cfg.depths))
        self.layers = nnx.List(
            [
                BasicLayer(i, cfg, rates[starts[i] : starts[i + 1]], dtype=dtype, rngs=rngs)
                for i in range(len(cfg.depths))
            ]
        )
        self.norm = LayerNorm(cfg.num_features, cfg.swin_eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"SwinTransformer: expected (batch, {self.image_size}, {self.image_size}, 3), got {x.shape}"
            )
        h = self.patch_embed(x)  # (b, S/4, S/4, c)
        h = h.reshape(h.shape[0], -1, h.shape[-1])  # (b, L, c)
        for layer in self.layers:
            h = layer(h)  # (b, L', c')
        h = self.norm(h)  # (b, L, C)
        return jnp.concatenate([jnp.mean(h.astype(jnp.float32), 1, keepdims=True).astype(h.dtype), h], 1)


# ----------------------------------------------------------------------------------------------------------
# Tagging head (BERT cross-attention layers of RAM's q2l config, self-attention deleted)


class BertSelfAttention(nnx.Module):
    """RAM's `crossattention.self`: Q from the label queries, K/V from the image embeddings."""

    def __init__(self, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        d, e = cfg.hidden_size, cfg.embed_width
        self.heads = cfg.head_heads
        self.query = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.key = nnx.Linear(e, d, dtype=dtype, rngs=rngs)
        self.value = nnx.Linear(e, d, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.attention_dropout, deterministic=True, rngs=rngs)

    def __call__(self, h: jax.Array, img: jax.Array) -> jax.Array:
        b, n, d = h.shape
        s = img.shape[1]
        q = self.query(h).reshape(b, n, self.heads, -1)  # (b, n, heads, dh)
        k = self.key(img).reshape(b, s, self.heads, -1)  # (b, s, heads, dh)
        v = self.value(img).reshape(b, s, self.heads, -1)  # (b, s, heads, dh)
        if self.dropout.deterministic or self.dropout.rate == 0.0:
            out = jax.nn.dot_product_attention(q, k, v)  # (b, n, heads, dh), softmax in fp32
        else:  # train mode: dropout on the attention probabilities, as BERT
            logits = jnp.einsum("bnhd,bshd->bhns", q, k, preferred_element_type=jnp.float32)  # (b, h, n, s)
            probs = jax.nn.softmax(logits / np.sqrt(q.shape[-1]), -1)
            probs = self.dropout(probs).astype(v.dtype)  # (b, heads, n, s)
            out = jnp.einsum("bhns,bshd->bnhd", probs, v)  # (b, n, heads, dh)
        return out.reshape(b, n, d)  # (b, n, d)


class BertOutput(nnx.Module):
    """dense -> dropout -> LayerNorm(x + residual) (BertSelfOutput and BertOutput have this form)."""

    def __init__(self, din: int, dout: int, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.dense = nnx.Linear(din, dout, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(dout, cfg.head_eps, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, deterministic=True, rngs=rngs)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)  # (b, n, dout)


class BertAttention(nnx.Module):
    def __init__(self, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.output = BertOutput(cfg.hidden_size, cfg.hidden_size, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array, img: jax.Array) -> jax.Array:
        return self.output(self.self(h, img), h)  # (b, n, d)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.dense(x), approximate=False)  # (b, n, intermediate)


class TaggingLayer(nnx.Module):
    """`mode='tagging'` BERT layer with its self-attention deleted: cross-attention block, then FFN block."""

    def __init__(self, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.crossattention = BertAttention(cfg, dtype=dtype, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, dtype=dtype, rngs=rngs)
        self.output = BertOutput(cfg.intermediate_size, cfg.hidden_size, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array, img: jax.Array) -> jax.Array:
        a = self.crossattention(h, img)  # (b, n, d)
        return self.output(self.intermediate(a), a)  # (b, n, d)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([TaggingLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.head_layers)])

    def __call__(self, h: jax.Array, img: jax.Array) -> jax.Array:
        for layer in self.layer:
            h = layer(h, img)  # (b, n, d)
        return h


class TaggingHead(nnx.Module):
    """RAM's `tagging_head` after `del_selfattention`: only `encoder.layer.*` remains (no embeddings, no
    final LayerNorm)."""

    def __init__(self, cfg: RAMConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.encoder = BertEncoder(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array, img: jax.Array) -> jax.Array:
        return self.encoder(h, img)  # (b, n, d)


# ----------------------------------------------------------------------------------------------------------
# RAM


def preprocess(x: jax.Array, image_size: int = 384) -> jax.Array:
    """RASS's RAM input: NHWC x in [-1, 1] -> x*0.5+0.5 -> bilinear squash to image_size^2 (align_corners=False,
    no antialias; identity at that size) -> ImageNet normalisation; fp32 (b, S, S, 3)."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"RAM preprocess: expected NHWC RGB (b, h, w, 3), got shape {x.shape}")
    x01 = x.astype(jnp.float32) * 0.5 + 0.5  # (b, H, W, 3)
    x01 = resize_bilinear(x01, (image_size, image_size))  # (b, S, S, 3)
    return (x01 - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


class RAM(nnx.Module):
    """The tagging path of RAM: preprocessed image (b, S, S, 3) -> tag logits (b, num_classes) fp32."""

    def __init__(self, config: RAMConfig | None = None, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        cfg = config or RAMConfig()
        self.config = cfg
        self.dtype = dtype
        self.label_embed = nnx.Param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (cfg.num_classes, cfg.embed_width))
        )
        self.visual_encoder = SwinTransformer(cfg, dtype=dtype, rngs=rngs)
        self.tagging_head = TaggingHead(cfg, dtype=dtype, rngs=rngs)
        self.wordvec_proj = nnx.Linear(cfg.embed_width, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(cfg.hidden_size, 1, dtype=dtype, rngs=rngs)
        self.image_proj = nnx.Linear(cfg.num_features, cfg.embed_width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        img = self.image_proj(self.visual_encoder(x.astype(self.dtype)))  # (b, 1 + L, e)
        queries = jax.nn.relu(self.wordvec_proj(self.label_embed[...].astype(self.dtype)))  # (K, d)
        h = jnp.broadcast_to(queries[None], (x.shape[0], *queries.shape))  # (b, K, d)
        h = self.tagging_head(h, img)  # (b, K, d)
        return self.fc(h)[..., 0].astype(jnp.float32)  # (b, K)

    def tag_mask(self, x: jax.Array, thresholds: jax.Array, *, fp16_sigmoid: bool = True) -> jax.Array:
        """(b, K) bool: which tags fire for NHWC images x in [-1, 1] (any size; squashed to 384).

        fp16_sigmoid=True compares the fp16-rounded sigmoid with the fp32 thresholds, as RASS's fp16 RAM
        does (a sigmoid of 0.65002 rounds to 0.649902 and does not pass 0.65); False compares in fp32."""
        logits = self(preprocess(x, self.config.image_size))  # (b, K)
        return threshold_mask(logits, thresholds, fp16_sigmoid=fp16_sigmoid)


def fill_abstract(model: nnx.Module) -> nnx.Module:
    """`model` with every still-abstract leaf (jax.ShapeDtypeStruct, from an `nnx.eval_shape` build) made
    concrete: zeros, and key(0) for RNG keys. Leaves already holding arrays are kept."""

    def fill(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return jnp.zeros(x.shape, x.dtype)

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(fill, state))


def empty_ram(config: RAMConfig | None = None, *, dtype: Dtype = jnp.float32) -> RAM:
    """A RAM with zero parameters, built from shapes only (no random initialisation of the 212M
    parameters): to be filled by a checkpoint."""
    from .tracing import abstract_model

    return fill_abstract(abstract_model(lambda: RAM(config, dtype=dtype, rngs=nnx.Rngs(0))))


def threshold_mask(logits: jax.Array, thresholds: jax.Array, *, fp16_sigmoid: bool = True) -> jax.Array:
    """sigmoid(logits) > thresholds per class (b, K) bool; the sigmoid rounded to fp16 first by default."""
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))  # (b, K)
    if fp16_sigmoid:
        probs = probs.astype(jnp.float16).astype(jnp.float32)
    return probs > jnp.asarray(thresholds, jnp.float32)[None]


def tag_strings(mask: np.ndarray, tag_list: Sequence[str]) -> list[str]:
    """RASS's generate_tag output: the firing tags of each row in tag-list index order, joined with ', '."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or mask.shape[1] != len(tag_list):
        raise ValueError(f"tag_strings: mask of shape {mask.shape} for a tag list of {len(tag_list)} tags")
    return [", ".join(tag_list[i] for i in np.flatnonzero(row)) for row in mask]
