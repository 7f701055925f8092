"""Refign's refinement (lqseg_jax/systems/refign.py) against a PyTorch re-statement of refign.md section 8
written here on NCHW tensors, for each ablation row as configs/refign.py maps its switches; the trust term
and the static-class mask M on hand-made inputs."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lqseg_jax.models.uawarpc import confidence, warp
from lqseg_jax.systems.refign import normalised_entropy, refine, static_class_mask, trust
from lqseg_jax.train.config import load_config

K = 19
S = (
    0,
    1,
    2,
    3,
    4,
    8,
    9,
    10,
)  # refign.md section 8: road, sidewalk, building, wall, fence, vegetation, terrain, sky


def _t(x):
    """NHWC numpy -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float32), -1, 1)))


def torch_warp(x, flow):
    """refign warp(x, flow, return_mask=True), refign.md 3.5: grid_sample(bilinear, zeros, align_corners=True)
    at (X + u, Y + v); mask = the sample strictly inside the image."""
    _, _, h, w = x.shape
    gx = 2 * (torch.arange(w, dtype=torch.float32)[None, None] + flow[:, 0]) / (w - 1) - 1  # (b, h, w)
    gy = 2 * (torch.arange(h, dtype=torch.float32)[None, :, None] + flow[:, 1]) / (h - 1) - 1
    grid = torch.stack([gx, gy], -1)  # (b, h, w, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    mask = (gx > -1) & (gy > -1) & (gx < 1) & (gy < 1)
    return out, mask


def torch_refine(l_t, l_r, mask, cert, *, gamma, disable_M, disable_P, aligned, static=S):
    """refign.md section 8, NCHW: p_T, p_R softmax; s = (mean eta)^gamma; M on the static channels where
    both argmaxes are static; P = cert (0.5 when disabled or unaligned); eps = s max(P, M), 0 outside the
    warp mask when aligned; (1 - eps) p_T + eps p_R."""
    p_t, p_r = torch.softmax(l_t, 1), torch.softmax(l_r, 1)
    k = l_t.shape[1]
    eta = -(p_t * torch.log_softmax(l_t, 1)).sum(1) / math.log(k)  # (b, h, w)
    s = eta.mean(dim=(1, 2)) ** gamma  # (b,)
    static_t = torch.zeros_like(eta, dtype=torch.bool)
    static_r = torch.zeros_like(eta, dtype=torch.bool)
    for c in static:
        static_t |= p_t.argmax(1) == c
        static_r |= p_r.argmax(1) == c
    m = (static_t & static_r)[:, None].expand_as(p_t).clone().float()
    keep = torch.zeros(k)
    keep[list(static)] = 1.0
    m = m * keep[None, :, None, None]
    if disable_M:
        m.zero_()
    p = cert.expand_as(p_t) if aligned and not disable_P else torch.full_like(p_t, 0.5)
    eps = s.view(-1, 1, 1, 1) * torch.maximum(p, m)
    if aligned:
        eps = eps * mask[:, None].float()
    return (1 - eps) * p_t + eps * p_r


def _inputs(seed=0, b=2, h=9, w=11):
    rng = np.random.default_rng(seed)
    l_t = (3 * rng.normal(size=(b, h, w, K))).astype(np.float32)
    l_r = (3 * rng.normal(size=(b, h, w, K))).astype(np.float32)
    l_t[0, :3] += 8 * np.eye(K, dtype=np.float32)[2]  # rows where the target says "building"
    l_r[0, :4] += 8 * np.eye(K, dtype=np.float32)[10]  # and the reference "sky": M = 1 on the static channels
    flow = rng.uniform(-4, 4, size=(b, h, w, 2)).astype(np.float32)
    log_var = rng.uniform(-3, 3, size=(b, h, w, 1)).astype(np.float32)
    return l_t, l_r, flow, log_var


