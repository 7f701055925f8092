"""UAWarpC's synthetic training warps and image-prime augmentation, on the device (refign.md 3.8;
refign data_modules/transforms.py, after DenseMatching). Batched and jittable; every random choice is drawn
per sample from a key.

Conventions: NHWC; a *mapping* (b, h, w, 2) holds, for each pixel of the prime image, the (x, y) position
of its match in the target in [-1, 1] with align_corners=True (-1 and 1 are the first and last pixel
centres); the *flow* is that mapping in pixels minus the pixel grid (`mapping_to_flow`), so that
image_prime = warp(target, flow), i.e. prime(p) = target(p + flow(p)).

- `homography_mapping`: the four corners (+-1, +-1) move by U(-t, t) each (8 draws, x then y), 8-point DLT
  with h33 = 1, applied to the linspace(-1, 1) grid.
- `tps_mapping`: 3x3 control points P on {-1, 0, 1}^2 moved by U(-t, t) (18 draws), thin-plate spline with
  U(r) = r^2 ln r^2 (r^2 := 1 at 0) interpolating P -> Q.
- `affine_mapping`: A = R(a) R(s)^T diag(l, l) R(s) with a, s ~ U(-alpha, alpha), l = 1 + U(-s, s),
  t ~ U(-t, t), on `F.affine_grid(align_corners=False)`'s grid ((2j + 1)/W - 1: the *other* convention).
- `afftps_mapping`: the affine grid, out-of-range points pushed to -1e10, sampled (bilinear, zeros,
  align_corners=True) at a TPS grid; where the TPS grid leaves (-1, 1), -1e10 again.
- `elastic_flow`: stage 2's composition: a Gaussian-blurred (OpenCV's automatic kernel size, reflect-101
  border) uniform noise displacement, masked by 5..13 Gaussian bumps, applied to the mapping in pixels.
- `synthetic_flows`: CompositeFlow: one family per sample chosen uniformly, optional elastic composition.
- `warp_prime`: image_prime = warp(image, flow) with warp's strict mask, or the inclusive border mask when
  that has < 10 % valid pixels.
- `prime_photometric`: torchvision ColorJitter(0.6, 0.6, 0.6, 0) in random order on uint8 (each op
  truncating back to uint8), a random channel permutation, Gaussian blur (p 0.2, kernel 7, sigma
  U(0.2, 2)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lqseg_jax.models.uawarpc import mapping_to_flow, warp

HI = jax.lax.Precision.HIGHEST
OUT_OF_RANGE = 1e10
FAMILIES = ("hom", "tps", "afftps")


@dataclasses.dataclass(frozen=True)
class WarpSpec:
    """CompositeFlow's constants (uawarpc_stage{1,2}.yaml). `stage(1)` / `stage(2)` give the originals."""

    t_hom: float = 0.333
    t_tps: float = 0.333
    t_afftps: float = 0.08
    alpha: float = 0.26  # affine rotation and shear, radians
    scale: float = 0.45  # affine zoom 1 + U(-s, s), aspect preserved
    tx: float = 0.25
    ty: float = 0.25
    elastic: bool = False
    sigma_mask: tuple[int, int] = (10, 40)  # elastic bump sigmas, px (randint, inclusive)
    perturbations: tuple[int, int] = (5, 13)  # elastic bump count (randint, inclusive)
    min_fraction_valid: float = 0.1

    @classmethod
    def stage(cls, stage: int, **overrides) -> WarpSpec:
        if stage not in (1, 2):
            raise ValueError(f"UAWarpC stage must be 1 or 2, got {stage!r}")
        base = {} if stage == 1 else dict(t_hom=0.4, t_tps=0.4, t_afftps=0.26, elastic=True)
        return cls(**{**base, **overrides})


def _grid(h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """linspace(-1, 1) grids (h, w): x along columns, y along rows (pixel centres at exactly +-1)."""
    gx = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, w, dtype=jnp.float32)[None, :], (h, w))
    gy = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, h, dtype=jnp.float32)[:, None], (h, w))
    return gx, gy


