"""UAWarpC's synthetic warps (data_pipelines/flow_warps.py) against closed forms and torch re-statements
written from refign.md 3.8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lqseg_jax.data_pipelines import flow_warps as fw
from lqseg_jax.models.uawarpc import warp


def test_homography_maps_the_four_corners_as_drawn():
    key = jax.random.key(3)
    h, w, t = 9, 13, 0.333
    d = np.asarray(fw._uniform(key, (8,), t))
    m = np.asarray(fw.homography_mapping(key, h, w, t))  # (h, w, 2)
    # corners in the original's order: (x, y) = (-1,-1), (-1,1), (1,-1), (1,1); grid corners are exactly +-1
    pixels = [(0, 0), (h - 1, 0), (0, w - 1), (h - 1, w - 1)]
    for i, (r, c) in enumerate(pixels):
        expect = (fw.CORNERS_X[i] + d[i], fw.CORNERS_Y[i] + d[4 + i])
        np.testing.assert_allclose(m[r, c], expect, atol=2e-5)
    # and a projective map: a straight line (the middle row) stays straight
    hmat = np.asarray(fw.homography_from_corners(fw.CORNERS_X + d[:4], fw.CORNERS_Y + d[4:]))
    pts = np.stack([np.linspace(-1, 1, 5), np.full(5, 0.3), np.ones(5)], 0)
    q = hmat @ pts
    np.testing.assert_allclose(
        np.asarray(fw.apply_homography(jnp.asarray(hmat), *map(jnp.asarray, pts[:2]))),
        (q[:2] / q[2]).T,
        atol=1e-5,
    )


def test_tps_interpolates_its_control_points_and_is_affine_when_they_move_affinely():
    key = jax.random.key(0)
    d = np.asarray(fw._uniform(key, (18,), 0.4))
    qx, qy = fw.TPS_X + d[:9], fw.TPS_Y + d[9:]
    out = np.asarray(fw.tps_apply(jnp.asarray(qx, jnp.float32), jnp.asarray(qy, jnp.float32),
                                  jnp.asarray(fw.TPS_X, jnp.float32), jnp.asarray(fw.TPS_Y, jnp.float32)))  # fmt: skip
    np.testing.assert_allclose(out, np.stack([qx, qy], -1), atol=1e-5)
    a = np.array([[1.1, 0.2], [-0.1, 0.9]])
    q = np.stack([fw.TPS_X, fw.TPS_Y], -1) @ a.T + [0.05, -0.02]
    gx, gy = fw._grid(7, 5)
    got = np.asarray(
        fw.tps_apply(jnp.asarray(q[:, 0], jnp.float32), jnp.asarray(q[:, 1], jnp.float32), gx, gy)
    )
    expect = np.stack([np.asarray(gx), np.asarray(gy)], -1) @ a.T + [0.05, -0.02]
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_affine_grid_matches_torch_align_corners_false():
    theta = fw.affine_theta(
        jnp.float32(0.2), jnp.float32(-0.1), jnp.float32(1.3), jnp.float32(0.1), jnp.float32(-0.2)
    )
    ours = np.asarray(fw.affine_grid(theta, 6, 10))
    ref = F.affine_grid(torch.tensor(np.asarray(theta))[None], [1, 3, 6, 10], align_corners=False)[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)

    # A = R(a) R(s)^T diag(l, l) R(s)
    def r(x):
        return np.array([[np.cos(x), -np.sin(x)], [np.sin(x), np.cos(x)]])

    np.testing.assert_allclose(
        np.asarray(theta)[:, :2], r(0.2) @ r(-0.1).T @ np.diag([1.3, 1.3]) @ r(-0.1), atol=1e-6
    )


def test_afftps_composes_as_torch_grid_sample():
    key = jax.random.key(5)
    h, w = 12, 16
    spec = fw.WarpSpec.stage(2)
    ours = np.asarray(jax.jit(lambda k: fw.afftps_mapping(k, h, w, spec))(key))
    k_aff, k_tps = jax.random.split(key)
    aff = torch.tensor(np.asarray(fw.affine_mapping(k_aff, h, w, spec)))[None]  # (1, h, w, 2)
    tps = torch.tensor(np.asarray(fw.tps_mapping(k_tps, h, w, spec.t_afftps)))[None]
    inside = ((aff[..., 0] > -1) & (aff[..., 0] < 1) & (aff[..., 1] > -1) & (aff[..., 1] < 1)).float()[
        ..., None
    ]
    aff = aff * inside + (inside - 1) * 1e10
    comp = F.grid_sample(aff.permute(0, 3, 1, 2), tps, align_corners=True).permute(0, 2, 3, 1)
    inside = ((tps[..., 0] > -1) & (tps[..., 0] < 1) & (tps[..., 1] > -1) & (tps[..., 1] < 1)).float()[
        ..., None
    ]
    ref = (comp * inside + (inside - 1) * 1e10)[0].numpy()
    small = np.abs(ref) < 10
    assert small.mean() > 0.3  # the sample keeps much of the image in view
    np.testing.assert_allclose(ours[small], ref[small], atol=1e-4)
    assert np.all(ours[~small] < -1e3)


def test_warp_by_synthetic_flow_is_exact_on_linear_images_and_round_trips():
    h, w = 24, 32
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = jnp.asarray(np.stack([0.5 * xx + 0.25 * yy + 1.0, -0.3 * xx + 0.7 * yy], -1))[
        None
    ]  # (1, h, w, 2)
    key = jax.random.key(1)
    d = fw._uniform(key, (8,), 0.1)
    hmat = fw.homography_from_corners(jnp.asarray(fw.CORNERS_X) + d[:4], jnp.asarray(fw.CORNERS_Y) + d[4:])
    gx, gy = fw._grid(h, w)
    fwd = fw.mapping_to_flow(fw.apply_homography(hmat, gx, gy)[None])  # (1, h, w, 2)
    out, mask = jax.jit(fw.warp_prime)(image, fwd)
    px, py = xx + np.asarray(fwd[0, ..., 0]), yy + np.asarray(fwd[0, ..., 1])
    expect = np.stack([0.5 * px + 0.25 * py + 1.0, -0.3 * px + 0.7 * py], -1)
    m = np.asarray(mask[0])
    assert m.mean() > 0.5
    np.testing.assert_allclose(np.asarray(out[0])[m], expect[m], atol=1e-3)
    # back: warping by the inverse homography's flow and then by the forward one recovers the image
    back = fw.mapping_to_flow(fw.apply_homography(jnp.linalg.inv(hmat), gx, gy)[None])

    @jax.jit
    def round_trip(image, back, fwd):
        there, m1 = warp(image, back)
        again, m2 = warp(there, fwd)
        return again, m2 & (warp(m1[..., None].astype(jnp.float32), fwd)[0][..., 0] > 0.999)

    again, ok = round_trip(image, back, fwd)
    ok = np.asarray(ok[0])
    assert ok.mean() > 0.3
    np.testing.assert_allclose(np.asarray(again[0])[ok], np.asarray(image[0])[ok], atol=1e-3)


def test_validity_mask_falls_back_to_the_border_mask_below_ten_percent():
    h, w = 8, 20
    image = jnp.ones((2, h, w, 1))
    flow = jnp.zeros((2, h, w, 2)).at[0, ..., 0].set(w - 1.0).at[1, ..., 0].set(1.0)
    _, mask = fw.warp_prime(image, flow)
    mask = np.asarray(mask)
    # sample 0: only column 0 maps inside (inclusive: x + w - 1 <= w - 1), 5 % < 10 %: the border mask
    assert mask[0, :, 0].all() and not mask[0, :, 1:].any()
    # sample 1: warp's strict mask: 0 < x + 1 < w - 1 and 0 < y < h - 1
    expect = np.zeros((h, w), bool)
    expect[1 : h - 1, : w - 2] = True
    np.testing.assert_array_equal(mask[1], expect)


def test_gaussian_blur_matrix_is_opencv_reflect101():
    n, sigma = 11, 1.7
    ksize = round(8 * sigma + 1) | 1
    r = ksize // 2
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    x = np.random.default_rng(0).uniform(-1, 1, n)
    padded = np.pad(x, r, mode="reflect")  # numpy "reflect" = OpenCV BORDER_REFLECT_101 (r < n)
    expect = np.convolve(padded, k, mode="valid")
    got = np.asarray(fw.gaussian_blur_matrix(jnp.float32(sigma), n, 2.0)) @ x
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_elastic_composition_of_a_zero_flow_is_the_masked_displacement():
    spec = fw.WarpSpec.stage(2, sigma_mask=(2, 3), perturbations=(2, 3))
    h = w = 24
    both = jax.jit(
        lambda k: (fw.elastic_flow(k, jnp.zeros((h, w, 2)), spec), fw.elastic_displacement(k, h, w, spec))
    )
    out, disp = (np.asarray(a) for a in both(jax.random.key(2)))
    assert np.abs(disp).max() > 0.5
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = xx + disp[..., 0], yy + disp[..., 1]
    inside = (x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)
    assert inside.mean() > 0.5
    # mapping = grid, sampled bilinearly at grid + d: grid + d (exact on a linear field), minus the grid
    np.testing.assert_allclose(out[inside], disp[inside], atol=1e-3)


def test_synthetic_flows_are_batched_jitted_and_per_sample():
    spec = fw.WarpSpec.stage(1)
    fn = jax.jit(lambda k: fw.synthetic_flows(k, 6, 20, 24, spec))
    a = np.asarray(fn(jax.random.key(0)))
    assert a.shape == (6, 20, 24, 2)
    assert len({round(float(np.abs(x).sum()), 3) for x in a}) == 6
    np.testing.assert_array_equal(a, np.asarray(fn(jax.random.key(0))))
    assert spec.t_hom == 0.333 and fw.WarpSpec.stage(2).t_afftps == 0.26 and fw.WarpSpec.stage(2).elastic


def test_photometric_ops_restated():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 7, 3)).astype(np.float32)
    gray = np.trunc(0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])
    np.testing.assert_array_equal(
        np.asarray(fw.adjust_brightness(jnp.asarray(x), 1.3)), np.trunc(np.clip(1.3 * x, 0, 255))
    )
    np.testing.assert_allclose(
        np.asarray(fw.adjust_contrast(jnp.asarray(x), 0.7)),
        np.trunc(np.clip(0.7 * x + 0.3 * gray.mean(), 0, 255)),
    )
    np.testing.assert_allclose(
        np.asarray(fw.adjust_saturation(jnp.asarray(x), 1.4)),
        np.trunc(np.clip(1.4 * x - 0.4 * gray[..., None], 0, 255)),
    )
    k = np.exp(-0.5 * (np.arange(-3, 4) / 1.1) ** 2)
    k = torch.tensor(k / k.sum(), dtype=torch.float32)
    t = torch.tensor(x).permute(2, 0, 1)[None]
    t = F.pad(t, (3, 3, 3, 3), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, 1, 7).repeat(3, 1, 1, 1), groups=3)
    t = F.conv2d(t, k.view(1, 1, 7, 1).repeat(3, 1, 1, 1), groups=3)
    ref = torch.round(t)[0].permute(1, 2, 0).numpy()
    got = np.asarray(fw.gaussian_blur7(jnp.asarray(x), jnp.float32(1.1)))
    assert np.abs(got - ref).max() <= 1.0 and (got == ref).mean() > 0.95
    out = np.asarray(
        jax.jit(fw.prime_photometric)(jax.random.key(0), jnp.asarray(np.stack([x, x]), jnp.uint8))
    )
    assert out.shape == (2, 5, 7, 3) and out.min() >= 0 and out.max() <= 255 and np.all(out == np.round(out))


def test_training_triplet_crops_every_map_to_the_centre():
    key = jax.random.key(0)
    img = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3)), jnp.uint8)
    with pytest.raises(ValueError, match="larger than the image"):
        fw.center_crop(img, (41, 41))
    triplet = jax.jit(
        lambda k, i: fw.make_training_triplet(k, i, i, fw.WarpSpec.stage(1), (32, 32), (0, 0, 0), (1, 1, 1))
    )
    out = triplet(key, img)
    assert out["image_prime"].shape == (2, 32, 32, 3) and out["mask_prime"].shape == (2, 32, 32)
    np.testing.assert_array_equal(
        np.asarray(out["image_trg"]), np.asarray(img[:, 4:36, 4:36]).astype(np.float32)
    )