@pytest.mark.parametrize("row", [1, 2, 3, 4, 5, 6])
def test_refine_matches_torch_for_each_ablation_row(row):
    r = load_config(f"configs/refign.py:acdc,row{row}").uda.refign
    assert r.use_refign and tuple(r.static_classes) == S
    l_t, l_r, flow, log_var = _inputs(row)
    cert_np = np.asarray(confidence(jnp.asarray(log_var)))
    t_cert = _t(1.0 - np.exp(-1.0 / (2.0 * np.exp(log_var))))  # P = 1 - exp(-R^2 / (2 e^s)), R = 1
    np.testing.assert_allclose(cert_np, np.moveaxis(t_cert.numpy(), 1, -1), atol=1e-6)
    if r.use_align:
        warped, valid = warp(jnp.asarray(l_r), jnp.asarray(flow))
        t_warped, t_mask = torch_warp(_t(l_r), _t(flow))
        np.testing.assert_array_equal(np.asarray(valid), t_mask.numpy())
        assert 0.2 < float(valid.mean()) < 0.95  # both sides of the mask are exercised
        got = refine(
            jnp.asarray(l_t), warped, valid, jnp.asarray(cert_np),
            gamma=r.gamma, static_classes=r.static_classes, disable_M=r.disable_M, disable_P=r.disable_P,
        )  # fmt: skip
    else:  # row 1: the unaligned reference, no mask, no P
        t_warped, t_mask = _t(l_r), None
        got = refine(
            jnp.asarray(l_t), jnp.asarray(l_r),
            gamma=r.gamma, static_classes=r.static_classes, disable_M=r.disable_M, disable_P=r.disable_P,
        )  # fmt: skip
    want = torch_refine(
        _t(l_t), t_warped, t_mask, t_cert,
        gamma=r.gamma, disable_M=r.disable_M, disable_P=r.disable_P, aligned=r.use_align,
    )  # fmt: skip
    want = np.moveaxis(want.numpy(), 1, -1)
    assert got.shape == want.shape == (2, 9, 11, K) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)

    # the table's effective eps (refign.md section 8), read off the mixture on one channel
    p_t = np.asarray(torch.softmax(_t(l_t), 1).numpy()).transpose(0, 2, 3, 1)
    p_r = np.moveaxis(torch.softmax(t_warped, 1).numpy(), 1, -1)
    if row == 1:
        np.testing.assert_allclose(np.asarray(got), 0.5 * p_t + 0.5 * p_r, atol=1e-6)
    if row == 2:
        eps = np.where(np.asarray(valid)[..., None], 0.5, 0.0)
        np.testing.assert_allclose(np.asarray(got), (1 - eps) * p_t + eps * p_r, atol=1e-6)
    if row == 3:
        eps = np.where(np.asarray(valid)[..., None], cert_np, 0.0)
        np.testing.assert_allclose(np.asarray(got), (1 - eps) * p_t + eps * p_r, atol=1e-6)


def test_trust_hand_values():
    # image 0: every pixel (0, ln 3) over 2 classes: p = (1/4, 3/4), eta = 2 - (3/4) log2 3
    # image 1: every pixel (1000, 0): p = (1, 0) exactly, eta = 0
    logits = np.zeros((2, 3, 4, 2), np.float32)
    logits[0, ..., 1] = math.log(3.0)
    logits[1, ..., 0] = 1000.0
    eta0 = 2.0 - 0.75 * math.log2(3.0)
    np.testing.assert_allclose(np.asarray(normalised_entropy(jnp.asarray(logits)))[0], eta0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(trust(jnp.asarray(logits), 0.0)), [1.0, 1.0], rtol=0)  # 0^0 = 1
    np.testing.assert_allclose(np.asarray(trust(jnp.asarray(logits), 0.25)), [eta0**0.25, 0.0], rtol=1e-6)
    # uniform logits over 19 classes: eta = 1 whatever gamma
    np.testing.assert_allclose(np.asarray(trust(jnp.zeros((1, 2, 2, K)), 0.25)), [1.0], rtol=1e-6)
    # half the pixels uniform (eta 1), half certain (eta 0): s = 0.5^gamma
    half = np.zeros((1, 2, 2, K), np.float32)
    half[0, 0, :, 3] = 1000.0
    np.testing.assert_allclose(np.asarray(trust(jnp.asarray(half), 0.25)), [0.5**0.25], rtol=1e-6)


def test_static_class_mask_on_hand_made_argmaxes():
    # 4 pixels (target argmax, reference argmax): (road, sky) both static; (road, pole) pole is not;
    # (person, person) dynamic; (vegetation, vegetation) static
    pairs = [(0, 10), (0, 5), (11, 11), (8, 8)]
    onehot = np.eye(K, dtype=np.float32)
    p_t = np.stack([onehot[a] for a, _ in pairs])[None, None]  # (1, 1, 4, K)
    p_r = np.stack([onehot[b] for _, b in pairs])[None, None]
    m = np.asarray(static_class_mask(jnp.asarray(p_t), jnp.asarray(p_r), S))
    want = np.zeros((1, 1, 4, K), np.float32)
    want[0, 0, 0, list(S)] = 1.0
    want[0, 0, 3, list(S)] = 1.0
    np.testing.assert_array_equal(m, want)
    # through refine: gamma 0, P disabled (0.5), no mask: eps = max(0.5, M) = 1 on the static channels of
    # pixels 0 and 3, so those channels take the reference's probabilities there
    l_t, l_r = 20 * jnp.asarray(p_t), 20 * jnp.asarray(p_r)
    got = np.asarray(refine(l_t, l_r, gamma=0.0, static_classes=S, disable_P=True))
    pt, pr = (
        np.asarray(jnp.exp(l_t) / jnp.exp(l_t).sum(-1, keepdims=True)),
        np.asarray(jnp.exp(l_r) / jnp.exp(l_r).sum(-1, keepdims=True)),
    )
    eps = np.maximum(0.5, want)
    np.testing.assert_allclose(got, (1 - eps) * pt + eps * pr, atol=1e-7)
    assert got[0, 0, 0, 10] > 0.99 and got[0, 0, 0, 0] < 1e-6  # pixel 0: sky replaces road entirely
    got_no_m = np.asarray(refine(l_t, l_r, gamma=0.0, static_classes=S, disable_M=True, disable_P=True))
    np.testing.assert_allclose(got_no_m, 0.5 * pt + 0.5 * pr, atol=1e-7)