def _uniform(key: jax.Array, shape, t: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -t, t)


# ------------------------------------------------------------------------------------------------ homography
CORNERS_X = np.array([-1.0, -1.0, 1.0, 1.0], np.float32)
CORNERS_Y = np.array([-1.0, 1.0, -1.0, 1.0], np.float32)


def homography_from_corners(xp: jax.Array, yp: jax.Array) -> jax.Array:
    """The 3x3 homography (h33 = 1) taking the corners (CORNERS_X, CORNERS_Y) to (xp, yp) (4,) each."""
    x, y = jnp.asarray(CORNERS_X), jnp.asarray(CORNERS_Y)
    z, o = jnp.zeros(4), jnp.ones(4)
    rows_x = jnp.stack([x, y, o, z, z, z, -x * xp, -y * xp], -1)  # (4, 8)
    rows_y = jnp.stack([z, z, z, x, y, o, -x * yp, -y * yp], -1)  # (4, 8)
    a = jnp.concatenate([rows_x, rows_y], 0)  # (8, 8)
    h = jnp.linalg.solve(a, jnp.concatenate([xp, yp]))  # (8,)
    return jnp.append(h, 1.0).reshape(3, 3)


def apply_homography(hmat: jax.Array, gx: jax.Array, gy: jax.Array) -> jax.Array:
    k = hmat[2, 0] * gx + hmat[2, 1] * gy + hmat[2, 2]
    xp = (hmat[0, 0] * gx + hmat[0, 1] * gy + hmat[0, 2]) / k
    yp = (hmat[1, 0] * gx + hmat[1, 1] * gy + hmat[1, 2]) / k
    return jnp.stack([xp, yp], -1)  # (h, w, 2)


def homography_mapping(key: jax.Array, h: int, w: int, t: float) -> jax.Array:
    """One sample's homography mapping (h, w, 2)."""
    d = _uniform(key, (8,), t)
    hmat = homography_from_corners(jnp.asarray(CORNERS_X) + d[:4], jnp.asarray(CORNERS_Y) + d[4:])
    return apply_homography(hmat, *_grid(h, w))


# ------------------------------------------------------------------------------------------------------- TPS
TPS_X = np.repeat(np.linspace(-1, 1, 3), 3)  # [-1,-1,-1,0,0,0,1,1,1]
TPS_Y = np.tile(np.linspace(-1, 1, 3), 3)  # [-1,0,1,-1,0,1,-1,0,1]


def _tps_kernel(d2):
    d2 = jnp.where(d2 == 0, 1.0, d2)
    return d2 * jnp.log(d2)


def _tps_l_inverse() -> np.ndarray:
    """L^-1 of the 3x3 control points (12, 12), reg 0, computed in float64."""
    d2 = (TPS_X[:, None] - TPS_X[None]) ** 2 + (TPS_Y[:, None] - TPS_Y[None]) ** 2
    d2 = np.where(d2 == 0, 1.0, d2)
    k = d2 * np.log(d2)  # (9, 9)
    p = np.stack([np.ones(9), TPS_X, TPS_Y], 1)  # (9, 3)
    lmat = np.block([[k, p], [p.T, np.zeros((3, 3))]])  # (12, 12)
    return np.linalg.inv(lmat)


TPS_LI = _tps_l_inverse().astype(np.float32)


