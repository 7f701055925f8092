"""UAWarpC: uncertainty-aware dense matching (refign `models/heads/uawarpc.py`, `models/modules.py`,
`helpers/matching_utils.py`; DenseMatching's PDC-Net-style head). NHWC; flows (b, h, w, 2) hold (u, v) =
(x, y) displacements in pixels; log-variances (b, h, w, 1).

- `UAWarpCHead(trg, src, trg_256, src_256, out_size)`: the flow target -> source (per target pixel, the
  displacement to its match in the source) at four levels, each with its log-variance, all in pixels of
  the original image (refign.md 3.4): level 4 (16x16) from the global correlation with mutual matching,
  levels 3 (32x32), 2 and 1 (the pool3 / pool2 grids) from 9x9 local correlations of the warped source.
- `UAWarpC`: `alignment_backbone` (VGG-16) + `alignment_head`, the attribute names of refign's
  checkpoints, so `alignment_backbone.*` / `alignment_head.*` convert by table.
- `warp`, `confidence`, `align`: refign.md 3.5 and 3.9 (fp32 whatever the compute dtype).

Train/eval mode: `model.train()` / `model.eval()` switch every BatchNorm (batch statistics in train mode,
torch's running-statistics update with the unbiased variance) and the head's own `use_running_average`,
which gates the eval-only `iterative_refinement`.

Tiny copies (tests, CPU demos; defaults = the published network): `coarse_size` replaces the 256 of the
`area`-resized copies (levels 4 and 3 on its /16 and /8 grids; level 4's search size is coarse_size / 16,
so 256 or 144) and `head_width` scales every channel width of the head (the decoders' 32-channel feature
included; 1.0 = refign's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lqseg_jax.kernels.correlation import local_correlation
from lqseg_jax.models.layers import BN_EPS, BN_MOMENTUM, TorchBatchNorm, torch_linear_init
from lqseg_jax.models.resize import resize_area, resize_bilinear
from lqseg_jax.models.vgg import POOL2_POOL3, POOL3_POOL4, VGG16Features

LRELU_SLOPE = 0.1
NORMALIZE_EPS = 1e-12  # F.normalize: clamp of the norm
MUTUAL_EPS = 1e-5  # NC-Net mutual matching: added to the max
SIZE_256 = 256
PATCH = 9
HI = jax.lax.Precision.HIGHEST
FEATURE = 32  # the decoders' feature width (refign: x of OpticalFlowEstimatorResidualConnection)


def scaled(channels: int, scale: float) -> int:
    """A head width times `scale` (tiny copies), at least 1; scale 1 keeps refign's width."""
    return channels if scale == 1.0 else max(1, round(channels * scale))


def _l2_normalize(x: jax.Array) -> jax.Array:
    """F.normalize(x, p=2, dim=channels) on NHWC, fp32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))  # (b, h, w, 1)
    return x / jnp.maximum(norm, NORMALIZE_EPS)


def _scale_xy(flow: jax.Array, sx: float, sy: float) -> jax.Array:
    """flow[..., 0] *= sx, flow[..., 1] *= sy, with the factors in fp32 as torch applies them."""
    return flow * np.array([sx, sy], np.float32)  # (b, h, w, 2)


def _conv(cin: int, cout: int, k: int, *, padding: int, use_bias: bool, dilation: int = 1, dtype, rngs):
    """nn.Conv2d with torch's default initialisation (U(+-1/sqrt(fan_in)) for weight and bias)."""
    kernel_init, bias_init = torch_linear_init(cin * k * k)
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=dilation,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        rngs=rngs,
    )


