"""UAWarpC's training losses (refign.md 3.7 and section 1 O0b; refign models/losses.py, after DenseMatching).
NHWC: flows (b, h, w, 2) in original-image pixels, log-variances (b, h, w, 1), masks (b, h, w) bool.

- `huber`: 2 smooth_l1(beta 1) = d^2 if |d| < 1 else 2|d| - 1, per flow component.
- `probabilistic_level`: one level of MultiScaleFlowLoss with a single Gaussian: the ground truth
  bilinearly resized to the level (values unchanged), the mask resized and floored when the sizes differ
  (a pixel survives only if all its taps are valid), e = sum_c huber(f_c - g_c),
  l = 0.5 exp(-s) e + s + ln 2 pi with s = logsumexp of the log-variance channels, mean of l over the mask,
  0 when no pixel of the batch is valid.
- `multiscale_flow_loss`: the sum over levels (weights 1).
- `wbipath_loss`: the prime -> target flow composed of prime -> reference and the reference -> target flow
  warped by the *detached* prime -> reference flow (gradients through both flow values, not through the
  sampling positions), its two log-variances (logsumexp), masked by the inclusive border mask of the warping
  flow, the resized prime mask and, in stage 2, the visibility mask
  |f_PR + W(f_RT) - g|^2 <= a1 (|f_PR|^2 + |W(f_RT)|^2 + |g|^2) + a2 (no gradient).
- `loss_weights`: DenseMatching's weighting (the smaller loss is scaled up to the larger, times the
  configured ratio, no gradient) or, with quirk=True, refign's (w_ss, w_us) = (0, 1) / (1, 100) / (1, -inf) /
  (1, nan) that passes `apply_constant_flow_weights` (False) as the self-supervised weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lqseg_jax.models.resize import resize_bilinear
from lqseg_jax.models.uawarpc import warp

LOG_2PI = math.log(2 * math.pi)
ALPHA_1, ALPHA_2 = 0.03, 0.5

Level = tuple[jax.Array, jax.Array]  # (flow (b, h, w, 2), log-variance (b, h, w, 1 or 2))


def huber(d: jax.Array) -> jax.Array:
    a = jnp.abs(d)
    return jnp.where(a < 1.0, d * d, 2.0 * a - 1.0)


def resize_mask(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """floor(bilinear(mask.float())) > 0 at `size` (b, h, w) bool."""
    m = resize_bilinear(mask.astype(jnp.float32)[..., None], size)[..., 0]  # (b, h, w)
    return jnp.floor(m) > 0


def _border_mask(flow: jax.Array) -> jax.Array:
    """0 <= X + u <= W - 1 and 0 <= Y + v <= H - 1 (inclusive), (b, h, w)."""
    _, h, w, _ = flow.shape
    x = jnp.arange(w, dtype=jnp.float32) + flow[..., 0]
    y = jnp.arange(h, dtype=jnp.float32)[:, None] + flow[..., 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def probabilistic_level(flow: jax.Array, log_var: jax.Array, gt: jax.Array, mask: jax.Array) -> jax.Array:
    """One level's NLL (scalar); `mask` at the gt's size or at the level's."""
    size = flow.shape[1:3]
    g = resize_bilinear(gt.astype(jnp.float32), size)  # (b, h, w, 2)
    m = mask if mask.shape[1:3] == size else resize_mask(mask, size)  # (b, h, w)
    e = jnp.sum(huber(flow.astype(jnp.float32) - g), axis=-1)  # (b, h, w)
    e = jnp.where(m, e, 0.0)  # invalid pixels may hold huge gt values; keep their (unused) terms finite
    s = jax.nn.logsumexp(log_var.astype(jnp.float32), axis=-1)  # (b, h, w)
    nll = 0.5 * jnp.exp(-s) * e + s + LOG_2PI  # (b, h, w)
    count = jnp.sum(m)
    return jnp.where(count > 0, jnp.sum(jnp.where(m, nll, 0.0)) / jnp.maximum(count, 1), 0.0)


def multiscale_flow_loss(levels: Sequence[Level], gt: jax.Array, mask: jax.Array | Sequence[jax.Array]):
    """Sum of `probabilistic_level` over the levels; `mask` one (b, H, W) mask or one per level."""
    masks = mask if isinstance(mask, (list, tuple)) else [mask] * len(levels)
    return sum(probabilistic_level(f, s, gt, m) for (f, s), m in zip(levels, masks, strict=True))


def visibility_mask(f_pr: jax.Array, warped_rt: jax.Array, gt_level: jax.Array, a1=ALPHA_1, a2=ALPHA_2):
    """Not occluded (b, h, w): |f_PR + W(f_RT) - g|^2 <= a1 (|f_PR|^2 + |W(f_RT)|^2 + |g|^2) + a2."""
    f_pr, warped_rt = jax.lax.stop_gradient(f_pr), jax.lax.stop_gradient(warped_rt)

    def sq(x):
        return jnp.sum(x * x, axis=-1)

    thresh = a1 * (sq(f_pr) + sq(warped_rt) + sq(gt_level)) + a2
    return ~(sq(f_pr + warped_rt - gt_level) > thresh)


def wbipath_loss(
    prime_ref: Sequence[Level],
    ref_trg: Sequence[Level],
    gt: jax.Array,
    mask_prime: jax.Array,
    *,
    visibility: bool,
    alpha_1: float = ALPHA_1,
    alpha_2: float = ALPHA_2,
) -> jax.Array:
    """W-bipath NLL (scalar) of the prime -> reference and reference -> target levels against the synthetic
    prime -> target flow `gt` (b, H, W, 2) and its mask (b, H, W)."""
    big_h, big_w = gt.shape[1:3]
    composed, masks = [], []
    for (f_pr, s_pr), (f_rt, s_rt) in zip(prime_ref, ref_trg, strict=True):
        h, w = f_pr.shape[1:3]
        f_w = jax.lax.stop_gradient(f_pr) * np.array([w / big_w, h / big_h], np.float32)  # (b, h, w, 2)
        warped_rt, _ = warp(f_rt, f_w)  # (b, h, w, 2)
        warped_s, _ = warp(s_rt, f_w)  # (b, h, w, 1)
        composed.append((f_pr + warped_rt, jnp.concatenate([s_pr, warped_s], axis=-1)))
        m = _border_mask(f_w) & resize_mask(mask_prime, (h, w))
        if visibility:
            g_l = resize_bilinear(gt.astype(jnp.float32), (h, w))
            m = m & visibility_mask(f_pr, warped_rt, g_l, alpha_1, alpha_2)
        masks.append(m)
    return multiscale_flow_loss(composed, gt, masks)


def loss_weights(loss_ss: jax.Array, loss_us: jax.Array, *, quirk: bool = False, ratio: float = 1.0):
    """(w_ss, w_us), no gradient. DenseMatching: the smaller loss is scaled to the larger one (times
    `ratio` = warp_supervision / w_bipath weight). quirk=True: refign's call, ratio 0 and a clamp at 100."""
    ss, us = jax.lax.stop_gradient(loss_ss), jax.lax.stop_gradient(loss_us)
    un_larger = us > ss
    if quirk:
        s_l = jnp.minimum(us / jnp.maximum(ss, 1e-8) * 0.0, 100.0)
        u_l = jnp.minimum(ss / jnp.maximum(us, 1e-8) / 0.0, 100.0)
    else:
        s_l = us / (ss + 1e-8) * ratio
        u_l = ss / (us + 1e-8) / ratio
    return jnp.where(un_larger, s_l, 1.0), jnp.where(un_larger, 1.0, u_l)