def tps_apply(qx: jax.Array, qy: jax.Array, gx: jax.Array, gy: jax.Array) -> jax.Array:
    """The TPS taking the control points (TPS_X, TPS_Y) to (qx, qy) (9,), at the points (gx, gy)."""
    li = jnp.asarray(TPS_LI)
    q = jnp.stack([qx, qy], -1)  # (9, 2)
    wts = jnp.matmul(li[:9, :9], q, precision=HI)  # (9, 2)
    aff = jnp.matmul(li[9:, :9], q, precision=HI)  # (3, 2)
    d2 = (gx[..., None] - jnp.asarray(TPS_X, jnp.float32)) ** 2 + (
        gy[..., None] - jnp.asarray(TPS_Y, jnp.float32)
    ) ** 2
    u = _tps_kernel(d2)  # (..., 9)
    lin = aff[0] + gx[..., None] * aff[1] + gy[..., None] * aff[2]  # (h, w, 2)
    return lin + jnp.einsum("...n,nc->...c", u, wts, precision=HI)  # (..., 2)


def tps_mapping(key: jax.Array, h: int, w: int, t: float) -> jax.Array:
    """One sample's TPS mapping (h, w, 2)."""
    d = _uniform(key, (18,), t)
    return tps_apply(
        jnp.asarray(TPS_X, jnp.float32) + d[:9], jnp.asarray(TPS_Y, jnp.float32) + d[9:], *_grid(h, w)
    )


# ---------------------------------------------------------------------------------------------------- affine
def affine_theta(rot: jax.Array, shear: jax.Array, lam: jax.Array, tx: jax.Array, ty: jax.Array) -> jax.Array:
    """theta (2, 3) = [A | t] with A = R(rot) R(shear)^T diag(lam, lam) R(shear)."""

    def rmat(a):
        c, s = jnp.cos(a), jnp.sin(a)
        return jnp.array([[c, -s], [s, c]])

    a = rmat(rot) @ rmat(shear).T @ jnp.diag(jnp.stack([lam, lam])) @ rmat(shear)
    return jnp.concatenate([a, jnp.stack([tx, ty])[:, None]], 1)


def affine_grid(theta: jax.Array, h: int, w: int) -> jax.Array:
    """F.affine_grid(theta[None], (1, c, h, w), align_corners=False)[0]: (h, w, 2)."""
    bx = (2.0 * jnp.arange(w, dtype=jnp.float32) + 1.0) / w - 1.0
    by = (2.0 * jnp.arange(h, dtype=jnp.float32) + 1.0) / h - 1.0
    gx, gy = jnp.broadcast_to(bx[None], (h, w)), jnp.broadcast_to(by[:, None], (h, w))
    x = theta[0, 0] * gx + theta[0, 1] * gy + theta[0, 2]
    y = theta[1, 0] * gx + theta[1, 1] * gy + theta[1, 2]
    return jnp.stack([x, y], -1)  # (h, w, 2)


def affine_mapping(key: jax.Array, h: int, w: int, spec: WarpSpec) -> jax.Array:
    k = jax.random.split(key, 5)
    theta = affine_theta(
        _uniform(k[0], (), spec.alpha),
        _uniform(k[1], (), spec.alpha),
        1.0 + _uniform(k[2], (), spec.scale),
        _uniform(k[3], (), spec.tx),
        _uniform(k[4], (), spec.ty),
    )
    return affine_grid(theta, h, w)


def _inside(m: jax.Array) -> jax.Array:
    return (m[..., 0] > -1) & (m[..., 0] < 1) & (m[..., 1] > -1) & (m[..., 1] < 1)  # (..., h, w)


def _push_out(m: jax.Array, inside: jax.Array) -> jax.Array:
    keep = inside[..., None].astype(m.dtype)
    return m * keep + (keep - 1.0) * OUT_OF_RANGE


def sample_mapping(field: jax.Array, grid: jax.Array) -> jax.Array:
    """grid_sample(field, grid, bilinear, zeros, align_corners=True) for one (h, w, c) field and a (h, w, 2)
    grid of the same size."""
    flow = mapping_to_flow(grid[None])  # (1, h, w, 2)
    out, _ = warp(field[None], flow)
    return out[0]


