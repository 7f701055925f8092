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


def _axis_taps(valid_in: jax.Array, valid_out: jax.Array, out_len: int):
    """Per-example bilinear taps along one axis, torch align_corners=False: output i of `valid_out` reads
    input (i + 0.5) * valid_in / valid_out - 0.5, clamped to [0, valid_in - 1]."""
    i = jnp.arange(out_len, dtype=jnp.float32)[None]  # (1, out)
    scale = (valid_in / valid_out).astype(jnp.float32)[:, None]  # (b, 1)
    src = jnp.maximum((i + 0.5) * scale - 0.5, 0.0)  # (b, out)
    last = (valid_in - 1)[:, None]  # (b, 1)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)  # (b, out)
    i1 = jnp.minimum(i0 + 1, last)  # (b, out)
    return i0, i1, (src - i0)  # frac (b, out)


def resize_valid_region(
    scores: jax.Array, valid_hw: jax.Array, out_hw: tuple[int, int], label_hw: jax.Array
) -> jax.Array:
    """Crops each example's scores (b, h, w, K) to its valid_hw (b, 2) region and resizes it bilinearly
    (align_corners=False, no antialias) onto the top-left label_hw (b, 2) region of an out_hw canvas.
    Static shapes, per-example sizes: what detectron2's sem_seg_postprocess does one image at a time."""
    y0, y1, fy = _axis_taps(valid_hw[:, 0], label_hw[:, 0], out_hw[0])  # (b, H)
    x0, x1, fx = _axis_taps(valid_hw[:, 1], label_hw[:, 1], out_hw[1])  # (b, W)
    r0 = jnp.take_along_axis(scores, y0[:, :, None, None], axis=1)  # (b, H, w, K)
    r1 = jnp.take_along_axis(scores, y1[:, :, None, None], axis=1)  # (b, H, w, K)
    s = r0 * (1.0 - fy)[..., None, None] + r1 * fy[..., None, None]  # (b, H, w, K)
    c0 = jnp.take_along_axis(s, x0[:, None, :, None], axis=2)  # (b, H, W, K)
    c1 = jnp.take_along_axis(s, x1[:, None, :, None], axis=2)  # (b, H, W, K)
    return c0 * (1.0 - fx)[:, None, :, None] + c1 * fx[:, None, :, None]  # (b, H, W, K)


def predict_at_label_size(
    predict_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    label_shape: tuple[int, int],
    valid_hw: jax.Array,
    label_hw: jax.Array,
    *,
    mode: str = "whole",
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
) -> jax.Array:
    """Class ids (b, H, W) on the label canvas: the scores of each image's valid region, resized to its
    label's size, then argmax (canvas pixels outside label_hw carry label 255 and are not scored)."""
    if mode == "whole":
        scores = predict_fn(images)  # (b, h, w, K)
    elif mode == "slide":
        scores = slide_inference(predict_fn, images, crop, stride)  # (b, h, w, K)
    else:
        raise ValueError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
    scores = resize_valid_region(scores.astype(jnp.float32), valid_hw, label_shape, label_hw)  # (b, H, W, K)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
