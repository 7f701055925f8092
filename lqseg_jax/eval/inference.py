"""Whole-image and sliding-window inference over any predict function.

`predict_fn(images (b, h, w, 3)) -> scores (b, h, w, K)` at the input resolution. Sliding window, as in
mmseg's `slide_inference`: windows of `crop` every `stride`, the last window of a row/column shifted back
to the border, windows smaller than the image padded by the predict function's own handling (none here:
an image smaller than the crop is predicted whole), overlapping scores averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..models.layers import resize_bilinear


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis; the last window ends at the border."""
    if size <= crop:
        return [0]
    n = -(-(size - crop) // stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def slide_inference(
    predict_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    crop: tuple[int, int],
    stride: tuple[int, int],
) -> jax.Array:
    """images (b, h, w, 3) -> averaged scores (b, h, w, K). Windows are static, so this jits once per size."""
    _, h, w, _ = images.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    total = None
    count = jnp.zeros((1, h, w, 1), jnp.float32)
    for y in window_starts(h, ch, stride[0]):
        for x in window_starts(w, cw, stride[1]):
            scores = predict_fn(images[:, y : y + ch, x : x + cw]).astype(jnp.float32)  # (b, ch, cw, K)
            pad = ((0, 0), (y, h - y - ch), (x, w - x - cw), (0, 0))
            total = jnp.pad(scores, pad) if total is None else total + jnp.pad(scores, pad)  # (b, h, w, K)
            count = count + jnp.pad(jnp.ones((1, ch, cw, 1), jnp.float32), pad)
    return total / count


def predict_at_label_size(
    predict_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    label_hw: tuple[int, int],
    *,
    mode: str = "whole",
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
) -> jax.Array:
    """Class ids (b, H, W) at the label resolution: scores bilinearly resized, then argmax."""
    if mode == "whole":
        scores = predict_fn(images)  # (b, h, w, K)
    elif mode == "slide":
        scores = slide_inference(predict_fn, images, crop, stride)  # (b, h, w, K)
    else:
        raise ValueError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
    if scores.shape[1:3] != tuple(label_hw):
        scores = resize_bilinear(scores.astype(jnp.float32), label_hw)  # (b, H, W, K)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
