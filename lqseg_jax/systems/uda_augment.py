"""The pure pieces of the DAFormer-style self-training step (refign.md section 7), jittable, NHWC.

- EMA teacher momentum m = min(1 - 1/(t+1), m_max).
- DACS ClassMix: candidate classes from the whole source batch, 255 included when present (refign's
  get_class_masks; `per_image` restricts them to each image's own classes), ceil(n/2) chosen per image.
- The strong augmentation of kornia 0.5.8: ColorJitter(0.2, 0.2, 0.2, 0.2) per image with its own random
  order (brightness additive, contrast multiplicative without mean, HSV saturation, hue x 2 pi) and
  GaussianBlur2d (sigma per image, kernel the largest odd <= ceil(0.1 side), reflect border).
- The pseudo-label confidence weight, the label downscale of the feature distance and a norm whose
  gradient is 0 at 0 (refign.md E6).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IGNORE = 255


# ------------------------------------------------------------------------------------------------ EMA


def ema_momentum(t: jax.Array, max_momentum: float = 0.999) -> jax.Array:
    """min(1 - 1/(t + 1), max_momentum); t = 0 gives 0 (teacher := student)."""
    return jnp.minimum(1.0 - 1.0 / (jnp.asarray(t, jnp.float32) + 1.0), max_momentum)


def ema_update(teacher, student, momentum: jax.Array):
    """m * teacher + (1 - m) * student, leaf by leaf (no gradient flows into the student)."""
    return jax.tree.map(
        lambda t, s: momentum * t + (1.0 - momentum) * jax.lax.stop_gradient(s), teacher, student
    )


# -------------------------------------------------------------------------------------------- ClassMix


def _slots(labels: jax.Array, num_classes: int) -> jax.Array:
    """Train ids 0..K-1 stay, 255 -> slot K."""
    return jnp.where(labels == IGNORE, num_classes, labels).astype(jnp.int32)


def classmix_choice(
    key: jax.Array, labels: jax.Array, num_classes: int, per_image: bool = False
) -> jax.Array:
    """Chosen classes (b, K + 1) bool (slot K = 255) for labels (b, h, w): per image ceil(n/2) of the n
    candidate classes, uniformly without replacement; candidates = classes of the whole batch (refign),
    or of the image itself with per_image."""
    b = labels.shape[0]
    onehot = jax.nn.one_hot(_slots(labels, num_classes), num_classes + 1, dtype=jnp.bool_)  # (b, h, w, K+1)
    present = onehot.any(axis=(1, 2))  # (b, K+1)
    if not per_image:
        present = jnp.broadcast_to(present.any(axis=0), present.shape)  # (b, K+1)
    n = present.sum(axis=-1, keepdims=True)  # (b, 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
    u = jax.vmap(lambda k: jax.random.uniform(k, (num_classes + 1,)))(keys)  # (b, K+1)
    rank = jnp.argsort(jnp.argsort(jnp.where(present, u, 2.0), axis=-1), axis=-1)  # (b, K+1)
    return present & (rank < (n + 1) // 2)


def class_masks(labels: jax.Array, chosen: jax.Array, num_classes: int) -> jax.Array:
    """M (b, h, w) float32: 1 where the pixel's class (255 = slot K) is among the image's chosen ones."""
    return (
        jnp.take_along_axis(chosen, _slots(labels, num_classes).reshape(labels.shape[0], -1), axis=1)
        .reshape(labels.shape)
        .astype(jnp.float32)
    )


# ------------------------------------------------------------------------------------------ colour jitter


def jitter_params(key: jax.Array, batch: int, strength: float = 0.2) -> dict[str, jax.Array]:
    """kornia 0.5.8 ColorJitter(s, s, s, s) parameters, one set per image (refign builds one jitter per
    image): factors (b,) and the order of the four ops (b, 4) (0 brightness, 1 contrast, 2 saturation, 3 hue)."""

    def one(k):
        kb, kc, ks, kh, ko = jax.random.split(k, 5)
        lo = max(1.0 - strength, 0.0)
        return dict(
            brightness=jax.random.uniform(kb, (), minval=lo, maxval=1.0 + strength),
            contrast=jax.random.uniform(kc, (), minval=lo, maxval=1.0 + strength),
            saturation=jax.random.uniform(ks, (), minval=lo, maxval=1.0 + strength),
            hue=jax.random.uniform(kh, (), minval=-strength, maxval=strength),
            order=jax.random.permutation(ko, 4),
        )

    return jax.vmap(one)(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch)))


def rgb_to_hsv(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """kornia 0.5.8 rgb_to_hsv on (..., 3) in [0, 1]: H in [0, 2 pi), S = delta / (V + eps)."""
    maxc = x.max(-1)  # (...)
    minc = x.min(-1)
    delta = maxc - minc
    s = delta / (maxc + eps)
    delta = jnp.where(delta == 0, 1.0, delta)
    rc, gc, bc = jnp.moveaxis(maxc[..., None] - x, -1, 0)
    h = jnp.stack([bc - gc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc], axis=-1)  # (..., 3)
    first_max = jnp.argmax(x == maxc[..., None], axis=-1)  # the first channel holding the max
    h = jnp.take_along_axis(h, first_max[..., None], axis=-1)[..., 0] / delta
    h = jnp.mod(h / 6.0, 1.0)  # torch % (floor mod)
    return jnp.stack([2 * math.pi * h, s, maxc], axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
    """kornia 0.5.8 hsv_to_rgb on (..., 3), H in radians."""
    h, s, v = x[..., 0] / (2 * math.pi), x[..., 1], x[..., 2]
    hi = jnp.mod(jnp.floor(h * 6), 6)
    f = jnp.mod(h * 6, 6) - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = jnp.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], axis=-1)  # (..., 18)
    hi = hi.astype(jnp.int32)
    idx = jnp.stack([hi, hi + 6, hi + 12], axis=-1)  # (..., 3)
    return jnp.take_along_axis(table, idx, axis=-1)


def _adjust(x: jax.Array, op: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """One kornia adjustment (op 0..3) on one image (h, w, 3) in [0, 1]."""

    def brightness(x):
        return jnp.clip(x + (p["brightness"] - 1.0), 0.0, 1.0)

    def contrast(x):
        return jnp.clip(x * p["contrast"], 0.0, 1.0)

    def saturation(x):
        hsv = rgb_to_hsv(x)
        return hsv_to_rgb(hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * p["saturation"], 0.0, 1.0)))

    def hue(x):
        hsv = rgb_to_hsv(x)
        return hsv_to_rgb(hsv.at[..., 0].set(jnp.fmod(hsv[..., 0] + p["hue"] * 2 * math.pi, 2 * math.pi)))

    return jax.lax.switch(op, (brightness, contrast, saturation, hue), x)


def color_jitter(x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """Images (b, h, w, 3) in [0, 1] -> jittered, each image with its own factors and order."""

    def one(img, p):
        for k in range(4):
            img = _adjust(img, p["order"][k], p)  # (h, w, 3)
        return img

    return jax.vmap(one)(x, params)


# ---------------------------------------------------------------------------------------------- blur


def blur_kernel_size(side: int) -> int:
    """refign's rule: the largest odd integer <= ceil(0.1 * side) (51 for 512, 103 for 1024)."""
    c = math.ceil(0.1 * side)
    return math.floor(c - 0.5 + c % 2)