def afftps_mapping(key: jax.Array, h: int, w: int, spec: WarpSpec) -> jax.Array:
    """One sample's affine + TPS mapping (h, w, 2)."""
    k_aff, k_tps = jax.random.split(key)
    aff = affine_mapping(k_aff, h, w, spec)
    tps = tps_mapping(k_tps, h, w, spec.t_afftps)
    comp = sample_mapping(_push_out(aff, _inside(aff)), tps)  # (h, w, 2)
    return _push_out(comp, _inside(tps))


# --------------------------------------------------------------------------------------------------- elastic
def _reflect101(p: jax.Array, n: int) -> jax.Array:
    if n == 1:
        return jnp.zeros_like(p)
    period = 2 * (n - 1)
    q = jnp.mod(p, period)
    return jnp.where(q < n, q, period - q)


def gaussian_blur_matrix(sigma: jax.Array, n: int, max_sigma: float) -> jax.Array:
    """(n, n) matrix B with (B @ x) = cv2.GaussianBlur along one axis for a float32 image: kernel size
    round(8 sigma + 1) | 1, normalised, BORDER_REFLECT_101. `max_sigma` bounds sigma (static taps)."""
    r_max = (round(8 * max_sigma + 1) | 1) // 2
    ksize = jnp.bitwise_or(jnp.round(8.0 * sigma + 1.0).astype(jnp.int32), 1)
    radius = ksize // 2
    k = jnp.arange(-r_max, r_max + 1)  # (2R+1,)
    g = jnp.where(jnp.abs(k) <= radius, jnp.exp(-(k.astype(jnp.float32) ** 2) / (2.0 * sigma * sigma)), 0.0)
    g = g / jnp.sum(g)
    i = jnp.arange(n)
    cols = _reflect101(i[:, None] + k[None, :], n)  # (n, 2R+1)
    rows = jnp.broadcast_to(i[:, None], cols.shape)
    return jnp.zeros((n, n), jnp.float32).at[rows, cols].add(jnp.broadcast_to(g, cols.shape))


def elastic_displacement(key: jax.Array, h: int, w: int, spec: WarpSpec) -> jax.Array:
    """RandomElastic's masked displacement (h, w, 2) in pixels for one sample."""
    size = max(h, w)
    s_lo, s_hi = spec.sigma_mask
    if min(h, w) - 6 * s_hi < 0:
        raise ValueError(f"elastic warp: image {h}x{w} is smaller than 6 x sigma_mask max {s_hi}")
    keys = jax.random.split(key, 7)
    n = jax.random.randint(keys[0], (), spec.perturbations[0], spec.perturbations[1] + 1)
    sigma = size * (0.1 + 0.08 * jax.random.uniform(keys[1]))
    alpha = size * (1.0 + jax.random.uniform(keys[2]))
    noise = jax.random.uniform(keys[3], (2, h, w), jnp.float32, -1.0, 1.0)
    bh = gaussian_blur_matrix(sigma, h, size * 0.18)
    bw = gaussian_blur_matrix(sigma, w, size * 0.18)
    d = jnp.einsum("ij,cjk,lk->cil", bh, noise, bw, precision=HI) * alpha  # (2, h, w)

    m = spec.perturbations[1]
    sig = jax.random.randint(keys[4], (m,), s_lo, s_hi + 1).astype(jnp.float32)  # (m,)
    u = jax.random.uniform(keys[5], (m, 2))
    # randint(3 sigma, size - 3 sigma) inclusive; x indexes rows (shape[0]), y columns, as the original
    cx = jnp.floor(3 * sig + u[:, 0] * (w - 6 * sig + 1))  # (m,) the original draws x on shape[1]
    cy = jnp.floor(3 * sig + u[:, 1] * (h - 6 * sig + 1))
    rows = jnp.arange(h, dtype=jnp.float32)
    cols = jnp.arange(w, dtype=jnp.float32)
    g_r = jnp.exp(-((rows[None] - cx[:, None]) ** 2) / (2 * sig[:, None] ** 2))  # (m, h)
    g_c = jnp.exp(-((cols[None] - cy[:, None]) ** 2) / (2 * sig[:, None] ** 2))  # (m, w)
    bump = g_r[:, :, None] * g_c[:, None, :]  # (m, h, w)
    bump = jnp.clip(2.0 * bump / jnp.max(bump, axis=(1, 2), keepdims=True), 0.0, 1.0)
    active = (jnp.arange(m) < n).astype(jnp.float32)[:, None, None]
    mask = jnp.clip(jnp.sum(bump * active, axis=0), 0.0, 1.0)  # (h, w)
    return jnp.moveaxis(d, 0, -1) * mask[..., None]  # (h, w, 2)


