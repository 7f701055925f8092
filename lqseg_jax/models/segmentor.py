"""Encoder + decode head, with the attribute names of refign's checkpoints ('backbone.*', 'head.*')."""

from __future__ import annotations

import jax
from flax import nnx


class EncoderDecoder(nnx.Module):
    def __init__(self, backbone: nnx.Module, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalised images (b, h, w, 3) -> head logits (b, h/4, w/4, K)."""
        return self.head(self.backbone(x))
