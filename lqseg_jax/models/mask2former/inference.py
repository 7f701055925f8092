"""Mask2Former semantic inference (MaskFormer.semantic_inference + detectron2 sem_seg_postprocess)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lqseg_jax.models.layers import resize_bilinear


def semantic_inference(
    outputs: dict,
    out_hw: Sequence[int],
    *,
    padded_hw: Sequence[int] | None = None,
    resize_hw: Sequence[int] | None = None,
) -> jax.Array:
    """Per-class scores (b, H, W, K) from the final prediction.

    softmax over classes without the no-object column, times the sigmoid of the mask logits upsampled
    bilinearly to the padded input size `padded_hw` (default 4x the mask resolution), cropped to the image
    size `out_hw`, then optionally resized bilinearly to `resize_hw` (the original image size).
    """
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]  # (b, q, K+1), (b, h, w, q)
    _, h, w, _ = masks.shape
    padded_hw = tuple(padded_hw) if padded_hw is not None else (4 * h, 4 * w)
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if out_h > padded_hw[0] or out_w > padded_hw[1]:
        raise ValueError(f"out_hw {(out_h, out_w)} is larger than the padded input size {padded_hw}")
    cls = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]  # (b, q, K)
    masks = resize_bilinear(masks.astype(jnp.float32), padded_hw)[:, :out_h, :out_w]  # (b, H, W, q)
    scores = jnp.einsum("bqk,bhwq->bhwk", cls, jax.nn.sigmoid(masks), precision=jax.lax.Precision.HIGHEST)
    if resize_hw is not None:
        scores = resize_bilinear(scores, resize_hw)  # (b, H0, W0, K)
    return scores