class ConvBN(nnx.Module):
    """refign `ConvBNReLU` with BatchNorm: bias-free conv -> BN -> LeakyReLU(0.1) if `activation`."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int = 3,
        *,
        activation: bool,
        padding: int | None = None,
        dilation: int = 1,
        dtype,
        rngs: nnx.Rngs,
    ):
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        self.conv = _conv(
            cin, cout, kernel_size, padding=padding, dilation=dilation, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.bn = TorchBatchNorm(cout, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=jnp.float32, rngs=rngs)
        self.activation = activation
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))  # (b, h', w', cout) fp32
        if self.activation:
            x = jax.nn.leaky_relu(x, LRELU_SLOPE)
        return x.astype(self.dtype)


class OpticalFlowEstimatorResidualConnection(nnx.Module):
    """Flow decoder: returns (2-channel prediction fp32, 32-channel feature x). The skips take the
    pre-activation conv_0 output and the pre-activation first sum (refign.md 3.3)."""

    def __init__(self, in_channels: int, *, width: float = 1.0, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        c128, c96, c64, c32 = (scaled(c, width) for c in (128, 96, 64, FEATURE))
        self.conv_0 = ConvBN(in_channels, c128, 3, activation=False, **kw)
        self.conv0_skip = ConvBN(c128, c96, 1, activation=False, **kw)
        self.conv_1 = ConvBN(c128, c128, 3, activation=True, **kw)
        self.conv_2 = ConvBN(c128, c96, 3, activation=False, **kw)
        self.conv2_skip = ConvBN(c96, c32, 1, activation=False, **kw)
        self.conv_3 = ConvBN(c96, c64, 3, activation=True, **kw)
        self.conv_4 = ConvBN(c64, c32, 3, activation=False, **kw)
        self.predict_mapping = _conv(c32, 2, 3, padding=1, use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x0 = self.conv_0(x)  # (b, h, w, 128 width)
        x2 = self.conv_2(self.conv_1(jax.nn.leaky_relu(x0, LRELU_SLOPE)))  # (b, h, w, 96 width)
        s2 = x2 + self.conv0_skip(x0)  # (b, h, w, 96 width)
        x4 = self.conv_4(self.conv_3(jax.nn.leaky_relu(s2, LRELU_SLOPE)))  # (b, h, w, 32 width)
        feat = jax.nn.leaky_relu(x4 + self.conv2_skip(s2), LRELU_SLOPE)  # (b, h, w, 32 width)
        return self.predict_mapping(feat).astype(jnp.float32), feat  # (b, h, w, 2), (b, h, w, 32 width)


class RefinementModule(nnx.Module):
    """`dc_convs`: six dilated ConvBN + LeakyReLU (dilations 1 2 4 8 16 1), then a 3x3 conv to 2 (bias)."""

    SPEC = ((128, 1), (128, 2), (128, 4), (96, 8), (64, 16), (32, 1))

    def __init__(self, in_channels: int = FEATURE, *, width: float = 1.0, dtype, rngs: nnx.Rngs):
        layers: list[nnx.Module] = []
        cin = in_channels
        for cout, dilation in self.SPEC:
            cout = scaled(cout, width)
            layers.append(ConvBN(cin, cout, 3, activation=True, dilation=dilation, dtype=dtype, rngs=rngs))
            cin = cout
        layers.append(_conv(cin, 2, 3, padding=1, use_bias=True, dtype=dtype, rngs=rngs))
        self.dc_convs = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.dc_convs:
            x = layer(x)  # (b, h, w, c_i)
        return x.astype(jnp.float32)  # (b, h, w, 2)


class UncertaintyModule(nnx.Module):
    """Log-variance from the correlation (each pixel's s*s correlation vector seen as a 1-channel s x s
    image, convolved without padding down to 6 values), the decoder feature and, with
    `feed_in_previous`, the up-sampled previous log-variance and flow."""

    def __init__(
        self, search_size: int, feed_in_previous: bool, *, width: float = 1.0, dtype, rngs: nnx.Rngs
    ):
        if search_size not in (9, 16):
            raise ValueError(f"UncertaintyModule: search_size must be 9 or 16, got {search_size}")
        kw = dict(dtype=dtype, rngs=rngs)
        self.search_size = search_size
        self.feed_in_previous = feed_in_previous
        c32, c16 = scaled(32, width), scaled(16, width)
        self.conv_0 = ConvBN(1, c32, 3, activation=True, padding=0, **kw)
        self.conv_1 = ConvBN(c32, c32, 3, activation=True, padding=0, **kw)
        self.conv_2 = ConvBN(c32, c16, 3, activation=True, padding=0, **kw)
        self.predict_uncertainty = _conv(c16, 6, 3, padding=0, use_bias=True, **kw)
        extra = 3 if feed_in_previous else 0
        self.pred_conv_0 = ConvBN(6 + scaled(FEATURE, width) + extra, c32, 3, activation=True, **kw)
        self.pred_conv_1 = ConvBN(c32, c16, 3, activation=True, **kw)
        self.predict_uncertainty_final = _conv(c16, 1, 3, padding=1, use_bias=True, **kw)

    def __call__(
        self,
        corr: jax.Array,
        feat: jax.Array,
        previous_log_var: jax.Array | None = None,
        previous_flow: jax.Array | None = None,
    ) -> jax.Array:
        b, h, w, n = corr.shape
        s = self.search_size
        if n != s * s:
            raise ValueError(f"UncertaintyModule: correlation must have {s * s} channels, got {corr.shape}")
        x = corr.reshape(b * h * w, s, s, 1)  # (bhw, s, s, 1): channel k -> (k // s, k % s)
        x = self.conv_0(x)  # (bhw, s - 2, s - 2, 32 width)
        if s == 16:
            x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # (bhw, 7, 7, 32 width)
        x = self.conv_2(self.conv_1(x))  # (bhw, 3, 3, 16 width)
        x = self.predict_uncertainty(x).reshape(b, h, w, 6)  # (b, h, w, 6)
        parts = [x, feat]
        if self.feed_in_previous:
            parts += [previous_log_var, previous_flow]
        x = jnp.concatenate([p.astype(self.pred_conv_0.dtype) for p in parts], axis=-1)  # (b, h, w, 38|41)
        x = self.pred_conv_1(self.pred_conv_0(x))  # (b, h, w, 16 width)
        return self.predict_uncertainty_final(x).astype(jnp.float32)  # (b, h, w, 1)


def global_correlation(src: jax.Array, trg: jax.Array) -> jax.Array:
    """Level-4 correlation: (b, ht, wt, hs*ws) with channel k = ys*ws + xs holding <src[ys, xs], trg[yt, xt]>,
    NC-Net mutual matching, then ReLU and L2 normalisation over the channels. fp32."""
    b, hs, ws, c = src.shape
    src = src.astype(jnp.float32).reshape(b, hs * ws, c)  # (b, k, c)
    corr = jnp.einsum("bhwc,bkc->bhwk", trg.astype(jnp.float32), src, precision=HI)  # (b, ht, wt, k)
    max_over_trg = jnp.max(corr, axis=(1, 2), keepdims=True)  # (b, 1, 1, k): per source pixel
    max_over_src = jnp.max(corr, axis=3, keepdims=True)  # (b, ht, wt, 1): per target pixel
    corr = corr * ((corr / (max_over_trg + MUTUAL_EPS)) * (corr / (max_over_src + MUTUAL_EPS)))
    return _l2_normalize(jax.nn.relu(corr))  # (b, ht, wt, k)


def local_correlation_layer(warped_src: jax.Array, trg: jax.Array) -> jax.Array:
    """Levels 3-1: 9x9 local correlation of target with the warped source (channel (dy+4)*9 + (dx+4)),
    ReLU, L2 normalisation over the 81 channels. fp32."""
    corr = local_correlation(trg.astype(jnp.float32), warped_src.astype(jnp.float32), patch_size=PATCH)
    return _l2_normalize(jax.nn.relu(corr))  # (b, h, w, 81)


def mapping_to_flow(mapping: jax.Array) -> jax.Array:
    """A mapping in [-1, 1] (align_corners=True: -1 and 1 are the first and last pixel centres) -> flow in
    pixels of its own grid: u = (m_x + 1)(w - 1)/2 - x, v = (m_y + 1)(h - 1)/2 - y."""
    _, h, w, _ = mapping.shape
    xs = (mapping[..., 0] + 1) * np.float32(w - 1) / 2.0 - jnp.arange(w, dtype=jnp.float32)  # (b, h, w)
    ys = (mapping[..., 1] + 1) * np.float32(h - 1) / 2.0 - jnp.arange(h, dtype=jnp.float32)[:, None]
    return jnp.stack([xs, ys], axis=-1)  # (b, h, w, 2)


def _grid_sample(x: jax.Array, ix: jax.Array, iy: jax.Array) -> jax.Array:
    """Bilinear sampling of x (b, H, W, c) at pixel coordinates (ix, iy) (b, h, w), zero outside:
    grid_sample(padding_mode="zeros") after its un-normalisation."""
    b, hh, ww, c = x.shape
    # Beyond one pixel outside, all four taps are outside: clipping there changes nothing and keeps the
    # integer casts defined.
    ix = jnp.clip(ix, -2.0, ww + 1.0)
    iy = jnp.clip(iy, -2.0, hh + 1.0)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    flat = x.reshape(b, hh * ww, c)  # (b, HW, c)
    out = jnp.zeros((*ix.shape, c), jnp.float32)  # (b, h, w, c)
    for cx, cy, wgt in (
        (x0, y0, (x1 - ix) * (y1 - iy)),
        (x1, y0, (ix - x0) * (y1 - iy)),
        (x0, y1, (x1 - ix) * (iy - y0)),
        (x1, y1, (ix - x0) * (iy - y0)),
    ):
        inside = (cx >= 0) & (cx <= ww - 1) & (cy >= 0) & (cy <= hh - 1)  # (b, h, w)
        idx = (jnp.clip(cy, 0, hh - 1) * ww + jnp.clip(cx, 0, ww - 1)).astype(jnp.int32)  # (b, h, w)
        taps = jnp.take_along_axis(flat, idx.reshape(b, -1, 1), axis=1).reshape(out.shape)  # (b, h, w, c)
        out = out + taps * jnp.where(inside, wgt, 0.0)[..., None]
    return out


def warp(x: jax.Array, flow: jax.Array) -> tuple[jax.Array, jax.Array]:
    """refign `warp(x, flow, return_mask=True)`: x (b, H, W, c) sampled at (X + u, Y + v) with
    grid_sample(bilinear, zeros, align_corners=True), fp32. Returns (warped (b, H, W, c) fp32, mask
    (b, H, W) bool): True where the sample lies strictly inside (0 < X+u < W-1 and 0 < Y+v < H-1). If every
    flow value of the batch is 0, x is returned unchanged (cast to fp32) with an all-True mask."""
    if x.ndim != 4 or flow.ndim != 4 or flow.shape[-1] != 2 or flow.shape[:3] != x.shape[:3]:
        raise ValueError(
            f"warp: x must be (b, H, W, c) and flow (b, H, W, 2), got {x.shape} and {flow.shape}"
        )
    _, hh, ww, _ = x.shape
    x = x.astype(jnp.float32)
    flow = flow.astype(jnp.float32)
    px = jnp.arange(ww, dtype=jnp.float32) + flow[..., 0]  # (b, H, W)
    py = jnp.arange(hh, dtype=jnp.float32)[:, None] + flow[..., 1]  # (b, H, W)
    gx = 2.0 * px / np.float32(max(ww - 1, 1)) - 1.0  # normalised as the original
    gy = 2.0 * py / np.float32(max(hh - 1, 1)) - 1.0
    sampled = _grid_sample(x, ((gx + 1) / 2) * np.float32(ww - 1), ((gy + 1) / 2) * np.float32(hh - 1))
    mask = (gx > -1) & (gy > -1) & (gx < 1) & (gy < 1)  # (b, H, W)
    zero = jnp.all(flow == 0)
    return jnp.where(zero, x, sampled), mask | zero


def confidence(log_var: jax.Array, radius: float = 1.0) -> jax.Array:
    """P_R = 1 - exp(-R^2 / (2 exp(s))): the probability that the isotropic Gaussian error is < R px."""
    var = jnp.exp(log_var.astype(jnp.float32))
    return 1.0 - jnp.exp(-(radius**2) / (2 * var))


class UAWarpCHead(nnx.Module):
    """refign `UAWarpCHead` with `estimate_uncertainty`, both refinement modules and batch norm (the
    configuration of every released checkpoint). 3,145,034 parameters at the defaults; `coarse_size` and
    `head_width` make tiny copies (module docstring)."""

    def __init__(
        self,
        iterative_refinement: bool = False,
        dtype=jnp.float32,
        *,
        coarse_size: int = SIZE_256,
        head_width: float = 1.0,
        rngs: nnx.Rngs,
    ):
        if coarse_size % 16 or coarse_size // 16 not in (9, 16):
            raise ValueError(
                f"UAWarpCHead: coarse_size must be 256 or 144 (level 4's search size coarse_size / 16 is 16 or 9), "
                f"got {coarse_size}"
            )
        if not head_width > 0:
            raise ValueError(f"UAWarpCHead: head_width must be > 0, got {head_width}")
        kw = dict(width=head_width, dtype=dtype, rngs=rngs)
        nd = PATCH * PATCH
        g4 = coarse_size // 16
        feature = scaled(FEATURE, head_width)
        self.decoder4 = OpticalFlowEstimatorResidualConnection(g4 * g4, **kw)
        self.decoder3 = OpticalFlowEstimatorResidualConnection(nd + 2 + 1, **kw)
        self.refinement_module_adaptive = RefinementModule(feature, **kw)
        self.decoder2 = OpticalFlowEstimatorResidualConnection(nd + 2 + 1, **kw)
        self.reduce = _conv(feature, 2, 1, padding=0, use_bias=True, dtype=dtype, rngs=rngs)
        self.decoder1 = OpticalFlowEstimatorResidualConnection(nd + 2 + 2 + 1, **kw)
        self.refinement_module_finest = RefinementModule(feature, **kw)
        self.estimate_uncertainty_components4 = UncertaintyModule(g4, False, **kw)
        self.estimate_uncertainty_components3 = UncertaintyModule(9, True, **kw)
        self.estimate_uncertainty_components2 = UncertaintyModule(9, True, **kw)
        self.estimate_uncertainty_components1 = UncertaintyModule(9, True, **kw)
        self.coarse_size = coarse_size
        self.iterative_refinement = iterative_refinement
        self.use_running_average = False  # set by model.train() / model.eval(), like BatchNorm's
        self.dtype = dtype

    @staticmethod
    def _check(name: str, feats: Sequence[jax.Array], sizes: Sequence[tuple[int, int] | None]) -> None:
        if len(feats) != 2:
            raise ValueError(f"UAWarpCHead: {name} must be two NHWC feature maps, got {len(feats)}")
        for f, size in zip(feats, sizes):
            if f.ndim != 4 or (size is not None and tuple(f.shape[1:3]) != size):
                raise ValueError(
                    f"UAWarpCHead: {name} maps must be NHWC of spatial size {sizes}, got {f.shape}"
                )

    def _cat(self, *parts: jax.Array) -> jax.Array:
        return jnp.concatenate([p.astype(self.dtype) for p in parts], axis=-1)

    def __call__(
        self,
        trg: Sequence[jax.Array],
        src: Sequence[jax.Array],
        trg_256: Sequence[jax.Array],
        src_256: Sequence[jax.Array],
        out_size: Sequence[int],
    ) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """trg/src: (pool2, pool3) of the full-size target/source; trg_256/src_256: (pool3 32x32, pool4
        16x16) of their 256x256 `area` copies (C/8 and C/16 of coarse_size C); out_size (H, W) of the
        full-size images. Returns
        ((f4, s4), (f3, s3), (f2, s2), (f1, s1)), flows (b, h_l, w_l, 2) target -> source in original
        pixels and log-variances (b, h_l, w_l, 1), fp32."""
        cs = self.coarse_size
        g3, g4 = cs // 8, cs // 16
        for name, feats, sizes in (
            ("trg", trg, (None, None)),
            ("src", src, (None, None)),
            ("trg_256", trg_256, ((g3, g3), (g4, g4))),
            ("src_256", src_256, ((g3, g3), (g4, g4))),
        ):
            self._check(name, feats, sizes)
        c11, c12, c13, c14 = (_l2_normalize(f) for f in (*trg, *trg_256))
        c21, c22, c23, c24 = (_l2_normalize(f) for f in (*src, *src_256))
        big_h, big_w = int(out_size[0]), int(out_size[1])
        diag_term = np.float32(2 * math.log(math.sqrt(big_h**2 + big_w**2) / math.sqrt(2 * cs**2)))

        # level 4: 16x16 (g4 x g4), in 256-pixel (coarse-size) units
        corr4 = global_correlation(c24, c14)  # (b, 16, 16, 256)
        map4, x4 = self.decoder4(corr4.astype(self.dtype))  # (b, 16, 16, 2), (b, 16, 16, 32 width)
        flow4_256 = _scale_xy(mapping_to_flow(map4), cs / g4, cs / g4)  # (b, 16, 16, 2)
        s4_256 = self.estimate_uncertainty_components4(corr4, x4) + np.float32(2 * math.log(cs / g4))

        # level 3: 32x32 (g3 x g3), 256-pixel units, then original pixels
        up_flow4 = resize_bilinear(flow4_256, (g3, g3))  # (b, 32, 32, 2)
        up_s4 = resize_bilinear(s4_256, (g3, g3))  # (b, 32, 32, 1)
        warp3, _ = warp(c23, _scale_xy(up_flow4, g3 / cs, g3 / cs))  # (b, 32, 32, c)
        corr3 = local_correlation_layer(warp3, c13)  # (b, 32, 32, 81)
        res3, x3 = self.decoder3(self._cat(corr3, up_flow4, up_s4))
        res3 = res3 + self.refinement_module_adaptive(x3)
        flow3 = res3 + up_flow4  # (b, 32, 32, 2)
        s3 = self.estimate_uncertainty_components3(corr3, x3, up_s4, up_flow4)  # (b, 32, 32, 1)
        flow3 = _scale_xy(flow3, big_w / cs, big_h / cs)
        s3 = s3 + diag_term

        if self.iterative_refinement and self.use_running_average:
            flow3, s3 = self._iterative_refinement(flow3, s3, c12, c22, big_h, big_w)

        # level 2: the pool3 grid
        h2, w2 = c12.shape[1:3]
        up_flow3 = resize_bilinear(flow3, (h2, w2))  # (b, h2, w2, 2)
        up_s3 = resize_bilinear(s3, (h2, w2))  # (b, h2, w2, 1)
        warp2, _ = warp(c22, _scale_xy(up_flow3, w2 / big_w, h2 / big_h))
        corr2 = local_correlation_layer(warp2, c12)  # (b, h2, w2, 81)
        res2, x2 = self.decoder2(self._cat(corr2, up_flow3, up_s3))
        flow2 = res2 + up_flow3  # (b, h2, w2, 2)
        s2 = self.estimate_uncertainty_components2(corr2, x2, up_s3, up_flow3)

        # level 1: the pool2 grid
        h1, w1 = c11.shape[1:3]
        up_flow2 = resize_bilinear(flow2, (h1, w1))  # (b, h1, w1, 2)
        up_s2 = resize_bilinear(s2, (h1, w1))  # (b, h1, w1, 1)
        up_feat2 = self.reduce(resize_bilinear(x2, (h1, w1)))  # (b, h1, w1, 2)
        warp1, _ = warp(c21, _scale_xy(up_flow2, w1 / big_w, h1 / big_h))
        corr1 = local_correlation_layer(warp1, c11)  # (b, h1, w1, 81)
        res1, x1 = self.decoder1(self._cat(corr1, up_flow2, up_feat2, up_s2))
        res1 = res1 + self.refinement_module_finest(x1)
        flow1 = res1 + up_flow2  # (b, h1, w1, 2)
        s1 = self.estimate_uncertainty_components1(corr1, x1, up_s2, up_flow2)

        flow4 = _scale_xy(flow4_256, big_w / cs, big_h / cs)
        s4 = s4_256 + diag_term
        return (flow4, s4), (flow3, s3), (flow2, s2), (flow1, s1)

    def _iterative_refinement(self, flow3, s3, c12, c22, big_h, big_w):
        """Eval-only extra passes at 1/(8*2^(n-i)) of the image with decoder2 / U2 weights (n = 0 unless
        max(H, W) >= 1086)."""
        r = max(big_h, big_w) / 8.0 / 32.0
        n = max(0, round(math.log(r / 3.0) / math.log(2)))
        for i in range(n):
            ratio = 1.0 / (8.0 * 2 ** (n - i))
            size = (int(big_h * ratio), int(big_w * ratio))
            up_flow = resize_bilinear(flow3, size)  # (b, h', w', 2)
            up_s = resize_bilinear(s3, size)  # (b, h', w', 1)
            c_src = resize_area(c22, size)  # (b, h', w', c)
            c_trg = resize_area(c12, size)
            warped, _ = warp(c_src, up_flow * np.float32(ratio))
            corr = local_correlation_layer(warped, c_trg)  # (b, h', w', 81)
            res, x = self.decoder2(self._cat(corr, up_flow, up_s))
            flow3 = res + up_flow
            s3 = self.estimate_uncertainty_components2(corr, x, up_s, up_flow)
        return flow3, s3


class UAWarpC(nnx.Module):
    """VGG-16 features + UAWarpC head, named as refign's checkpoints (`alignment_backbone`,
    `alignment_head`). The VGG is frozen in refign (select the head's parameters to train)."""

    def __init__(
        self,
        iterative_refinement: bool = False,
        dtype=jnp.float32,
        *,
        vgg_widths: Sequence[int] | None = None,
        coarse_size: int = SIZE_256,
        head_width: float = 1.0,
        rngs: nnx.Rngs,
    ):
        widths = {} if vgg_widths is None else {"widths": vgg_widths}
        self.alignment_backbone = VGG16Features(dtype=dtype, rngs=rngs, **widths)
        self.alignment_head = UAWarpCHead(
            iterative_refinement, dtype, coarse_size=coarse_size, head_width=head_width, rngs=rngs
        )

    def __call__(self, target: jax.Array, source: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """target, source (b, H, W, 3) ImageNet-normalised -> the head's four (flow, log-variance) pairs,
        flow target -> source in pixels."""
        if target.shape != source.shape or target.ndim != 4:
            raise ValueError(
                f"UAWarpC: target and source must be NHWC of one shape, got {target.shape}, {source.shape}"
            )
        b, big_h, big_w, _ = target.shape
        both = jnp.concatenate([source, target], axis=0)  # (2b, H, W, 3): refign's cat[j, i]
        full = self.alignment_backbone(both, POOL2_POOL3)  # pool2, pool3
        cs = self.alignment_head.coarse_size
        small = self.alignment_backbone(resize_area(both, (cs, cs)), POOL3_POOL4)  # pool3, pool4
        src, trg = [f[:b] for f in full], [f[b:] for f in full]
        src_256, trg_256 = [f[:b] for f in small], [f[b:] for f in small]
        return self.alignment_head(trg, src, trg_256, src_256, (big_h, big_w))

    def dense_flow(self, target: jax.Array, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The finest flow and log-variance bilinearly up-sampled to the image size (values unchanged:
        already pixels): ((b, H, W, 2), (b, H, W, 1))."""
        flow1, s1 = self(target, source)[-1]
        size = target.shape[1:3]
        return resize_bilinear(flow1, size), resize_bilinear(s1, size)


def align(
    model: UAWarpC, target_image: jax.Array, reference_image: jax.Array, reference_logits: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Refign's alignment (segmentation_model.py:493-523): the reference logits (b, H, W, k) (already at
    the crop size) warped onto the target, the validity mask (b, H, W) bool and the confidence P
    (b, H, W, 1), all fp32. Call with the model in eval mode, as Refign does."""
    if reference_logits.shape[:3] != target_image.shape[:3]:
        raise ValueError(
            f"align: reference_logits {reference_logits.shape} must share (b, H, W) with the images {target_image.shape}"
        )
    flow, log_var = model.dense_flow(target_image, reference_image)  # (b, H, W, 2), (b, H, W, 1)
    warped, valid = warp(reference_logits, flow)
    return warped, valid, confidence(log_var)