def elastic_flow(key: jax.Array, flow: jax.Array, spec: WarpSpec) -> jax.Array:
    """Stage 2: mapping (pixels) = flow + grid, warped by the masked elastic displacement (bilinear, zeros
    outside), minus the grid. flow (h, w, 2) -> (h, w, 2)."""
    h, w, _ = flow.shape
    grid = jnp.stack(jnp.meshgrid(jnp.arange(w, dtype=jnp.float32), jnp.arange(h, dtype=jnp.float32)), -1)
    mapping = flow + grid  # (h, w, 2)
    out, _ = warp(mapping[None], elastic_displacement(key, h, w, spec)[None])
    return out[0] - grid


# ------------------------------------------------------------------------------------------------- composite
def synthetic_flow(key: jax.Array, h: int, w: int, spec: WarpSpec) -> jax.Array:
    """CompositeFlow for one sample: flow (h, w, 2) prime -> target in pixels."""
    k_choice, k_hom, k_tps, k_aff, k_el = jax.random.split(key, 5)
    choice = jax.random.randint(k_choice, (), 0, len(FAMILIES))
    mapping = jax.lax.switch(
        choice,
        [
            lambda: homography_mapping(k_hom, h, w, spec.t_hom),
            lambda: tps_mapping(k_tps, h, w, spec.t_tps),
            lambda: afftps_mapping(k_aff, h, w, spec),
        ],
    )
    flow = mapping_to_flow(mapping[None])[0]  # (h, w, 2)
    if spec.elastic:
        flow = elastic_flow(k_el, flow, spec)
    return flow


def synthetic_flows(key: jax.Array, b: int, h: int, w: int, spec: WarpSpec) -> jax.Array:
    """(b, h, w, 2): sample i from fold_in(key, i)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
    return jax.vmap(lambda k: synthetic_flow(k, h, w, spec))(keys)


def border_mask(flow: jax.Array) -> jax.Array:
    """get_gt_correspondence_mask: 0 <= X + u <= W - 1 and 0 <= Y + v <= H - 1 (inclusive). (b, h, w)."""
    _, h, w, _ = flow.shape
    x = jnp.arange(w, dtype=jnp.float32) + flow[..., 0]
    y = jnp.arange(h, dtype=jnp.float32)[:, None] + flow[..., 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def warp_prime(image: jax.Array, flow: jax.Array, min_fraction_valid: float = 0.1):
    """image_prime = warp(image, flow) per sample (b, H, W, c) fp32, and its mask (b, H, W): warp's strict
    mask, or the inclusive border mask where that one covers < min_fraction_valid of the pixels."""

    def one(x, f):
        out, mask = warp(x[None], f[None])
        border = border_mask(f[None])[0]
        few = jnp.sum(border) < border.size * min_fraction_valid
        return out[0], jnp.where(few, border, mask[0])

    return jax.vmap(one)(image, flow)


def center_crop(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torchvision CenterCrop on (b, H, W, ...): top = round((H - h) / 2)."""
    hh, ww = x.shape[1:3]
    h, w = size
    if h > hh or w > ww:
        raise ValueError(f"center_crop: crop {size} is larger than the image {(hh, ww)}")
    top, left = round((hh - h) / 2.0), round((ww - w) / 2.0)
    return x[:, top : top + h, left : left + w]


