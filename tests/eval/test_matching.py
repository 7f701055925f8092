"""Matching metrics (eval/matching.py): a hand-computed example, the AUSE oracle property, AUSE against a
torch.quantile re-statement of refign.md 3.10, and the short-side resize / bottom-right padding."""

import numpy as np
import pytest
import torch

from lqseg_jax.eval import matching as mm


def test_hand_computed_aepe_and_pooled_pck():
    h, w = 6, 8
    flow = np.zeros((h, w, 2), np.float32)
    flow[..., 0] = 1.0  # every pixel predicts (+1, 0)
    metrics = mm.MatchingMetrics(with_uncertainty=False)
    # image 1: gt (1, 0) -> EPE 0; gt (1, 4) -> 4; gt (7, 0) -> 6; one point outside (dropped)
    m1 = np.array([[2, 1, 1, 1], [3, 5, 2, 1], [7.4, 2, 0.6, 2], [9, 0, 1, 0]], np.float32)
    # x = 0.6 rounds to 1 for the lookup, but g uses the raw coordinates: (7.4 - 0.6, 0) -> EPE |6.8 - 1| = 5.8
    metrics.update(flow, m1)
    # image 2: one point at x = 2.5 (rounds half to even: 2), gt (3, 0) -> EPE 2
    m2 = np.array([[5.5, 3, 2.5, 3]], np.float32)
    metrics.update(flow, m2)
    # image 3: nothing valid -> not counted
    metrics.update(flow, np.array([[-1, 0, 0, 0]], np.float32))
    out = metrics.compute()
    epe1 = [0.0, 4.0, 5.8]
    assert out["num_images"] == 2 and out["num_correspondences"] == 4
    assert out["AEPE"] == pytest.approx((np.mean(epe1) + 2.0) / 2, rel=1e-6)
    assert out["PCK_1"] == pytest.approx(1 / 4)
    assert out["PCK_3"] == pytest.approx(2 / 4)
    assert out["PCK_5"] == pytest.approx(3 / 4)
    assert out["PCK_10"] == pytest.approx(4 / 4)
    assert "AUSE" not in out


def test_nearest_pixel_lookup_uses_the_target_point():
    flow = np.zeros((4, 4, 2), np.float32)
    flow[2, 3] = (5.0, -1.0)
    metrics = mm.MatchingMetrics(with_uncertainty=False)
    metrics.update(flow, np.array([[3.2, 1.0, 2.6, 1.6]], np.float32))  # target rounds to (x 3, y 2)
    assert metrics.compute()["AEPE"] == pytest.approx(np.hypot(0.6 - 5.0, -0.6 + 1.0), rel=1e-6)


def test_ause_of_the_oracle_ordering_is_zero_and_a_bad_ordering_is_not():
    rng = np.random.default_rng(0)
    epe = rng.gamma(2.0, 2.0, 500).astype(np.float32)
    assert mm.ause(epe, epe) == pytest.approx(0.0, abs=1e-9)
    assert mm.ause(epe, -epe) > 0.2


def _torch_ause(epe, uncert, intervals=50):
    """refign.md 3.10 re-stated with torch.quantile."""
    e = torch.tensor(epe)
    u, true_u = -torch.tensor(uncert), -e
    quants = [t / intervals for t in range(intervals)]
    x = torch.tensor([t / intervals for t in range(intervals + 1)])

    def curve(key):
        vals = [e[key.ge(torch.quantile(key.float(), q))].mean() for q in quants]
        return torch.stack([*vals, torch.tensor(0.0)])

    s, o = curve(u), curve(true_u)
    top = o.max() + 1e-6
    return torch.abs(torch.trapz(s / top, x=x) - torch.trapz(o / top, x=x)).item()


def test_ause_matches_a_torch_quantile_restatement():
    rng = np.random.default_rng(1)
    epe = rng.gamma(1.5, 3.0, 337).astype(np.float32)
    uncert = (epe + rng.normal(0, 3, 337)).astype(np.float32)
    assert mm.ause(epe, uncert) == pytest.approx(_torch_ause(epe, uncert), abs=1e-5)


def test_ause_reads_the_uncertainty_at_the_nearest_target_pixels():
    h, w = 8, 8
    flow = np.zeros((h, w, 2), np.float32)
    pts = np.array(
        [[x + d, y, x, y] for d, (x, y) in zip((0.5, 1.5, 3.0, 0.0), ((0, 0), (1, 1), (2, 2), (3, 3)))]
    )
    uncert = np.zeros((h, w), np.float32)
    for i in range(4):
        uncert[i, i] = -i  # ranks the worst point (EPE 3 at (2, 2)) as most certain
    metrics = mm.MatchingMetrics()
    metrics.update(flow, pts.astype(np.float32), uncert)
    expect = mm.ause(np.array([0.5, 1.5, 3.0, 0.0], np.float32), np.array([0, -1, -2, -3], np.float32))
    assert metrics.compute()["AUSE"] == pytest.approx(expect) and expect > 0


def test_short_side_resize_and_bottom_right_padding():
    assert mm.short_side_size(600, 800, 480) == (480, 640)
    assert mm.short_side_size(1000, 750, 480) == (640, 480)
    assert mm.short_side_size(333, 1000, 480) == (480, 1441)  # int(480 * 1000 / 333)
    img = np.zeros((60, 80, 3), np.uint8)
    ref = np.zeros((90, 60, 3), np.uint8)
    example = {"image": img, "reference": ref, "matches": np.array([[30, 45, 40, 30]], np.float32)}
    trg, src, m = mm.prepare_pair(example, 48, (0, 0, 0), (1, 1, 1))
    # target 60x80 -> 48x64, reference 90x60 -> 72x48; both padded to 72x64
    assert trg.shape == src.shape == (72, 64, 3)
    np.testing.assert_allclose(m, [[30 * 48 / 60, 45 * 72 / 90, 40 * 64 / 80, 30 * 48 / 60]], rtol=1e-6)
    assert (
        mm.pad_bottom_right(np.ones((2, 3, 1)), 4, 4)[:2, :3].all()
        and not mm.pad_bottom_right(np.ones((2, 3, 1)), 4, 4)[2:].any()
    )


def test_table_lists_every_metric():
    out = {"AEPE": 1.5, "PCK_1": 0.1, "PCK_3": 0.3, "PCK_5": 0.5, "PCK_10": 0.9, "AUSE": 0.02, "num_images": 3,
           "num_correspondences": 30}  # fmt: skip
    table = mm.format_table(out, "t")
    for word in ("AEPE", "PCK-1", "PCK-3", "PCK-5", "PCK-10", "AUSE", "50.00"):
        assert word in table
