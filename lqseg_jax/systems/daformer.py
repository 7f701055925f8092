"""Supervised segmentation with a MiT encoder and the DAFormer head (Refign's network, refign.md section 2).

Loss: pixel cross-entropy on logits bilinearly upsampled to the label size, ignore 255, averaged over all
pixels like mmseg < 1.0 (config.model.avg_non_ignore switches to labelled pixels only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..models.daformer_head import DAFormerHead
from ..models.layers import resize_bilinear
from ..models.mit import MixVisionTransformer
from ..models.segmentor import EncoderDecoder
from .base import System, cross_entropy, normalize, pixel_accuracy


class DAFormerSystem(System):
    def build_model(self, rngs: nnx.Rngs) -> EncoderDecoder:
        m = self.config.model
        dtype = jnp.dtype(m.dtype)
        backbone = MixVisionTransformer.from_preset(
            m.backbone, drop_path_rate=m.drop_path_rate, dtype=dtype, rngs=rngs
        )
        head = DAFormerHead(
            backbone.embed_dims,
            m.num_classes,
            channels=m.head.channels,
            embed_dims=m.head.embed_dims,
            dilations=tuple(m.head.dilations),
            dropout_ratio=m.head.dropout_ratio,
            dtype=dtype,
            rngs=rngs,
        )
        return EncoderDecoder(backbone, head)

    def _logits(self, model: EncoderDecoder, images: jax.Array) -> jax.Array:
        d = self.config.data
        x = normalize(images, d.mean, d.std, jnp.dtype(self.config.model.dtype))  # (b, h, w, 3)
        return model(x).astype(jnp.float32)  # (b, h/4, w/4, K)

    def loss(self, model, batch, rng):
        # dropout and drop-path draw from the model's reseeded "dropout" stream
        images, _ = self.training_images(batch, rng)  # (b, h, w, 3) degraded when configured
        labels = batch["label"]  # (b, h, w)
        logits = resize_bilinear(self._logits(model, images), labels.shape[1:3])  # (b, h, w, K)
        loss = cross_entropy(logits, labels, avg_non_ignore=self.config.model.avg_non_ignore)
        return loss, {"pixel_acc": pixel_accuracy(jnp.argmax(logits, -1), labels)}

    def predict(self, model, images):
        return resize_bilinear(self._logits(model, images), images.shape[1:3])  # (b, h, w, K)
