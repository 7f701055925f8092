"""Building blocks shared by several networks (NHWC layout, parameters fp32).

- `resize_bilinear`: torch `F.interpolate(mode="bilinear", align_corners=False)` exactly (no antialiasing,
  up and down); `jax.image.resize` antialiases when downsampling and so differs from torch.
- `TorchBatchNorm`: nnx.BatchNorm whose running variance is updated as torch's (unbiased batch variance).
- `ConvModule`: conv (no bias) + BatchNorm + ReLU, the mmcv/refign `ConvBNReLU` with sub-modules `conv`, `bn`.
- `DepthwiseSeparableConvModule`: `depthwise_conv` (ConvModule, groups = channels) then `pointwise_conv` (1x1).
- `DropPath`: stochastic depth, one Bernoulli draw per sample, active in train mode only.
- Initializers matching the torch ones (`torch_linear_init`, `kaiming_fan_out_init`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BN_MOMENTUM = 0.9  # torch BatchNorm momentum 0.1 (weight of the new batch statistic)
BN_EPS = 1e-5


def _source_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left/right source index and right weight per output position, as torch computes them: fp32 scale
    in / out, source = (dst + 0.5) * scale - 0.5 with one rounding (torch's CPU kernel contracts it into
    an FMA; the fp32 product is exact in fp64), clamped at 0."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (dst.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, lam


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of NHWC `x` to `size` = (h, w), equal to torch bilinear with align_corners=False.

    No antialiasing in either direction (torch's default). Computed in fp32, returned in x's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear: input must be NHWC (4-D), got shape {x.shape}")
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"resize_bilinear: size must be two positive ints (h, w), got {tuple(size)}")
    out_h, out_w = int(size[0]), int(size[1])
    _, in_h, in_w, _ = x.shape
    if (out_h, out_w) == (in_h, in_w):
        return x  # torch: source index == destination index, weights (1, 0)
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if out_h != in_h:
        i0, i1, lam = _source_indices(in_h, out_h)
        lam = jnp.asarray(lam)[None, :, None, None]  # (1, out_h, 1, 1)
        y = y[:, i0] * (1.0 - lam) + y[:, i1] * lam  # (b, out_h, in_w, c)
    if out_w != in_w:
        i0, i1, lam = _source_indices(in_w, out_w)
        lam = jnp.asarray(lam)[None, None, :, None]  # (1, 1, out_w, 1)
        y = y[:, :, i0] * (1.0 - lam) + y[:, :, i1] * lam  # (b, out_h, out_w, c)
    return y.astype(x.dtype)


def torch_linear_init(
    in_features: int,
) -> tuple[jax.nn.initializers.Initializer, jax.nn.initializers.Initializer]:
    """(kernel_init, bias_init) of torch.nn.Linear's default: both U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init


def kaiming_fan_out_init() -> jax.nn.initializers.Initializer:
    """torch `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: N(0, 2 / (out * kh * kw)).

    Like torch, fan_out does not divide by the group count.
    """
    return jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated in jax


class TorchBatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm over the channels-last axis, computed in fp32, with torch BatchNorm's train-mode update:
    the running variance takes the unbiased batch variance (n / (n - 1), n = elements per channel) while
    the normalisation uses the biased one. nnx.BatchNorm would store the biased variance."""

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        x = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if use_running_average:
            mean, var = self.mean[...], self.var[...]  # (c,), (c,)
        else:
            n = math.prod(x.shape[:-1])
            if n < 2:
                raise ValueError(
                    f"TorchBatchNorm: train mode needs more than 1 value per channel, got input {x.shape}"
                )
            mean = jnp.mean(x, axis=axes)  # (c,)
            var = jnp.mean(jnp.square(x - mean), axis=axes)  # (c,) biased
            m = self.momentum
            self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
            self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var * (n / (n - 1)))
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)  # (..., c)
        return y * self.scale[...] + self.bias[...]


class ConvModule(nnx.Module):
    """conv (no bias) -> TorchBatchNorm (fp32, momentum 0.1 in torch terms, eps 1e-5) -> ReLU.

    Mirrors mmcv `ConvModule` / refign `ConvBNReLU` (`conv`, `bn`). Input and output NHWC; the output is in
    the compute `dtype`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            strides=stride,
            padding=((padding, padding), (padding, padding)),
            kernel_dilation=dilation,
            feature_group_count=groups,
            use_bias=False,
            dtype=dtype,
            kernel_init=kaiming_fan_out_init(),
            rngs=rngs,
        )
        self.bn = TorchBatchNorm(
            out_channels, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=jnp.float32, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)  # (b, h', w', out)
        x = self.bn(x.astype(jnp.float32))  # (b, h', w', out) fp32
        return jax.nn.relu(x).astype(self.dtype)


class DepthwiseSeparableConvModule(nnx.Module):
    """`depthwise_conv` (k x k, groups = in, + BN + ReLU) then `pointwise_conv` (1x1 to out, + BN + ReLU)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        dilation: int = 1,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.depthwise_conv = ConvModule(
            in_channels,
            in_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            dtype=dtype,
            rngs=rngs,
        )
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.depthwise_conv(x)  # (b, h, w, in)
        return self.pointwise_conv(x)  # (b, h, w, out)


class DropPath(nnx.Dropout):
    """Stochastic depth on NHWC tensors: per sample, zero the branch with probability `rate`, else scale
    by 1 / (1 - rate). Identity in eval mode (`deterministic=True`); the mask comes from the "dropout"
    stream of the constructor's `rngs`.
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        super().__init__(rate, broadcast_dims=(1, 2, 3), rngs=rngs)

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"DropPath expects NHWC (4-D) input, got shape {x.shape}")
        return super().__call__(x, **kwargs)
