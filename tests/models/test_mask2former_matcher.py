"""Mask2Former matching: on-device Hungarian vs scipy, semantic targets vs numpy, point sampling vs
torch grid_sample, and the full matcher vs transformers' Mask2FormerHungarianMatcher on the same points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa
from transformers.models.mask2former import modeling_mask2former as hf

from lqseg_jax.models.mask2former import hungarian_match, linear_sum_assignment, matcher

solve = jax.jit(jax.vmap(linear_sum_assignment))
sample_shared_points = jax.jit(matcher.sample_shared_points)
sample_slot_points = jax.jit(matcher.sample_slot_points)
sample_target_points = jax.jit(matcher.sample_target_points)
targets_from_semantic = jax.jit(matcher.targets_from_semantic, static_argnums=(1, 2))


def _check_against_scipy(cost, valid, cols, *, unique):
    for c, v, col in zip(cost, valid, cols):
        rows = np.flatnonzero(v)
        assert np.all(col[~v] == -1)
        assert len(set(col[rows].tolist())) == len(rows) and np.all(
            (col[rows] >= 0) & (col[rows] < c.shape[1])
        )
        sub = np.where(np.isfinite(c[rows]), c[rows], np.inf)
        r, ref_cols = scipy_lsa(sub)
        np.testing.assert_allclose(c[rows, col[rows]].sum(), sub[r, ref_cols].sum(), rtol=1e-5, atol=1e-5)
        if unique:
            np.testing.assert_array_equal(col[rows], ref_cols)


@pytest.mark.parametrize("n,m", [(1, 1), (7, 7), (12, 40), (30, 100)])
def test_hungarian_matches_scipy_on_random_costs(n, m):
    rng = np.random.default_rng(n * 1000 + m)
    cost = rng.normal(size=(8, n, m)).astype(np.float32)
    valid = rng.random((8, n)) < 0.7  # padded target slots
    valid[0] = True
    valid[1] = False
    cols = np.asarray(solve(cost, valid))
    _check_against_scipy(cost, valid, cols, unique=True)  # continuous costs: the optimum is unique


def test_hungarian_optimal_with_ties():
    rng = np.random.default_rng(1)
    cost = rng.integers(0, 3, size=(8, 12, 40)).astype(np.float32)  # many equal-cost optima
    valid = rng.random((8, 12)) < 0.8
    _check_against_scipy(cost, valid, np.asarray(solve(cost, valid)), unique=False)
    equal = np.ones((8, 7, 7), np.float32)  # every assignment optimal
    cols = np.asarray(solve(equal, np.ones((8, 7), bool)))
    assert all(sorted(c) == list(range(7)) for c in cols)


def test_hungarian_avoids_non_finite_costs():
    rng = np.random.default_rng(2)
    cost = rng.normal(size=(8, 12, 40)).astype(np.float32)
    cost[:, :, :20] = np.inf  # forbidden, but a finite assignment exists
    cost[:, 0, 20] = np.nan
    cost[:, 1, 21] = -np.inf
    valid = np.ones((8, 12), bool)
    cols = np.asarray(solve(cost, valid))
    assert np.all(np.isfinite(np.take_along_axis(cost, cols[..., None], -1)))
    _check_against_scipy(cost, valid, cols, unique=True)


def test_hungarian_rejects_more_rows_than_columns():
    with pytest.raises(ValueError, match=r"rows <= columns.*\(5, 4\)"):
        linear_sum_assignment(jnp.zeros((5, 4)))


def test_targets_from_semantic_matches_numpy_unique():
    rng = np.random.default_rng(3)
    labels = rng.choice([0, 2, 3, 7, 255], size=(3, 20, 17)).astype(np.int32)
    labels[1] = np.where(labels[1] == 3, 255, labels[1])  # class 3 absent from image 1
    labels[2] = 255  # only ignore
    t = targets_from_semantic(jnp.asarray(labels), 8, 5)
    masks = np.asarray(t.masks())
    for i in range(3):
        present = [c for c in np.unique(labels[i]) if c != 255]
        n = len(present)
        assert np.asarray(t.valid[i]).tolist() == [True] * n + [False] * (5 - n)
        np.testing.assert_array_equal(np.asarray(t.classes[i])[:n], present)
        np.testing.assert_array_equal(np.asarray(t.classes[i])[n:], 8)
        for j, c in enumerate(present):
            np.testing.assert_array_equal(masks[i, j], labels[i] == c)
        assert not masks[i, n:].any()
    assert np.asarray(t.num_dropped).tolist() == [0, 0, 0]


def test_targets_beyond_max_targets_are_counted():
    labels = np.arange(6 * 4, dtype=np.int32).reshape(1, 6, 4) % 9  # classes 0..8 present
    t = targets_from_semantic(jnp.asarray(labels), 10, 4)
    np.testing.assert_array_equal(np.asarray(t.classes[0]), [0, 1, 2, 3])
    assert int(t.num_dropped[0]) == 5


def _grid_sample(x_nchw: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """detectron2 point_sample: (n, c, h, w) at (n, p, 2) in [0, 1] -> (n, c, p)."""
    grid = torch.from_numpy(np.array(2.0 * coords - 1.0))[:, :, None]  # (n, p, 1, 2)
    return F.grid_sample(torch.from_numpy(np.array(x_nchw)), grid, align_corners=False)[..., 0].numpy()


def _points(rng, shape):
    pts = rng.random(shape).astype(np.float32)
    pts.reshape(-1, 2)[:4] = [[0.0, 0.0], [1.0, 1.0], [0.01, 0.99], [0.999, 0.5]]  # border taps
    return pts


def test_point_sampling_matches_grid_sample():
    rng = np.random.default_rng(4)
    b, h, w, q, t, p = 2, 9, 7, 5, 3, 40
    masks = rng.normal(size=(b, h, w, q)).astype(np.float32)
    shared = _points(rng, (b, p, 2))
    ref = _grid_sample(masks.transpose(0, 3, 1, 2), shared)  # (b, q, p)
    np.testing.assert_allclose(
        np.asarray(sample_shared_points(jnp.asarray(masks), jnp.asarray(shared))), ref, atol=1e-5
    )

    slot = _points(rng, (b, t, p, 2))
    ref = np.stack(
        [_grid_sample(masks[i, ..., :t].transpose(2, 0, 1)[:, None], slot[i])[:, 0] for i in range(b)]
    )
    np.testing.assert_allclose(
        np.asarray(sample_slot_points(jnp.asarray(masks[..., :t]), jnp.asarray(slot))), ref, atol=1e-5
    )

    labels = rng.choice([0, 1, 4, 255], size=(b, 2 * h, 2 * w)).astype(np.int32)
    targets = targets_from_semantic(jnp.asarray(labels), 5, t)
    tm = np.asarray(targets.masks())  # (b, t, H, W)
    ref = np.stack([_grid_sample(tm[i][:, None], slot[i])[:, 0] for i in range(b)])
    np.testing.assert_allclose(np.asarray(sample_target_points(targets, jnp.asarray(slot))), ref, atol=1e-5)
    ref = np.stack([_grid_sample(tm[i][None], shared[i][None])[0] for i in range(b)])  # (b, t, p)
    np.testing.assert_allclose(
        np.asarray(sample_target_points(targets, jnp.asarray(shared[:, None]))), ref, atol=1e-5
    )


def test_matcher_matches_transformers_on_same_points(monkeypatch):
    rng = np.random.default_rng(5)
    b, q, k, h, w, p = 3, 10, 6, 12, 10, 200
    logits = rng.normal(size=(b, q, k + 1)).astype(np.float32) * 2
    masks = rng.normal(size=(b, h, w, q)).astype(np.float32) * 3
    labels = rng.choice([0, 1, 3, 5, 255], size=(b, 4 * h, 4 * w)).astype(np.int32)
    labels[1][labels[1] == 1] = 3
    coords = rng.random((b, p, 2)).astype(np.float32)
    targets = targets_from_semantic(jnp.asarray(labels), k, 6)
    ours = np.asarray(
        jax.jit(hungarian_match)(jnp.asarray(logits), jnp.asarray(masks), targets, jnp.asarray(coords))
    )

    queue = [torch.from_numpy(coords[i][None]) for i in range(b)]
    monkeypatch.setattr(torch, "rand", lambda *size, **kw: queue.pop(0))
    matcher = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=p)
    classes = [np.array([c for c in np.unique(lab) if c != 255]) for lab in labels]
    indices = matcher(
        torch.from_numpy(masks.transpose(0, 3, 1, 2)),
        torch.from_numpy(logits),
        [
            torch.from_numpy((lab[None] == c[:, None, None]).astype(np.float32))
            for lab, c in zip(labels, classes)
        ],
        [torch.from_numpy(c) for c in classes],
    )
    assert not queue
    valid = np.asarray(targets.valid)
    for i, (rows, cols) in enumerate(indices):
        expected = {(int(r), int(c)) for r, c in zip(rows, cols)}
        got = {(int(ours[i, t]), t) for t in np.flatnonzero(valid[i])}
        assert got == expected
        assert np.all(ours[i, ~valid[i]] == -1)
