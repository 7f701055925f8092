"""Mask2Former set criterion (mask2former/modeling/criterion.py) for semantic label maps, jittable.

Per prediction (the initial queries and every decoder layer, i.e. deep supervision): Hungarian matching
on uniform points, then weighted cross-entropy over all queries (no-object weight 0.1, a weighted mean
as torch's cross_entropy with `weight`) and sigmoid BCE + dice on points chosen by uncertainty
importance sampling (oversample 3x, keep the 75% most uncertain by -|logit|, the rest uniform), summed
over matched masks and divided by the number of target masks in the whole batch (at least 1).
All randomness comes from the `key` argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import Mask2FormerConfig
from .matcher import (
    SemanticTargets,
    hungarian_match,
    sample_slot_points,
    sample_target_points,
    targets_from_semantic,
)
from .transformer_decoder import stack_predictions


class Mask2FormerCriterion:
    """loss(outputs, labels (b, H, W) int, 255 = ignore, key) -> (scalar loss, metrics).

    `labels` must cover the same (padded) image as the predicted masks. Metrics hold the weighted terms
    as detectron2 logs them: loss_ce / loss_mask / loss_dice for the final prediction and loss_*_{i} for
    the i-th auxiliary one, plus num_masks and num_targets_dropped (classes beyond max_targets).
    """

    def __init__(self, cfg: Mask2FormerConfig):
        self.cfg = cfg
        weight = np.ones(cfg.num_classes + 1, np.float32)
        weight[-1] = cfg.no_object_weight
        self.empty_weight = weight
        self.num_points = cfg.train_num_points
        self.num_oversampled = int(cfg.train_num_points * cfg.oversample_ratio)
        self.num_uncertain = int(cfg.importance_sample_ratio * cfg.train_num_points)
        self.num_random = cfg.train_num_points - self.num_uncertain

    def draw_points(self, key: jax.Array, num_layers: int, batch: int) -> dict[str, jax.Array]:
        """Uniform points in [0, 1]^2 (x, y) for every prediction layer: 'match' (L, b, P, 2) shared by the
        queries and targets of an image; per target slot 'oversampled' (L, b, T, P*ratio, 2) and 'random'
        (L, b, T, P - P_uncertain, 2)."""
        t = self.cfg.max_targets
        k_match, k_over, k_rand = jax.random.split(key, 3)
        return {
            "match": jax.random.uniform(k_match, (num_layers, batch, self.num_points, 2)),
            "oversampled": jax.random.uniform(k_over, (num_layers, batch, t, self.num_oversampled, 2)),
            "random": jax.random.uniform(k_rand, (num_layers, batch, t, self.num_random, 2)),
        }

    def layer_losses(
        self,
        pred_logits: jax.Array,
        pred_masks: jax.Array,
        targets: SemanticTargets,
        points: dict[str, jax.Array],
        num_masks: jax.Array,
    ) -> dict[str, jax.Array]:
        """Unweighted ce / mask / dice of one prediction (pred_logits (b, q, K+1), pred_masks (b, h, w, q))
        and the matched query of every target slot ('indices' (b, T), -1 for empty slots)."""
        cfg = self.cfg
        b, q, _ = pred_logits.shape
        indices = hungarian_match(
            pred_logits,
            pred_masks,
            targets,
            points["match"],
            cost_class=cfg.class_weight,
            cost_mask=cfg.mask_weight,
            cost_dice=cfg.dice_weight,
        )  # (b, T)
        valid = targets.valid  # (b, T)

        # classification over all queries: matched ones get their target's class, the others no-object
        batch_idx = jnp.arange(b)[:, None]  # (b, 1)
        target_classes = (
            jnp.full((b, q), cfg.num_classes, jnp.int32)
            .at[batch_idx, jnp.where(valid, indices, q)]
            .set(targets.classes, mode="drop")
        )  # (b, q)
        logp = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)  # (b, q, K+1)
        nll = -jnp.take_along_axis(logp, target_classes[..., None], axis=-1)[..., 0]  # (b, q)
        w = jnp.asarray(self.empty_weight)[target_classes]  # (b, q)
        loss_ce = jnp.sum(w * nll) / jnp.sum(w)

        # masks of the matched queries, one per target slot
        src = jnp.take_along_axis(
            pred_masks.astype(jnp.float32), jnp.where(valid, indices, 0)[:, None, None, :], axis=-1
        )  # (b, h, w, T)
        over = points["oversampled"]  # (b, T, P*ratio, 2)
        uncertainty = -jnp.abs(sample_slot_points(jax.lax.stop_gradient(src), over))  # (b, T, P*ratio)
        _, top = jax.lax.top_k(uncertainty, self.num_uncertain)  # (b, T, P_uncertain)
        coords = jnp.concatenate(
            [jnp.take_along_axis(over, top[..., None], axis=2), points["random"]], axis=2
        )  # (b, T, P, 2)
        coords = jax.lax.stop_gradient(coords)
        logits = sample_slot_points(src, coords)  # (b, T, P)
        labels = sample_target_points(targets, coords)  # (b, T, P)
        bce = jnp.mean(jax.nn.softplus(logits) - logits * labels, axis=-1)  # (b, T)
        prob = jax.nn.sigmoid(logits)  # (b, T, P)
        dice = 1.0 - (2.0 * jnp.sum(prob * labels, -1) + 1.0) / (
            prob.sum(-1) + labels.sum(-1) + 1.0
        )  # (b, T)
        return {
            "ce": loss_ce,
            "mask": jnp.sum(jnp.where(valid, bce, 0.0)) / num_masks,
            "dice": jnp.sum(jnp.where(valid, dice, 0.0)) / num_masks,
            "indices": indices,
        }

    def losses_from_points(
        self, outputs: dict, targets: SemanticTargets, points: dict[str, jax.Array]
    ) -> dict[str, jax.Array]:
        """Per-layer unweighted losses (L,) and indices (L, b, T), layers in decoder order (final last)."""
        logits, masks = stack_predictions(outputs)  # (L, b, q, K+1), (L, b, h, w, q)
        num_masks = jnp.maximum(jnp.sum(targets.valid), 1).astype(jnp.float32)
        return jax.vmap(self.layer_losses, in_axes=(0, 0, None, 0, None))(
            logits, masks, targets, points, num_masks
        )

    def loss(
        self, outputs: dict, labels: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        batch = outputs["pred_logits"].shape[0]
        if labels.ndim != 3 or labels.shape[0] != batch:
            raise ValueError(f"labels must be (b={batch}, H, W), got {tuple(labels.shape)}")
        targets = targets_from_semantic(labels, cfg.num_classes, cfg.max_targets)
        num_layers = len(outputs["aux_outputs"]) + 1
        per_layer = self.losses_from_points(outputs, targets, self.draw_points(key, num_layers, batch))
        weighted = {
            "loss_ce": cfg.class_weight * per_layer["ce"],
            "loss_mask": cfg.mask_weight * per_layer["mask"],
            "loss_dice": cfg.dice_weight * per_layer["dice"],
        }  # each (L,)
        total = sum(jnp.sum(v) for v in weighted.values())
        metrics = {"loss": total}
        for name, values in weighted.items():
            metrics[name] = values[-1]
            for i in range(num_layers - 1):
                metrics[f"{name}_{i}"] = values[i]
        metrics["num_masks"] = jnp.sum(targets.valid)
        metrics["num_targets_dropped"] = jnp.sum(targets.num_dropped)
        return total, metrics

    __call__ = loss
