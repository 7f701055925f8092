"""UAWarpC head, warp and confidence against a PyTorch UAWarpC assembled here from torch.nn layers and a
pure-torch local correlation, following refign.md sections 3 and 5 (not our JAX code). Random weights and
random BatchNorm statistics, loaded through our converter; a non-square pyramid (the VGG grids of a
72x104 image) and flows large enough that the warps sample outside the image.

Tolerances: flows are in pixels, so each level is compared with atol 1e-4 * max(1, max |flow_ref|) (a
relative 1e-4 of the largest displacement); log-variances with atol 1e-4 * max(1, max |s_ref|).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from lqseg_jax.convert.mit import blank_model
from lqseg_jax.convert.uawarpc import load_uawarpc
from lqseg_jax.models.uawarpc import UAWarpC, UAWarpCHead, align, confidence, warp
from lqseg_jax.models.vgg import VGG16Features

pytestmark = pytest.mark.usefixtures("fast_compile")

IMAGE = (72, 104)  # (H, W): pool2 18x26, pool3 9x13
WIDE = (72, 1088)  # pool2 18x272, pool3 9x136; max(H, W) >= 1086: one iterative-refinement pass at 4x68
VGG_WIDTHS = (4, 8, 12, 16, 16)  # tiny VGG: the head has no weights on the feature channels
PUBLISHED = dict(
    decoder4=643_778,
    decoder3=445_634,
    decoder2=445_634,
    decoder1=447_938,
    refinement_module_adaptive=517_826,
    refinement_module_finest=517_826,
    reduce=66,
    estimate_uncertainty_components4=30_935,
    estimate_uncertainty_components3=31_799,
    estimate_uncertainty_components2=31_799,
    estimate_uncertainty_components1=31_799,
)
HEAD_TOTAL, VGG_TOTAL = 3_145_034, 14_714_688


# ---- the PyTorch reference (NCHW), written from refign.md ----
def torch_local_corr(in1, in2, r=4):
    """out[:, (dy+r)*p + (dx+r), y, x] = sum_c in1[:, c, y, x] * in2[:, c, y+dy, x+dx], zero outside."""
    _, _, h, w = in1.shape
    padded = F.pad(in2, (r, r, r, r))
    outs = [
        (in1 * padded[:, :, r + dy : r + dy + h, r + dx : r + dx + w]).sum(1)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
    ]
    return torch.stack(outs, 1)


def torch_warp(x, flow):
    """Returns (warped, strict-interior mask), grid_sample(align_corners=True, zeros)."""
    b, _, h, w = x.shape
    if torch.all(flow == 0):
        return x, torch.ones(b, h, w, dtype=torch.bool)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij"
    )
    gx = 2.0 * (xs + flow[:, 0]) / max(w - 1, 1) - 1.0
    gy = 2.0 * (ys + flow[:, 1]) / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], -1)
    out = F.grid_sample(x.float(), grid.float(), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out, (gx > -1) & (gy > -1) & (gx < 1) & (gy < 1)


def l2n(x):
    return F.normalize(x, p=2, dim=1)


class TConvBN(nn.Module):
    def __init__(self, cin, cout, k=3, act=True, padding=None, dilation=1):
        super().__init__()
        padding = dilation * (k - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.leaky_relu(x, 0.1) if self.act else x


class TDecoder(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv_0 = TConvBN(cin, 128, act=False)
        self.conv0_skip = TConvBN(128, 96, 1, act=False)
        self.conv_1 = TConvBN(128, 128)
        self.conv_2 = TConvBN(128, 96, act=False)
        self.conv2_skip = TConvBN(96, 32, 1, act=False)
        self.conv_3 = TConvBN(96, 64)
        self.conv_4 = TConvBN(64, 32, act=False)
        self.predict_mapping = nn.Conv2d(32, 2, 3, padding=1)

    def forward(self, x):
        x0 = self.conv_0(x)
        s2 = self.conv_2(self.conv_1(F.leaky_relu(x0, 0.1))) + self.conv0_skip(x0)
        s4 = self.conv_4(self.conv_3(F.leaky_relu(s2, 0.1))) + self.conv2_skip(s2)
        x = F.leaky_relu(s4, 0.1)
        return self.predict_mapping(x), x


class TRefinement(nn.Module):
    def __init__(self):
        super().__init__()
        spec = [(32, 128, 1), (128, 128, 2), (128, 128, 4), (128, 96, 8), (96, 64, 16), (64, 32, 1)]
        self.dc_convs = nn.Sequential(
            *[TConvBN(i, o, dilation=d) for i, o, d in spec], nn.Conv2d(32, 2, 3, padding=1)
        )

    def forward(self, x):
        return self.dc_convs(x)


class TUncertainty(nn.Module):
    def __init__(self, s, previous):
        super().__init__()
        self.s = s
        self.conv_0 = TConvBN(1, 32, padding=0)
        self.conv_1 = TConvBN(32, 32, padding=0)
        self.conv_2 = TConvBN(32, 16, padding=0)
        self.predict_uncertainty = nn.Conv2d(16, 6, 3)
        self.pred_conv_0 = TConvBN(38 + (3 if previous else 0), 32)
        self.pred_conv_1 = TConvBN(32, 16)
        self.predict_uncertainty_final = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, corr, feat, *previous):
        b, _, h, w = corr.shape
        x = corr.permute(0, 2, 3, 1).reshape(b * h * w, 1, self.s, self.s)
        x = self.conv_0(x)
        if self.s == 16:
            x = F.max_pool2d(x, 2)
        x = self.predict_uncertainty(self.conv_2(self.conv_1(x)))
        x = x.reshape(b, h, w, 6).permute(0, 3, 1, 2)
        x = torch.cat([x, feat, *previous], 1)
        return self.predict_uncertainty_final(self.pred_conv_1(self.pred_conv_0(x)))


def to_flow(m):
    _, _, h, w = m.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=m.dtype), torch.arange(w, dtype=m.dtype), indexing="ij")
    return torch.stack([(m[:, 0] + 1) * (w - 1) / 2.0 - xs, (m[:, 1] + 1) * (h - 1) / 2.0 - ys], 1)


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def scale(f, sx, sy):
    return torch.stack([f[:, 0] * sx, f[:, 1] * sy], 1)


class THead(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder4 = TDecoder(256)
        self.decoder3 = TDecoder(84)
        self.refinement_module_adaptive = TRefinement()
        self.decoder2 = TDecoder(84)
        self.reduce = nn.Conv2d(32, 2, 1)
        self.decoder1 = TDecoder(86)
        self.refinement_module_finest = TRefinement()
        self.estimate_uncertainty_components4 = TUncertainty(16, False)
        self.estimate_uncertainty_components3 = TUncertainty(9, True)
        self.estimate_uncertainty_components2 = TUncertainty(9, True)
        self.estimate_uncertainty_components1 = TUncertainty(9, True)
        self.iterative = False  # eval-only extra passes at 1/16, 1/32, ... of the image
        self.masks = []

    def global_corr(self, src, trg):
        b, c = src.shape[:2]
        corr = torch.einsum(
            "bck,bcl->bkl", src.reshape(b, c, 256), trg.reshape(b, c, 256)
        )  # (b, k_src, l_trg)
        a = corr / (corr.max(dim=2, keepdim=True).values + 1e-5)  # per source pixel, max over target
        bb = corr / (corr.max(dim=1, keepdim=True).values + 1e-5)  # per target pixel, max over source
        corr = corr * (a * bb)
        return l2n(F.relu(corr.reshape(b, 256, 16, 16)))

    def local(self, x, trg, flow):
        warped, mask = torch_warp(x, flow)
        self.masks.append(mask)
        return l2n(F.relu(torch_local_corr(trg, warped)))

    def forward(self, trg, src, trg_256, src_256, out_size):
        c11, c12, c13, c14 = (l2n(f) for f in (*trg, *trg_256))
        c21, c22, c23, c24 = (l2n(f) for f in (*src, *src_256))
        hh, ww = out_size
        dterm = 2 * math.log(math.sqrt(hh**2 + ww**2) / math.sqrt(2 * 256**2))
        self.masks = []
        corr4 = self.global_corr(c24, c14)
        m4, x4 = self.decoder4(corr4)
        f4 = to_flow(m4) * 16.0
        s4 = self.estimate_uncertainty_components4(corr4, x4) + 2 * math.log(16)
        uf4, us4 = up(f4, (32, 32)), up(s4, (32, 32))
        corr3 = self.local(c23, c13, uf4 * (32 / 256))
        r3, x3 = self.decoder3(torch.cat([corr3, uf4, us4], 1))
        f3 = r3 + self.refinement_module_adaptive(x3) + uf4
        s3 = self.estimate_uncertainty_components3(corr3, x3, us4, uf4)
        f3, s3 = scale(f3, ww / 256, hh / 256), s3 + dterm
        if self.iterative and not self.training:
            n = max(0, round(math.log2(max(hh, ww) / 8 / 32 / 3)))
            for i in range(n):
                ratio = 1 / (8 * 2 ** (n - i))
                size = (int(hh * ratio), int(ww * ratio))
                uf, us = up(f3, size), up(s3, size)
                area = [F.interpolate(c, size=size, mode="area") for c in (c22, c12)]
                corr = self.local(area[0], area[1], uf * ratio)
                r, x = self.decoder2(torch.cat([corr, uf, us], 1))
                f3 = r + uf
                s3 = self.estimate_uncertainty_components2(corr, x, us, uf)
        h2, w2 = c12.shape[-2:]
        uf3, us3 = up(f3, (h2, w2)), up(s3, (h2, w2))
        corr2 = self.local(c22, c12, scale(uf3, w2 / ww, h2 / hh))
        r2, x2 = self.decoder2(torch.cat([corr2, uf3, us3], 1))
        f2 = r2 + uf3
        s2 = self.estimate_uncertainty_components2(corr2, x2, us3, uf3)
        h1, w1 = c11.shape[-2:]
        uf2, us2 = up(f2, (h1, w1)), up(s2, (h1, w1))
        ux2 = self.reduce(up(x2, (h1, w1)))
        corr1 = self.local(c21, c11, scale(uf2, w1 / ww, h1 / hh))
        r1, x1 = self.decoder1(torch.cat([corr1, uf2, ux2, us2], 1))
        f1 = r1 + self.refinement_module_finest(x1) + uf2
        s1 = self.estimate_uncertainty_components1(corr1, x1, us2, uf2)
        return [(scale(f4, ww / 256, hh / 256), s4 + dterm), (f3, s3), (f2, s2), (f1, s1)]


def torch_vgg(widths):
    """torchvision's VGG-16 `features` layout (configuration D) with the given stage widths."""
    layers, cin = [], 3
    for width, depth in zip(widths, (2, 2, 3, 3, 3)):
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class TUAWarpC(nn.Module):
    """refign's AlignmentModel forward: VGG on cat[source, target] at full size ([0:10], [10:17]) and on
    their area-256 copies ([0:17], [17:24]), then the head."""

    def __init__(self, widths):
        super().__init__()
        self.alignment_backbone = nn.Module()
        self.alignment_backbone.features = torch_vgg(widths)
        self.alignment_head = THead()

    def forward(self, target, source):
        b, _, hh, ww = target.shape
        f = self.alignment_backbone.features
        both = torch.cat([source, target])
        p2 = f[:10](both)
        p3 = f[10:17](p2)
        small = F.interpolate(both, size=(256, 256), mode="area")
        q3 = f[:17](small)
        q4 = f[17:24](q3)
        return self.alignment_head(
            (p2[b:], p3[b:]), (p2[:b], p3[:b]), (q3[b:], q4[b:]), (q3[:b], q4[:b]), (hh, ww)
        )