# ------------------------------------------------------------------------------------------------ photometric
def _to_u8(x: jax.Array) -> jax.Array:
    """torch's `.clamp(0, 255).to(uint8)` (truncation), kept as float."""
    return jnp.trunc(jnp.clip(x, 0.0, 255.0))


def _gray_u8(x: jax.Array) -> jax.Array:
    """torchvision rgb_to_grayscale on uint8: (0.2989 r + 0.587 g + 0.114 b).to(uint8)."""
    return jnp.trunc(0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def adjust_brightness(x, f):
    return _to_u8(f * x)


def adjust_contrast(x, f):
    mean = jnp.mean(_gray_u8(x))
    return _to_u8(f * x + (1.0 - f) * mean)


def adjust_saturation(x, f):
    return _to_u8(f * x + (1.0 - f) * _gray_u8(x))


def gaussian_blur7(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """torchvision gaussian_blur(kernel 7, sigma) of one (h, w, 3) uint8-valued image: reflect padding,
    separable kernel exp(-t^2 / 2 sigma^2) on t = -3..3, rounded back to uint8."""
    t = jnp.arange(-3, 4, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    k = k / jnp.sum(k)
    p = jnp.pad(x, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    h, w, _ = x.shape
    p = sum(k[i] * p[:, i : i + w] for i in range(7))  # (h + 6, w, 3)
    p = sum(k[i] * p[i : i + h] for i in range(7))  # (h, w, 3)
    return jnp.round(p)


def prime_photometric(key: jax.Array, images: jax.Array, strength: float = 0.6, blur_p: float = 0.2):
    """image_prime's augmentation on (b, h, w, 3) uint8 images -> float32 holding uint8 values."""

    def one(k, x):
        k_f, k_o, k_s, k_g, k_b = jax.random.split(k, 5)
        factors = jax.random.uniform(k_f, (3,), jnp.float32, 1.0 - strength, 1.0 + strength)
        order = jax.random.permutation(k_o, 3)
        ops = [adjust_brightness, adjust_contrast, adjust_saturation]
        for j in range(3):
            x = jax.lax.switch(order[j], [lambda y, i=i: ops[i](y, factors[i]) for i in range(3)], x)
        x = x[..., jax.random.permutation(k_s, 3)]
        sigma = jax.random.uniform(k_b, (), jnp.float32, 0.2, 2.0)
        return jnp.where(jax.random.uniform(k_g) < blur_p, gaussian_blur7(x, sigma), x)

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    return jax.vmap(one)(keys, images.astype(jnp.float32))


def make_training_triplet(
    key: jax.Array, image: jax.Array, reference: jax.Array, spec: WarpSpec, crop: tuple[int, int], mean, std
) -> dict[str, jax.Array]:
    """The device half of refign's MegaDepth pipeline: from uint8 target `image` and `reference` (b, S, S, 3),
    image_prime = warp(normalise(photometric(image)), flow), then the centre crop of every map. Returns
    normalised image_trg, image_ref, image_prime (b, h, w, 3) fp32, flow_prime (b, h, w, 2), mask_prime
    (b, h, w) bool."""
    if image.shape != reference.shape or image.ndim != 4:
        raise ValueError(
            f"image and reference must be (b, S, S, 3) of one shape, got {image.shape}, {reference.shape}"
        )
    b, hh, ww, _ = image.shape
    k_flow, k_photo = jax.random.split(key)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    flow = synthetic_flows(k_flow, b, hh, ww, spec)  # (b, S, S, 2)
    prime = (prime_photometric(k_photo, image) - mean) / std  # (b, S, S, 3)
    prime, mask = warp_prime(prime, flow, spec.min_fraction_valid)
    trg = (image.astype(jnp.float32) - mean) / std
    ref = (reference.astype(jnp.float32) - mean) / std
    return {
        "image_trg": center_crop(trg, crop),
        "image_ref": center_crop(ref, crop),
        "image_prime": center_crop(prime, crop),
        "flow_prime": center_crop(flow, crop),
        "mask_prime": center_crop(mask, crop),
    }
