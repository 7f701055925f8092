"""HRDA multi-resolution forward (lqseg_jax/models/hrda.py) against a PyTorch re-statement of refign.md
section 6 (refign models/hrda.py), with small stand-in encoder/head networks of the same interface (four
feature levels at strides 4..32; a head with BatchNorm, so the statistics over cat[lr, hr] matter) and
the SegFormer scale-attention head, weights copied, the same detail box fed to both. Also: crop-offset
range and multiples, the attention mask and its blur across the box border, the test-time windows."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F
from flax import nnx

from lqseg_jax.eval.inference import slide_inference, window_starts
from lqseg_jax.models import hrda
from lqseg_jax.models.layers import ConvModule

K, B, S = 5, 2, 128
CH = (8, 12, 16, 20)


# --------------------------------------------------------------------------------- stand-in networks
class Encoder(nnx.Module):
    """Four tanh convs: stride 4, then 2, 2, 2."""

    def __init__(self, rngs):
        self.convs = nnx.List(
            [
                nnx.Conv(i, o, (k, k), strides=k, padding="VALID", rngs=rngs)
                for i, o, k in zip((3, *CH[:-1]), CH, (4, 2, 2, 2))
            ]
        )

    def __call__(self, x):
        feats = []
        for conv in self.convs:
            x = jnp.tanh(conv(x))  # (b, h_s, w_s, c_s)
            feats.append(x)
        return feats


class Head(nnx.Module):
    """1x1 ConvModule (BatchNorm) on c1 + the upsampled c4, then a 1x1 conv to the classes."""

    def __init__(self, rngs, num_classes=K):
        self.fuse = ConvModule(CH[0] + CH[3], 16, 1, rngs=rngs)
        self.conv_seg = nnx.Conv(16, num_classes, (1, 1), rngs=rngs)

    def __call__(self, feats):
        c4 = jax.image.resize(feats[3], (*feats[0].shape[:3], CH[3]), "nearest")  # (b, h/4, w/4, c4)
        return self.conv_seg(self.fuse(jnp.concatenate([feats[0], c4], -1)))  # (b, h/4, w/4, K)


def _t(a):
    return torch.from_numpy(np.asarray(a, np.float32).copy())


def _conv_w(conv):  # (kh, kw, I, O) -> (O, I, kh, kw)
    return _t(np.transpose(np.asarray(conv.kernel.get_value()), (3, 2, 0, 1)))


class TEncoder(tnn.Module):
    def __init__(self, enc):
        super().__init__()
        self.convs = tnn.ModuleList()
        for c, k in zip(enc.convs, (4, 2, 2, 2)):
            m = tnn.Conv2d(c.in_features, c.out_features, k, stride=k)
            m.weight.data, m.bias.data = _conv_w(c), _t(c.bias.get_value())
            self.convs.append(m)

    def forward(self, x):
        feats = []
        for m in self.convs:
            x = torch.tanh(m(x))
            feats.append(x)
        return feats


def _t_convbn(cm):
    conv = tnn.Conv2d(cm.conv.in_features, cm.conv.out_features, 1, bias=False)
    conv.weight.data = _conv_w(cm.conv)
    bn = tnn.BatchNorm2d(cm.conv.out_features)
    bn.weight.data, bn.bias.data = _t(cm.bn.scale.get_value()), _t(cm.bn.bias.get_value())
    return tnn.Sequential(conv, bn, tnn.ReLU())


class THead(tnn.Module):
    def __init__(self, head):
        super().__init__()
        self.fuse = _t_convbn(head.fuse)
        self.conv_seg = tnn.Conv2d(16, K, 1)
        self.conv_seg.weight.data, self.conv_seg.bias.data = (
            _conv_w(head.conv_seg),
            _t(head.conv_seg.bias.get_value()),
        )

    def forward(self, feats):
        c4 = F.interpolate(feats[3], size=feats[0].shape[-2:], mode="nearest")
        return self.conv_seg(self.fuse(torch.cat([feats[0], c4], 1)))


class TSegFormerHead(tnn.Module):
    """refign.md section 4: linear_c{i}.proj Linear(C_i -> 256), bilinear to c1, concat [c4, c3, c2, c1],
    linear_fuse ConvBN 1x1 + ReLU, (dropout), linear_pred 1x1 conv with bias."""

    def __init__(self, sa):
        super().__init__()
        self.lin = tnn.ModuleList()
        for i in range(1, 5):
            proj = getattr(sa, f"linear_c{i}").proj
            m = tnn.Linear(proj.in_features, proj.out_features)
            m.weight.data, m.bias.data = _t(np.asarray(proj.kernel.get_value()).T), _t(proj.bias.get_value())
            self.lin.append(m)
        self.linear_fuse = _t_convbn(sa.linear_fuse)
        self.linear_pred = tnn.Conv2d(sa.linear_pred.in_features, K, 1)
        self.linear_pred.weight.data = _conv_w(sa.linear_pred)
        self.linear_pred.bias.data = _t(sa.linear_pred.bias.get_value())

    def forward(self, feats):
        size = feats[0].shape[-2:]
        emb = []
        for i in (3, 2, 1, 0):
            f = feats[i]
            e = (
                self.lin[i](f.flatten(2).transpose(1, 2))
                .transpose(1, 2)
                .reshape(f.shape[0], -1, *f.shape[2:])
            )
            emb.append(F.interpolate(e, size=size, mode="bilinear", align_corners=False))
        return self.linear_pred(self.linear_fuse(torch.cat(emb, 1)))


def _networks():
    rngs = nnx.Rngs(0)
    enc, head = Encoder(rngs), Head(rngs)
    sa = hrda.SegFormerHead(CH, K, channels=24, dropout_ratio=0.0, rngs=rngs)
    # non-trivial BN affine parameters, so a wrong batch composition shows
    for cm in (head.fuse, sa.linear_fuse):
        n = cm.bn.scale.get_value().shape[0]
        cm.bn.scale.set_value(jnp.linspace(0.5, 1.5, n))
        cm.bn.bias.set_value(jnp.linspace(-0.2, 0.3, n))
    # an attention far from its init's constant 0.5, so its inputs' order and box mask matter
    kernel = sa.linear_pred.kernel
    kernel.set_value(jax.random.normal(jax.random.key(1), kernel.get_value().shape))
    return (enc, head, sa), (TEncoder(enc), THead(head), TSegFormerHead(sa))


def _image():
    return np.random.default_rng(0).normal(size=(B, S, S, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


# ---------------------------------------------------------------------------- torch re-statements
def torch_student(t_enc, t_head, t_sa, x, box, os=4):
    """refign.md 6, student training, with the given box (y, x) of size lr-size."""
    lr = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    ch, cw = lr.shape[-2:]
    y1, x1 = box
    hr = x[:, :, y1 : y1 + ch, x1 : x1 + cw]
    feats = t_enc(torch.cat([lr, hr]))
    lr_feats = [f[: x.shape[0]] for f in feats]
    att = torch.sigmoid(t_sa(lr_feats))
    seg = t_head(feats)
    lr_seg, hr_seg = seg[: x.shape[0]], seg[x.shape[0] :]
    mask = torch.zeros_like(lr_seg[:, :1])
    s = 2 * os
    mask[:, :, y1 // s : (y1 + ch) // s, x1 // s : (x1 + cw) // s] = 1
    att = att * mask
    up_lr = F.interpolate((1 - att) * lr_seg, scale_factor=2, mode="bilinear", align_corners=False)
    up_att = F.interpolate(att, scale_factor=2, mode="bilinear", align_corners=False)
    ins = torch.zeros_like(up_lr)
    ins[:, :, y1 // os : (y1 + ch) // os, x1 // os : (x1 + cw) // os] = hr_seg
    fused = up_att * ins + up_lr
    hr_logits = F.interpolate(hr_seg, (ch, cw), mode="bilinear", align_corners=False)
    return fused, hr_logits


def torch_teacher(t_enc, t_head, t_sa, x, os=4):
    """refign.md 6, teacher/eval: sliding detail crops of lr-size, stride half, last clamped, batched
    crop-major, averaged at box/4; attention unmasked."""
    b, _, h, w = x.shape
    lr = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    ch, cw = lr.shape[-2:]
    sh, sw = ch // 2, cw // 2
    boxes, crops = [], []
    for i in range(max(h - ch + sh - 1, 0) // sh + 1):
        for j in range(max(w - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            boxes.append((y1, y2, x1, x2))
            crops.append(x[:, :, y1:y2, x1:x2])
    feats = t_enc(torch.cat([lr, *crops]))
    att = torch.sigmoid(t_sa([f[:b] for f in feats]))
    seg = t_head(feats)
    lr_seg, crop_seg = seg[:b], seg[b:]
    boxes = [tuple(int(v / os) for v in bx) for bx in boxes]
    hh, ww = max(bx[1] for bx in boxes), max(bx[3] for bx in boxes)
    preds = torch.zeros(b, K, hh, ww)
    count = torch.zeros(b, 1, hh, ww)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        preds += F.pad(crop_seg[i * b : (i + 1) * b], (x1, ww - x2, y1, hh - y2))
        count[:, :, y1:y2, x1:x2] += 1
    up_lr = F.interpolate((1 - att) * lr_seg, scale_factor=2, mode="bilinear", align_corners=False)
    up_att = F.interpolate(att, scale_factor=2, mode="bilinear", align_corners=False)
    return up_att * preds / count + up_lr


# ------------------------------------------------------------------------------------------- tests
def test_student_and_teacher_match_torch():
    (enc, head, sa), (t_enc, t_head, t_sa) = _networks()
    x = _image()

    @nnx.jit
    def run(enc, head, sa, x, key):
        fused, hr_logits, offset, _ = hrda.student_forward(enc, head, sa, x, key)
        return fused, hr_logits, offset, hrda.slide_forward(enc, head, sa, x)

    fused, hr_logits, offset, teacher = run(enc, head, sa, jnp.asarray(x), jax.random.key(3))
    box = tuple(int(v) for v in offset)
    assert box != (0, 0)  # the draw of key 3; a box at the origin would hide offset errors
    with torch.no_grad():
        t_fused, t_hr = torch_student(t_enc, t_head, t_sa, _nchw(x), box)
        t_teacher = torch_teacher(t_enc, t_head, t_sa, _nchw(x))
    assert fused.shape == (B, S // 4, S // 4, K) and teacher.shape == (B, S // 4, S // 4, K)
    np.testing.assert_allclose(np.asarray(fused), _nhwc(t_fused), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(hr_logits), _nhwc(t_hr), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(teacher), _nhwc(t_teacher), atol=1e-5, rtol=0)


def test_half_is_torch_scale_factor_half_for_odd_sizes():
    x = np.random.default_rng(1).normal(size=(1, 7, 9, 2)).astype(np.float32)
    want = F.interpolate(_nchw(x), scale_factor=0.5, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.asarray(hrda.half(jnp.asarray(x))), _nhwc(want), atol=1e-6, rtol=0)


def test_crop_offsets_range_and_multiples():
    keys = jax.random.split(jax.random.key(0), 4000)
    offs = np.asarray(jax.vmap(lambda k: hrda.crop_offsets(k, (1024, 1024), (512, 512), 8))(keys))  # (n, 2)
    assert (offs % 8 == 0).all()
    assert offs.min() == 0 and offs.max() == 504  # randrange(0, 513 // 8) * 8: never 512
    assert set(np.unique(offs[:, 0])) == set(range(0, 512, 8))
    assert not (offs[:, 0] == offs[:, 1]).all()  # the two axes are drawn separately
    # a crop that fills an axis: offset 0 there
    offs = np.asarray(jax.vmap(lambda k: hrda.crop_offsets(k, (512, 1024), (512, 512), 8))(keys[:50]))
    assert (offs[:, 0] == 0).all() and offs[:, 1].max() > 0


def _up2_step(n, a, b):
    """bilinear x2 (align_corners=False) of the 0/1 step 1[a <= j < b] of length n, by hand: output o reads
    o / 2 - 1/4, so the two pixels either side of each edge get 1/4 and 3/4."""
    u = np.zeros(2 * n)
    u[2 * a + 1 : 2 * b - 1] = 1
    u[[2 * a - 1, 2 * b]] = 0.25
    u[[2 * a, 2 * b - 1]] = 0.75
    return u


def test_attention_masked_then_blurred_across_the_box_border():
    """att = lr = hr = 1: a_m = 1 on box/8, 0 outside; fused = up2(a_m) ins(1) + up2(1 - a_m). Inside the
    box (logit pixels box/4) that is 1; outside, where ins is 0, 1 - up2(a_m): the masked attention leaks
    over the border (3/4 and 1/4 beside each edge), so the context weight there drops below 1."""
    ones = jnp.ones((1, 16, 16, 1))  # context logits of a 128 input; box 64 at (16, 32)
    offset = jnp.asarray([16, 32])
    fused = np.asarray(hrda.fuse_train(ones, ones, jnp.ones((1, 16, 16, 1)), offset, (64, 64)))[0, :, :, 0]
    up_att = np.outer(_up2_step(16, 2, 10), _up2_step(16, 4, 12))  # box/8 = [2, 10) x [4, 12)
    inside = np.zeros((32, 32), bool)
    inside[4:20, 8:24] = True  # box/4
    want = np.where(inside, 1.0, 1.0 - up_att)
    assert want[3, 12] == 0.75 and want[20, 12] == 0.75 and want[3, 7] == 1 - 1 / 16 and want[0, 0] == 1
    np.testing.assert_allclose(fused, want, atol=1e-6)
    mask = np.asarray(hrda.box_mask(offset, (64, 64), (16, 16), 8))
    assert mask.sum() == 64 and mask[2:10, 4:12].all()


def test_slide_boxes_of_the_teacher():
    assert hrda.slide_boxes((1024, 1024), (512, 512)) == [
        (y, y + 512, x, x + 512) for y in (0, 256, 512) for x in (0, 256, 512)
    ]
    assert hrda.slide_boxes((1080, 1080), (540, 540))[:3] == [(0, 540, x, x + 540) for x in (0, 270, 540)]
    assert hrda.slide_boxes((100, 120), (50, 60))[-1] == (50, 100, 60, 120)


def test_test_time_windows_for_1080x1920():
    """refign.md 6: 1080 windows, stride 420, ceil((W - 1080) / 420) + 1 per axis, last one clamped:
    3 windows at x = 0, 420, 840 for ACDC's 1080x1920; each pixel averaged over the windows covering it."""
    assert window_starts(1920, 1080, 420) == [0, 420, 840]
    assert window_starts(1080, 1080, 420) == [0]
    assert window_starts(2000, 1080, 420) == [0, 420, 840, 920]  # clamped: 1260 -> 920
    seen = []

    def record(w):  # scores = the window's first column value everywhere (its x start)
        seen.append(w.shape)
        return jnp.broadcast_to(w[:, :1, :1, :], w.shape)

    xs = jnp.broadcast_to(jnp.arange(1920, dtype=jnp.float32)[None, None, :, None], (1, 1080, 1920, 1))
    out = np.asarray(slide_inference(record, xs, hrda.TEST_CROP, hrda.TEST_STRIDE))[0, 0, :, 0]
    assert seen == [(1, 1080, 1080, 1)] * 3
    # windows [0, 1080), [420, 1500), [840, 1920): x < 420 sees one, 420..839 two (0, 420), 840..1079 three,
    # 1080..1499 two (420, 840), 1500.. one (840)
    cols = [0, 419, 420, 839, 840, 1079, 1080, 1499, 1500, 1919]
    np.testing.assert_allclose(out[cols], [0, 0, 210, 210, 420, 420, 630, 630, 840, 840])


def test_slide_predict_runs_the_window_forward():
    """Test-time path of one window equals slide_forward upsampled to the window (refign whole_inference)."""
    (enc, head, sa), (t_enc, t_head, t_sa) = _networks()
    for m in (head, sa):
        m.eval()
    x = _image()[:1]
    got = hrda.slide_predict(enc, head, sa, jnp.asarray(x), crop=(S, S), stride=(S // 2, S // 2))
    t_head.eval(), t_sa.eval()
    with torch.no_grad():
        want = F.interpolate(
            torch_teacher(t_enc, t_head, t_sa, _nchw(x)), (S, S), mode="bilinear", align_corners=False
        )
    np.testing.assert_allclose(np.asarray(got), _nhwc(want), atol=1e-5, rtol=0)


def test_crop_at_traced_offset():
    labels = jnp.arange(32 * 32).reshape(1, 32, 32)
    got = jax.jit(lambda y, o: hrda.crop_at(y, o, (16, 16)))(labels, jnp.asarray([8, 16]))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(labels)[:, 8:24, 16:32])