# ---- fixtures and helpers ----
def random_reference(seed=0):
    torch.manual_seed(seed)
    net = TUAWarpC(VGG_WIDTHS)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        # level-4 mappings well beyond [-1, 1], so the warps of levels 3-1 sample outside the image
        net.alignment_head.decoder4.predict_mapping.weight.mul_(8.0)
        net.alignment_head.decoder4.predict_mapping.bias.copy_(torch.tensor([0.5, -0.5]))
    return net


def images(seed, size=IMAGE, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, *size, generator=g), torch.randn(b, 3, *size, generator=g)


def nhwc(t):
    return jnp.asarray(t.detach().permute(0, 2, 3, 1).numpy())


def to_nchw(a):
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)


@nnx.jit
def run_model(model, target, source):
    return model(target, source)


def compare(ours, ref):
    """Max abs differences per level (flow, log-var) and the allowed ones, printed."""
    rows = []
    for level, ((f, s), (fr, sr)) in enumerate(zip(ours, ref)):
        fr, sr = fr.detach().permute(0, 2, 3, 1).numpy(), sr.detach().permute(0, 2, 3, 1).numpy()
        assert f.shape == fr.shape and s.shape == sr.shape
        df, ds = float(np.abs(np.asarray(f) - fr).max()), float(np.abs(np.asarray(s) - sr).max())
        tf, ts = 1e-4 * max(1.0, float(np.abs(fr).max())), 1e-4 * max(1.0, float(np.abs(sr).max()))
        rows.append((4 - level, fr.shape[1], fr.shape[2], df, tf, ds, ts, float(np.abs(fr).max())))
    for row in rows:
        level, h, w, df, tf, ds, ts, fmax = row
        print(
            f"level {level} ({h}x{w}): flow diff {df:.2e} (tol {tf:.2e}), "
            f"log-var diff {ds:.2e} (tol {ts:.2e}), max |flow| {fmax:.1f} px"
        )
    return rows


