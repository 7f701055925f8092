"""VGG-16 features against torchvision-layout torch.nn layers (configuration D built here, tiny widths,
odd image sizes), and the `area` resize against torch F.interpolate(mode="area") with uneven windows."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from lqseg_jax.convert.common import CheckpointError
from lqseg_jax.convert.mit import blank_model
from lqseg_jax.convert.uawarpc import load_vgg16
from lqseg_jax.models.resize import resize_area
from lqseg_jax.models.vgg import POOL2_POOL3, POOL3_POOL4, VGG16Features

WIDTHS = (4, 6, 8, 8, 8)


def torch_vgg_features(widths):
    """torchvision `vgg16().features` layout (13 conv3x3 + ReLU, 5 max pools) with the given widths."""
    layers, cin = [], 3
    for width, depth in zip(widths, (2, 2, 3, 3, 3)):
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def nhwc(t):
    return jnp.asarray(t.detach().permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = torch_vgg_features(WIDTHS).eval()
    sd = {f"features.{k}": v for k, v in ref.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(3, 3)  # torchvision's file carries the classifier
    ours = blank_model(lambda: VGG16Features(WIDTHS, rngs=nnx.Rngs(0)))
    skipped = load_vgg16(ours, sd)
    assert skipped == ["classifier.0.weight"]
    return ref, ours


def test_vgg_features_match_torch(pair):
    ref, ours = pair
    x = torch.randn(2, 3, 75, 99)  # odd sizes: floor-mode pools drop the last row/column
    run = nnx.jit(lambda m, a: m(a, (2, 5, *POOL2_POOL3, 24, 31)))
    outs = run(ours, nhwc(x))
    with torch.no_grad():
        for end, got in zip((2, 5, 10, 17, 24, 31), outs):
            expected = ref[:end](x).permute(0, 2, 3, 1).numpy()
            assert got.shape == expected.shape, end
            np.testing.assert_allclose(
                np.asarray(got), expected, atol=1e-5, rtol=1e-5, err_msg=f"features[:{end}]"
            )


def test_vgg_cumulative_slices_as_refign(pair):
    """refign's 256x256 call: [0:17] then [17:24] -> pool3 (32x32) and pool4 (16x16)."""
    ref, ours = pair
    x = torch.randn(1, 3, 256, 256)
    p3, p4 = nnx.jit(lambda m, a: m(a, POOL3_POOL4))(ours, nhwc(x))
    with torch.no_grad():
        e3 = ref[:17](x)
        e4 = ref[17:24](e3)
    assert p3.shape == (1, 32, 32, WIDTHS[2]) and p4.shape == (1, 16, 16, WIDTHS[3])
    np.testing.assert_allclose(np.asarray(p4), e4.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)


def test_vgg_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="3 channels"):
        ours(jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="ends"):
        ours(jnp.zeros((1, 8, 8, 3)), (17, 10))
    good = {f"features.{k}": v for k, v in torch_vgg_features(WIDTHS).state_dict().items()}
    fresh = lambda: blank_model(lambda: VGG16Features(WIDTHS, rngs=nnx.Rngs(0)))  # noqa: E731
    with pytest.raises(CheckpointError, match=r"features\.28\.weight.*\(9, 8, 3, 3\)"):
        load_vgg16(fresh(), {**good, "features.28.weight": torch.zeros(9, 8, 3, 3)})
    with pytest.raises(CheckpointError, match=r"features\.28\.kernel"):
        load_vgg16(fresh(), {k: v for k, v in good.items() if k != "features.28.weight"})
    with pytest.raises(CheckpointError, match=r"features\.3\.weight"):
        load_vgg16(fresh(), {**good, "features.3.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "in_size,out_size",
    [
        ((45, 37), (16, 10)),
        ((75, 99), (32, 32)),
        ((540 // 8, 960 // 8), (32, 32)),
        ((5, 6), (7, 9)),
        ((9, 9), (9, 4)),
    ],
)
def test_resize_area_matches_torch(in_size, out_size):
    x = torch.randn(2, 3, *in_size)
    expected = F.interpolate(x, size=out_size, mode="area").permute(0, 2, 3, 1).numpy()
    got = resize_area(nhwc(x), out_size)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6, rtol=1e-6)


def test_resize_area_errors():
    with pytest.raises(ValueError, match="NHWC"):
        resize_area(jnp.zeros((3, 4, 5)), (2, 2))
    with pytest.raises(ValueError, match="size"):
        resize_area(jnp.zeros((1, 3, 4, 5)), (0, 2))
