"""Mask2FormerHead: detectron2's MaskFormerHead (`sem_seg_head`) = pixel decoder + transformer predictor."""

from __future__ import annotations

import jax
from flax import nnx

from .config import FEATURES, Mask2FormerConfig
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder


class Mask2FormerHead(nnx.Module):
    """features {"res2".."res5": (b, h, w, c) NHWC} -> {"pred_logits" (b, q, K+1), "pred_masks"
    (b, H/4, W/4, q) (queries last), "aux_outputs": list of dec_layers such dicts, initial queries first}.

    Outputs are float32 whatever the compute dtype.
    """

    def __init__(self, cfg: Mask2FormerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg, rngs=rngs)
        self.predictor = MultiScaleMaskedTransformerDecoder(cfg, rngs=rngs)

    def _check(self, features: dict[str, jax.Array]) -> None:
        missing = [f for f in FEATURES if f not in features]
        if missing:
            raise ValueError(
                f"Mask2FormerHead needs features {FEATURES}; missing {missing} (got {sorted(features)})"
            )
        batch = features[FEATURES[0]].shape[0]
        for f, c in self.cfg.channels.items():
            shape = features[f].shape
            if len(shape) != 4 or shape[-1] != c or shape[0] != batch:
                raise ValueError(
                    f"Mask2FormerHead feature '{f}' has shape {tuple(shape)}; expected NHWC (b={batch}, h, w, {c})"
                )

    def __call__(self, features: dict[str, jax.Array]) -> dict:
        self._check(features)
        mask_features, multi_scale_features = self.pixel_decoder(features)
        return self.predictor(multi_scale_features, mask_features)