# ---- tests ----
def test_full_size_parameter_counts():
    head = nnx.eval_shape(lambda: UAWarpCHead(rngs=nnx.Rngs(0)))
    vgg = nnx.eval_shape(lambda: VGG16Features(rngs=nnx.Rngs(0)))

    def count(m):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    for name, published in PUBLISHED.items():
        ours = count(getattr(head, name))
        print(f"{name}: ours {ours:,}, original {published:,}")
        assert ours == published, name
    print(f"UAWarpC head: ours {count(head):,}, original {HEAD_TOTAL:,}")
    print(f"VGG-16 features: ours {count(vgg):,}, original {VGG_TOTAL:,}")
    assert count(head) == HEAD_TOTAL
    assert count(vgg) == VGG_TOTAL
    tensors = jax.tree.leaves(nnx.state(head, (nnx.Param, nnx.BatchStat)))
    assert len(tensors) + 60 == 390  # + one num_batches_tracked per BatchNorm = the checkpoint's head tensors


@pytest.fixture(scope="module")
def models():
    ref = random_reference()
    ref.alignment_head.iterative = True
    ours = blank_model(lambda: UAWarpC(iterative_refinement=True, vgg_widths=VGG_WIDTHS, rngs=nnx.Rngs(0)))
    load_uawarpc(ours, ref.state_dict())
    return ref, ours


