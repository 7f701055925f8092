"""UAWarpC losses (systems/uawarpc_losses.py) against a PyTorch re-statement of refign.md 3.7 written here:
values and gradients on random flows, log-variances and masks; the loss weights of section 1 O0b."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lqseg_jax.systems import uawarpc_losses as L

SIZES = ((4, 5), (8, 10), (16, 20), (32, 40))  # levels coarse -> fine; gt at 32 x 40


# ------------------------------------------------------------------------ torch re-statement (NCHW)
def t_warp(x, flow):
    """refign warp: sample x at (X + u, Y + v), grid_sample bilinear, zeros, align_corners=True."""
    h, w = x.shape[-2:]
    if flow.abs().sum() == 0:
        return x
    yy, xx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    gx = 2.0 * (xx + flow[:, 0]) / max(w - 1, 1) - 1.0
    gy = 2.0 * (yy + flow[:, 1]) / max(h - 1, 1) - 1.0
    return F.grid_sample(
        x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="zeros", align_corners=True
    )


def t_level(flow, log_var, gt, mask):
    h, w = flow.shape[-2:]
    g = F.interpolate(gt, (h, w), mode="bilinear", align_corners=False)
    mask = mask.unsqueeze(1)
    if mask.shape[2] != h or mask.shape[3] != w:
        mask = F.interpolate(mask.float(), (h, w), mode="bilinear", align_corners=False).floor().bool()
    if not torch.any(mask):
        return flow.new_zeros([])
    d = flow - g
    e = torch.where(d.abs() < 1, d * d, 2 * d.abs() - 1).sum(1, keepdim=True)
    s = log_var if log_var.shape[1] == 1 else torch.logsumexp(log_var, 1, keepdim=True)
    nll = 0.5 * torch.exp(-s) * e + s + math.log(2 * math.pi)
    return torch.masked_select(nll, mask).mean()


def t_multiscale(levels, gt, masks):
    return sum(t_level(f, s, gt, m) for (f, s), m in zip(levels, masks))


def t_wbipath(prime_ref, ref_trg, gt, mask_used, visibility, a1=0.03, a2=0.5):
    big_h, big_w = gt.shape[-2:]
    composed, masks = [], []
    for (f_pr, s_pr), (f_rt, s_rt) in zip(prime_ref, ref_trg):
        h, w = f_pr.shape[-2:]
        f_w = f_pr.detach().clone()
        f_w[:, 0] *= float(w) / float(big_w)
        f_w[:, 1] *= float(h) / float(big_h)
        w_rt = t_warp(f_rt, f_w)
        composed.append((f_pr + w_rt, torch.cat([s_pr, t_warp(s_rt, f_w)], 1)))
        yy, xx = torch.meshgrid(
            torch.arange(h, dtype=gt.dtype), torch.arange(w, dtype=gt.dtype), indexing="ij"
        )
        x, y = xx + f_w[:, 0], yy + f_w[:, 1]
        m = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
        up = F.interpolate(mask_used.unsqueeze(1).float(), (h, w), mode="bilinear", align_corners=False)
        m = m & up.squeeze(1).floor().bool()
        if visibility:
            g = F.interpolate(gt, (h, w), mode="bilinear", align_corners=False)
            fp, wr = f_pr.detach(), w_rt.detach()
            thresh = a1 * ((fp**2).sum(1) + (wr**2).sum(1) + (g**2).sum(1)) + a2
            m = m & ~(((fp + wr - g) ** 2).sum(1) > thresh)
        masks.append(m)
    return t_multiscale(composed, gt, masks)


# ------------------------------------------------------------------------------------------ data
def _data(seed: int):
    rng = np.random.default_rng(seed)
    b = 2
    gt = rng.normal(0, 3, (b, 32, 40, 2)).astype(np.float32)
    mask = np.ones((b, 32, 40), bool)
    mask[0, :, 30:] = False
    mask[1, 5:12, 4:20] = False
    mask[1, rng.random((32, 40)) < 0.02] = False

    def levels(scale):
        out = []
        for h, w in SIZES:
            f = (gt[:, :: 32 // h, :: 40 // w] + rng.normal(0, scale, (b, h, w, 2))).astype(np.float32)
            out.append((f, rng.normal(0, 1, (b, h, w, 1)).astype(np.float32)))
        return out

    return levels(1.0), levels(1.5), gt, mask


def _nchw(a):
    return torch.tensor(np.moveaxis(a, -1, 1).copy(), requires_grad=True)


def _to_torch(levels):
    return [(_nchw(f), _nchw(s)) for f, s in levels]


def _grads_close(ours, theirs):
    """A level whose mask is empty returns a constant 0 in torch: no gradient reaches its tensors."""
    for pair, tensors in zip(ours, theirs):
        for g, t in zip(pair, tensors):
            expect = np.zeros(g.shape, np.float32) if t.grad is None else np.moveaxis(t.grad.numpy(), 1, -1)
            np.testing.assert_allclose(np.asarray(g), expect, rtol=1e-5, atol=1e-5)


def test_multiscale_huber_nll_values_and_gradients_match_the_restatement():
    levels, _, gt, mask = _data(0)
    value, grads = jax.jit(
        jax.value_and_grad(lambda lv: L.multiscale_flow_loss(lv, jnp.asarray(gt), jnp.asarray(mask)))
    )([tuple(map(jnp.asarray, lv)) for lv in levels])
    t_levels = _to_torch(levels)
    t_gt = torch.tensor(np.moveaxis(gt, -1, 1).copy())
    ref = t_multiscale(t_levels, t_gt, [torch.tensor(mask)] * 4)
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5, atol=1e-5)
    _grads_close(grads, t_levels)


@pytest.mark.parametrize("visibility", [False, True])
def test_wbipath_values_and_gradients_match_the_restatement(visibility):
    prime_ref, ref_trg, gt, mask = _data(1)
    # reference -> target flows of about half the gt (so the composition is near it) plus noise
    ref_trg = [(0.5 * f, s) for f, s in ref_trg]
    prime_ref = [(0.5 * f, s) for f, s in prime_ref]

    def loss(pr, rt):
        return L.wbipath_loss(pr, rt, jnp.asarray(gt), jnp.asarray(mask), visibility=visibility)

    as_jax = [[tuple(map(jnp.asarray, lv)) for lv in x] for x in (prime_ref, ref_trg)]
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*as_jax)
    t_pr, t_rt = _to_torch(prime_ref), _to_torch(ref_trg)
    ref = t_wbipath(t_pr, t_rt, torch.tensor(np.moveaxis(gt, -1, 1).copy()), torch.tensor(mask), visibility)
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5, atol=1e-5)
    _grads_close(grads[0], t_pr)
    _grads_close(grads[1], t_rt)


def test_empty_mask_level_contributes_zero():
    f = jnp.zeros((1, 4, 4, 2))
    s = jnp.zeros((1, 4, 4, 1))
    assert float(L.probabilistic_level(f, s, jnp.ones((1, 8, 8, 2)), jnp.zeros((1, 8, 8), bool))) == 0.0


def _quirk_restated(ss, us):
    """refign weights_selfsupervised_and_unsupervised(ss, us, False): weight_ss = False -> ratio 0."""
    ratio = 0.0 / 1.0
    ss_t, us_t = torch.tensor(ss), torch.tensor(us)
    if us_t > ss_t:
        return torch.clamp(us_t / ss_t.clamp(min=1e-8) * ratio, max=100).item(), 1.0
    with np.errstate(all="ignore"):
        return 1.0, torch.clamp(ss_t / us_t.clamp(min=1e-8) / ratio, max=100).item()


@pytest.mark.parametrize(
    "ss, us, expect",
    [
        (1.0, 2.0, (0.0, 1.0)),
        (2.0, 1.0, (1.0, 100.0)),
        (-1.0, -2.0, (1.0, -math.inf)),
        (0.0, -1.0, (1.0, math.nan)),
    ],
)
def test_quirk_weights_for_the_four_sign_cases(ss, us, expect):
    w = tuple(float(x) for x in L.loss_weights(jnp.float32(ss), jnp.float32(us), quirk=True))
    np.testing.assert_equal(w, expect)
    np.testing.assert_equal(w, _quirk_restated(ss, us))


def test_densematching_weights_scale_the_smaller_loss_up():
    w = [float(x) for x in L.loss_weights(jnp.float32(1.0), jnp.float32(3.0))]
    np.testing.assert_allclose(w, [3.0, 1.0], rtol=1e-6)
    w = [float(x) for x in L.loss_weights(jnp.float32(4.0), jnp.float32(2.0), ratio=2.0)]
    np.testing.assert_allclose(w, [1.0, 1.0], rtol=1e-6)
    g = jax.grad(lambda a: jnp.sum(jnp.stack(L.loss_weights(a, jnp.float32(3.0)))))(jnp.float32(1.0))
    assert float(g) == 0.0
