"""VGG-16 features (configuration D, no BatchNorm) as refign's alignment backbone (`models/backbones/vgg.py`).

`features` mirrors torchvision's `nn.Sequential`: 31 entries, 13 `nnx.Conv` 3x3 (pad 1, bias) at indices
0 2 5 7 10 12 14 17 19 21 24 26 28, each followed by a ReLU, and 2x2 max pools (floor mode) at 4 9 16 23
30. So torchvision's `features.N.{weight,bias}` and refign's `alignment_backbone.features.N.*` are our
paths `features.N.*`. `model(x, ends)` runs `features[prev:end]` cumulatively and returns the output at
each end: refign takes `POOL2_POOL3 = (10, 17)` of the full-size image and `POOL3_POOL4 = (17, 24)` of the
256x256 `area`-resized one. Input: ImageNet-normalised RGB, NHWC. The channel widths are a parameter only
so that tests can run tiny copies; the published network is `VGG16_WIDTHS` (14,714,688 parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lqseg_jax.models.layers import kaiming_fan_out_init

VGG16_WIDTHS = (64, 128, 256, 512, 512)  # per stage; stages have 2, 2, 3, 3, 3 convs
STAGE_DEPTHS = (2, 2, 3, 3, 3)
POOL2_POOL3 = (10, 17)
POOL3_POOL4 = (17, 24)


class ReLU(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool2(nnx.Module):
    """nn.MaxPool2d(2, 2): floor mode, an odd last row/column is dropped."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # (b, h // 2, w // 2, c)


class VGG16Features(nnx.Module):
    def __init__(
        self,
        widths: Sequence[int] = VGG16_WIDTHS,
        in_channels: int = 3,
        dtype: jnp.dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        if len(widths) != len(STAGE_DEPTHS):
            raise ValueError(
                f"VGG16Features: widths must have 5 entries (one per stage), got {tuple(widths)}"
            )
        layers: list[nnx.Module] = []
        cin = in_channels
        for width, depth in zip(widths, STAGE_DEPTHS):
            for _ in range(depth):
                conv = nnx.Conv(
                    cin,
                    int(width),
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=dtype,
                    kernel_init=kaiming_fan_out_init(),
                    bias_init=jax.nn.initializers.zeros,
                    rngs=rngs,
                )
                layers += [conv, ReLU()]
                cin = int(width)
            layers.append(MaxPool2())
        self.features = nnx.List(layers)
        self.in_channels = in_channels

    def __call__(self, x: jax.Array, ends: Sequence[int] = POOL2_POOL3) -> list[jax.Array]:
        """Outputs of `features[:end]` for each end (increasing, 1..31), computed in one pass."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"VGG16Features: input must be NHWC with {self.in_channels} channels, got {x.shape}"
            )
        ends = [int(e) for e in ends]
        if not ends or ends != sorted(ends) or ends[0] < 1 or ends[-1] > len(self.features):
            raise ValueError(f"VGG16Features: ends must increase within 1..{len(self.features)}, got {ends}")
        outs, prev = [], 0
        for end in ends:
            for layer in self.features[prev:end]:
                x = layer(x)  # (b, h_i, w_i, c_i)
            outs.append(x)
            prev = end
        return outs