def test_uawarpc_parity_eval_with_iterative_refinement(models):
    """Eval mode on a 72x1088 pair: levels 4 and 3, the eval-only extra pass (decoder2 / U2 weights at
    1/16 of the image), levels 2 and 1; the path without the extra pass is the same code minus the loop."""
    ref, ours = models
    ref.eval()
    ours.eval()
    target, source = images(1, WIDE)
    with torch.no_grad():
        expected = ref(target, source)
    outside = [float((~m).float().mean()) for m in ref.alignment_head.masks]
    print("fraction of warp samples outside the image (level 3, extra pass, levels 2, 1):", outside)
    assert len(outside) == 4 and min(outside) > 0.02, (
        "one extra pass; the flows should reach beyond the borders"
    )
    for level, *_, df, tf, ds, ts, _ in compare(run_model(ours, nhwc(target), nhwc(source)), expected):
        assert df <= tf and ds <= ts, f"level {level}"


def test_uawarpc_parity_train_mode_bn(models):
    """Train mode (batch statistics; the iterative refinement is eval-only, so it stays off)."""
    ref, ours = models
    ref.train()
    ours.train()
    try:
        target, source = images(2)
        with torch.no_grad():
            expected = ref(target, source)
        for level, *_, df, tf, ds, ts, _ in compare(run_model(ours, nhwc(target), nhwc(source)), expected):
            assert df <= tf and ds <= ts, f"level {level}"
        # running statistics updated as torch does (unbiased variance, momentum 0.1)
        for name in (
            "decoder1.conv_0.bn",
            "estimate_uncertainty_components4.conv_1.bn",
            "decoder3.conv2_skip.bn",
        ):
            t = ref.alignment_head.get_submodule(name)
            bn = ours.alignment_head
            for part in name.split("."):
                bn = getattr(bn, part)
            np.testing.assert_allclose(np.asarray(bn.mean[...]), t.running_mean.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(bn.var[...]), t.running_var.numpy(), rtol=1e-4, atol=1e-5)
    finally:
        ref.eval()
        ours.eval()


