"""Supervised Mask2Former: a MiT encoder with the Mask2Former head (the head RASS uses), trained with the
Mask2Former criterion (Hungarian matching, class CE + point-sampled mask BCE and dice, deep supervision).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ..models.mask2former import Mask2FormerCriterion, Mask2FormerHead, rass_config, semantic_inference
from ..models.mask2former.config import FEATURES
from ..models.mit import MixVisionTransformer
from .base import System, normalize, pixel_accuracy


class MaskFormer(nnx.Module):
    """detectron2's MaskFormer layout: `backbone.*` then `sem_seg_head.*`."""

    def __init__(self, backbone: nnx.Module, sem_seg_head: Mask2FormerHead):
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head

    def __call__(self, x: jax.Array) -> dict:
        feats = self.backbone(x)  # 4 x (b, h_s, w_s, c_s) at strides 4..32
        return self.sem_seg_head(dict(zip(FEATURES, feats, strict=True)))


class Mask2FormerSystem(System):
    def __init__(self, config):
        super().__init__(config)
        m = config.model
        self.head_config = dataclasses.replace(
            rass_config(**m.head.to_dict()), num_classes=m.num_classes, dtype=m.dtype
        )
        self.criterion = Mask2FormerCriterion(self.head_config)

    def build_model(self, rngs: nnx.Rngs) -> MaskFormer:
        m = self.config.model
        backbone = MixVisionTransformer.from_preset(
            m.backbone, drop_path_rate=m.drop_path_rate, dtype=jnp.dtype(m.dtype), rngs=rngs
        )
        head_cfg = dataclasses.replace(self.head_config, in_channels=backbone.embed_dims)
        return MaskFormer(backbone, Mask2FormerHead(head_cfg, rngs))

    def _outputs(self, model: MaskFormer, images: jax.Array) -> dict:
        d = self.config.data
        return model(normalize(images, d.mean, d.std, jnp.dtype(self.config.model.dtype)))

    def loss(self, model, batch, rng):
        images, _ = self.training_images(batch, rng)  # (b, h, w, 3) degraded when configured
        outputs = self._outputs(model, images)
        loss, metrics = self.criterion.loss(outputs, batch["label"], jax.random.fold_in(rng, 1))
        scores = semantic_inference(outputs, batch["label"].shape[1:3])  # (b, h, w, K)
        metrics = {k: v for k, v in metrics.items() if k in ("loss_ce", "loss_mask", "loss_dice")}
        return loss, {**metrics, "pixel_acc": pixel_accuracy(jnp.argmax(scores, -1), batch["label"])}

    def predict(self, model, images):
        return semantic_inference(self._outputs(model, images), images.shape[1:3])  # (b, h, w, K)