def _gaussian_1d(size: int, sigma: jax.Array) -> jax.Array:
    x = jnp.arange(size, dtype=jnp.float32) - size // 2
    g = jnp.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """kornia 0.5.8 GaussianBlur2d((ky, kx), (sigma, sigma), 'reflect') per image: x (b, h, w, c),
    sigma (b,); kernel sizes from blur_kernel_size of h and w."""
    _, h, w, _ = x.shape
    ky, kx = blur_kernel_size(h), blur_kernel_size(w)
    if ky // 2 >= h or kx // 2 >= w:
        raise ValueError(f"gaussian_blur: image {h}x{w} is too small for reflect padding of kernel {ky}x{kx}")

    def one(img, s):
        c = img.shape[-1]
        img = jnp.pad(img, ((ky // 2, ky // 2), (kx // 2, kx // 2), (0, 0)), mode="reflect")[None]
        kernel = jnp.outer(_gaussian_1d(ky, s), _gaussian_1d(kx, s))  # (ky, kx)
        kernel = jnp.broadcast_to(kernel[:, :, None, None], (ky, kx, 1, c))  # HWIO, depthwise
        out = jax.lax.conv_general_dilated(
            img, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
            precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip
        return out[0]  # (h, w, c)

    return jax.vmap(one)(x, sigma)


def strong_augment(
    x: jax.Array,
    mean,
    std,
    jitter: dict[str, jax.Array],
    sigma: jax.Array,
    do_jitter: jax.Array,
    do_blur: jax.Array,
) -> jax.Array:
    """refign's strong transform on normalised images x (b, h, w, 3) ((v - mean) / std, v in [0, 255]):
    when do_jitter, denormalise to [0, 1], jitter, renormalise; then when do_blur, blur (gates per batch)."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    jittered = (color_jitter((x * std + mean) / 255.0, jitter) * 255.0 - mean) / std  # (b, h, w, 3)
    x = jnp.where(do_jitter, jittered, x)
    return jnp.where(do_blur, gaussian_blur(x, sigma), x)


# ------------------------------------------------------------------------------ pseudo-label weight


def pseudo_weight(probs: jax.Array, threshold: float = 0.968) -> jax.Array:
    """One scalar for the target batch: the share of pixels whose max probability is >= threshold."""
    return jnp.mean((probs.max(-1) >= threshold).astype(jnp.float32))


# ------------------------------------------------------------------------------- feature distance


def downscale_label_ratio(labels: jax.Array, scale: int, min_ratio: float, num_classes: int) -> jax.Array:
    """HRDA's downscale_label_ratio: one-hot (255 -> class K), scale x scale average pooling, argmax;
    255 where the winner is the ignore class or its share is below min_ratio. (b, h, w) -> (b, h/s, w/s)."""
    b, h, w = labels.shape
    hs, ws = h // scale, w // scale
    onehot = jax.nn.one_hot(_slots(labels[:, : hs * scale, : ws * scale], num_classes), num_classes + 1)
    share = onehot.reshape(b, hs, scale, ws, scale, num_classes + 1).mean(axis=(2, 4))  # (b, hs, ws, K+1)
    ratio, out = share.max(-1), jnp.argmax(share, axis=-1)
    return jnp.where((out == num_classes) | (ratio < min_ratio), IGNORE, out)


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean norm whose gradient is 0 (not NaN) where x = 0, as torch.norm's."""
    sq = jnp.sum(x * x, axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def feature_distance(f_student: jax.Array, f_imnet: jax.Array, mask: jax.Array) -> jax.Array:
    """mean over masked positions of ||f_S - f_I||_2 over channels; f (b, h, w, c), mask (b, h, w).
    An empty mask gives 0 (the original's mean of nothing is NaN with zero gradient)."""
    d = safe_norm(f_student.astype(jnp.float32) - jax.lax.stop_gradient(f_imnet).astype(jnp.float32))
    m = mask.astype(jnp.float32)
    return jnp.sum(d * m) / jnp.maximum(jnp.sum(m), 1.0)