def test_head_rejects_a_wrong_pyramid(models):
    _, ours = models
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="trg_256"):
        ours.alignment_head((x, x), (x, x), (x, x), (x, x), (32, 32))


def test_warp_and_mask_against_grid_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g)
    h, w = 5, 7
    flow = torch.randn(2, 2, h, w, generator=g) * 3  # many samples outside
    # exact-border and exact-pixel samples: X+u in {0, W-1, -1, W}, integer and half-integer positions
    flow[0, 0, 0, :] = -torch.arange(w, dtype=torch.float32)  # X+u = 0 (first column: invalid)
    flow[0, 1, 0, :] = 1.0  # Y+v = 1
    flow[0, 0, 1, :] = (w - 1) - torch.arange(w, dtype=torch.float32)  # X+u = W-1 (last column: invalid)
    flow[0, 1, 1, :] = 1.5
    flow[1, :, 2, :] = 0.5  # half-pixel shifts inside
    flow[1, 0, 3, :] = -1.0 - torch.arange(w, dtype=torch.float32)  # X+u = -1: all taps but one outside
    expected, expected_mask = torch_warp(x, flow)
    ours, mask = jax.jit(warp)(nhwc(x), nhwc(flow))
    np.testing.assert_allclose(np.asarray(ours), expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert not bool(mask[0, 0].any()) and not bool(mask[0, 1].any())
    np.testing.assert_array_equal(np.asarray(mask), expected_mask.numpy())
    # zero-flow shortcut: unchanged input, all valid
    same, all_valid = jax.jit(warp)(nhwc(x), jnp.zeros((2, h, w, 2)))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(nhwc(x)))
    assert bool(all_valid.all())


def test_warp_gradient_matches_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 6, 5, generator=g, requires_grad=True)
    flow = (torch.randn(1, 2, 6, 5, generator=g) * 2).requires_grad_(True)
    out, _ = torch_warp(x, flow)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()

    def loss(xj, fj):
        return jnp.sum(warp(xj, fj)[0] * nhwc(weights))

    gx, gf = jax.jit(jax.grad(loss, argnums=(0, 1)))(nhwc(x), nhwc(flow))
    np.testing.assert_allclose(np.asarray(gx), x.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(gf), flow.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_confidence():
    s = torch.linspace(-4, 4, 9).reshape(1, 1, 3, 3)
    expected = 1.0 - torch.exp(-1.0 / (2 * torch.exp(s)))
    np.testing.assert_allclose(
        np.asarray(confidence(nhwc(s))), expected.permute(0, 2, 3, 1).numpy(), atol=1e-7
    )


class FixedFlow:
    """Stands in for UAWarpC in `align`: a known full-size flow and log-variance."""

    def __init__(self, flow, log_var):
        self.flow, self.log_var = flow, log_var

    def dense_flow(self, target, source):
        return self.flow, self.log_var


def test_align_returns_warped_logits_mask_and_confidence():
    k = jax.random.split(jax.random.key(0), 4)
    b, h, w = 2, 12, 17
    flow = jax.random.normal(k[0], (b, h, w, 2)) * 4  # some samples outside
    log_var = jax.random.normal(k[1], (b, h, w, 1)) * 2
    logits = jax.random.normal(k[2], (b, h, w, 5))
    images = jax.random.normal(k[3], (b, h, w, 3))
    run = jax.jit(lambda f, s, x, lg: align(FixedFlow(f, s), x, x, lg))
    warped, valid, p = run(flow, log_var, images, logits)
    expected, expected_mask = torch_warp(to_nchw(logits), to_nchw(flow))
    np.testing.assert_allclose(np.asarray(warped), expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(valid), expected_mask.numpy())
    expected_p = 1.0 - torch.exp(-1.0 / (2 * torch.exp(to_nchw(log_var))))
    np.testing.assert_allclose(np.asarray(p), expected_p.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert warped.dtype == jnp.float32 and valid.dtype == jnp.bool_ and p.shape == (b, h, w, 1)
    with pytest.raises(ValueError, match="reference_logits"):
        align(FixedFlow(flow, log_var), images, images, logits[:, :-1])
