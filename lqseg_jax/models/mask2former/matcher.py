"""Jittable, batched Hungarian matching of Mask2Former predictions to semantic targets.

Targets come from a semantic label map: one binary mask per class present (values outside
[0, num_classes), i.e. the ignore label 255, belong to no mask), in ascending class order, padded to a
static `max_targets` slots with a validity flag. Masks stay implicit (mask t = labels == classes[t]) and
are only evaluated at sampled points, as detectron2's point_sample would read the materialised masks.

Costs as mask2former/modeling/matcher.py: class -p(class), sigmoid BCE and dice on `num_points`
uniform points shared by predictions and targets of an image. The assignment is solved exactly on
device by the shortest-augmenting-path Hungarian algorithm (Jonker-Volgenant style, O(n^2 m)).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .common import bilinear_taps

HIGHEST = jax.lax.Precision.HIGHEST


class SemanticTargets(NamedTuple):
    classes: jax.Array  # (b, T) int32: class of each target slot (num_classes in empty slots)
    valid: jax.Array  # (b, T) bool: the slot holds a class present in the image
    labels: jax.Array  # (b, H, W) int32: the label map the masks are read from
    num_dropped: jax.Array  # (b,) int32: classes present beyond the T slots (not supervised)

    def masks(self) -> jax.Array:
        """The binary target masks (b, T, H, W) float32 (all zero in empty slots)."""
        m = self.labels[:, None] == self.classes[:, :, None, None]  # (b, T, H, W)
        return (m & self.valid[:, :, None, None]).astype(jnp.float32)


def targets_from_semantic(labels: jax.Array, num_classes: int, max_targets: int) -> SemanticTargets:
    """labels (b, H, W) int -> one target per class present, in ascending class order, padded to max_targets."""
    if labels.ndim != 3 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer (b, H, W) map, got {labels.dtype} {tuple(labels.shape)}")
    b = labels.shape[0]
    labels = labels.astype(jnp.int32)
    flat = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes).reshape(b, -1)  # (b, H*W)
    counts = jax.vmap(lambda x: jnp.bincount(x, length=num_classes + 1))(flat)[:, :num_classes]  # (b, K)
    present = counts > 0  # (b, K)
    order = jnp.argsort(~present, axis=-1, stable=True)[:, :max_targets]  # (b, min(T, K)) present first
    valid = jnp.take_along_axis(present, order, axis=-1)  # (b, min(T, K))
    pad = max_targets - order.shape[1]  # more slots than classes: the extra ones stay empty
    order = jnp.pad(order, ((0, 0), (0, pad)))  # (b, T)
    valid = jnp.pad(valid, ((0, 0), (0, pad)))  # (b, T)
    classes = jnp.where(valid, order, num_classes).astype(jnp.int32)  # (b, T)
    num_dropped = jnp.maximum(present.sum(-1) - max_targets, 0).astype(jnp.int32)  # (b,)
    return SemanticTargets(classes, valid, labels, num_dropped)


def sample_shared_points(masks: jax.Array, coords: jax.Array) -> jax.Array:
    """masks (b, h, w, q) at per-image points coords (b, p, 2) -> (b, q, p) (bilinear, zero padding)."""
    b, h, w, q = masks.shape
    p = coords.shape[1]
    index, weights = bilinear_taps(coords, h, w)  # (b, p, 4)
    taps = jnp.take_along_axis(masks.reshape(b, h * w, q), index.reshape(b, p * 4, 1), axis=1)  # (b, p*4, q)
    return jnp.einsum("bpk,bpkq->bqp", weights, taps.reshape(b, p, 4, q), precision=HIGHEST)  # (b, q, p)


def sample_slot_points(masks: jax.Array, coords: jax.Array) -> jax.Array:
    """masks (b, h, w, t) at per-slot points coords (b, t, p, 2) -> (b, t, p) (bilinear, zero padding)."""
    b, h, w, t = masks.shape
    p = coords.shape[2]
    index, weights = bilinear_taps(coords, h, w)  # (b, t, p, 4)
    flat = masks.reshape(b, h * w, t).transpose(0, 2, 1)  # (b, t, h*w)
    taps = jnp.take_along_axis(flat, index.reshape(b, t, p * 4), axis=-1).reshape(b, t, p, 4)  # (b, t, p, 4)
    return jnp.sum(taps * weights, axis=-1)  # (b, t, p)


def sample_target_points(targets: SemanticTargets, coords: jax.Array) -> jax.Array:
    """The implicit target masks at points coords (b, t or 1, p, 2) -> (b, t, p) in [0, 1]."""
    b, hh, ww = targets.labels.shape
    index, weights = bilinear_taps(coords, hh, ww)  # (b, t|1, p, 4)
    flat = targets.labels.reshape(b, hh * ww)
    taps = jnp.take_along_axis(flat, index.reshape(b, -1), axis=-1).reshape(index.shape)  # (b, t|1, p, 4)
    same = taps == targets.classes[:, :, None, None]  # (b, t, p, 4)
    return jnp.sum(jnp.where(same, weights, 0.0), axis=-1)  # (b, t, p)


def matching_cost(
    pred_logits: jax.Array,
    pred_masks: jax.Array,
    targets: SemanticTargets,
    coords: jax.Array,
    *,
    cost_class: float,
    cost_mask: float,
    cost_dice: float,
) -> jax.Array:
    """Pairwise costs (b, q, T) on shared points coords (b, p, 2); float32."""
    prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)  # (b, q, K+1)
    c_class = -jnp.take_along_axis(prob, targets.classes[:, None, :], axis=-1)  # (b, q, T)
    out = sample_shared_points(pred_masks.astype(jnp.float32), coords)  # (b, q, p)
    tgt = sample_target_points(targets, coords[:, None])  # (b, T, p)
    p = coords.shape[1]
    pos = jax.nn.softplus(-out)  # BCE against 1, (b, q, p)
    neg = jax.nn.softplus(out)  # BCE against 0, (b, q, p)
    c_mask = (
        jnp.einsum("bqp,btp->bqt", pos, tgt, precision=HIGHEST)
        + jnp.einsum("bqp,btp->bqt", neg, 1.0 - tgt, precision=HIGHEST)
    ) / p  # (b, q, T)
    sig = jax.nn.sigmoid(out)  # (b, q, p)
    numerator = 2.0 * jnp.einsum("bqp,btp->bqt", sig, tgt, precision=HIGHEST)  # (b, q, T)
    denominator = sig.sum(-1)[:, :, None] + tgt.sum(-1)[:, None, :]  # (b, q, T)
    c_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)  # (b, q, T)
    return cost_mask * c_mask + cost_class * c_class + cost_dice * c_dice


def linear_sum_assignment(cost: jax.Array, row_valid: jax.Array | None = None) -> jax.Array:
    """Exact minimum-cost assignment of every valid row of cost (n, m), n <= m, to a distinct column.

    Shortest augmenting paths with dual potentials (the e-maxx / Jonker-Volgenant Hungarian algorithm),
    one row at a time, as lax loops; invalid rows are skipped and take no column. Non-finite costs (NaN,
    inf) are replaced by a finite value large enough that an assignment uses one only when it must.
    Returns the column of each row (n,) int32, -1 for invalid rows. vmap it for batches.
    """
    n, m = cost.shape
    if n > m:
        raise ValueError(f"linear_sum_assignment needs rows <= columns, got cost of shape {(n, m)}")
    if row_valid is None:
        row_valid = jnp.ones((n,), bool)
    cost = cost.astype(jnp.float32)
    finite = jnp.isfinite(cost)
    hi = jnp.max(jnp.where(finite, cost, -jnp.inf), initial=0.0)
    lo = jnp.min(jnp.where(finite, cost, jnp.inf), initial=0.0)
    cost = jnp.where(finite, cost, hi + n * (hi - lo) + 1.0)  # exceeds any all-finite assignment
    c = jnp.pad(cost, ((1, 0), (1, 0)))  # (n+1, m+1): 1-based rows/columns, column 0 is the path root
    inf = jnp.float32(jnp.inf)

    def add_row(i, state):
        u, v, p, way = state  # (n+1,), (m+1,), (m+1,) row of each column (0 = free), (m+1,)
        valid = row_valid[i - 1]
        p = p.at[0].set(i)

        def dijkstra_step(s):
            u, v, p, way, minv, used, j0, _ = s
            used = used.at[j0].set(True)
            i0 = p[j0]
            cur = c[i0] - u[i0] - v  # (m+1,) reduced costs from row i0
            better = ~used & (cur < minv)
            minv = jnp.where(better, cur, minv)
            way = jnp.where(better, j0, way)
            free = jnp.where(used, inf, minv)
            j1 = jnp.argmin(free)
            delta = free[j1]
            u = u.at[p].add(jnp.where(used, delta, 0.0))
            v = v - jnp.where(used, delta, 0.0)
            minv = jnp.where(used, minv, minv - delta)
            return u, v, p, way, minv, used, j1, p[j1] == 0

        init = (u, v, p, way, jnp.full((m + 1,), inf), jnp.zeros((m + 1,), bool), jnp.int32(0), ~valid)
        u, v, p, way, _, _, j0, _ = jax.lax.while_loop(lambda s: ~s[-1], dijkstra_step, init)

        def augment(s):
            p, j0 = s
            j1 = way[j0]
            return p.at[j0].set(p[j1]), j1

        p, _ = jax.lax.while_loop(lambda s: s[1] != 0, augment, (p, jnp.where(valid, j0, 0)))
        return u, v, p, way

    state = (
        jnp.zeros((n + 1,), jnp.float32),
        jnp.zeros((m + 1,), jnp.float32),
        jnp.zeros((m + 1,), jnp.int32),
        jnp.zeros((m + 1,), jnp.int32),
    )
    _, _, p, _ = jax.lax.fori_loop(1, n + 1, add_row, state)
    col_of_row = jnp.full((n + 1,), -1, jnp.int32).at[p[1:]].set(jnp.arange(m, dtype=jnp.int32))  # (n+1,)
    return jnp.where(row_valid, col_of_row[1:], -1)


def hungarian_match(
    pred_logits: jax.Array,
    pred_masks: jax.Array,
    targets: SemanticTargets,
    coords: jax.Array,
    *,
    cost_class: float = 2.0,
    cost_mask: float = 5.0,
    cost_dice: float = 5.0,
) -> jax.Array:
    """The query matched to each target slot (b, T) int32 (-1 for empty slots); no gradient.

    pred_logits (b, q, K+1), pred_masks (b, h, w, q) logits, coords (b, p, 2) uniform points in [0, 1].
    """
    cost = matching_cost(
        jax.lax.stop_gradient(pred_logits),
        jax.lax.stop_gradient(pred_masks),
        targets,
        coords,
        cost_class=cost_class,
        cost_mask=cost_mask,
        cost_dice=cost_dice,
    )  # (b, q, T)
    return jax.vmap(linear_sum_assignment)(cost.transpose(0, 2, 1), targets.valid)  # (b, T)
