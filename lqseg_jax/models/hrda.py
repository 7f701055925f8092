"""HRDA multi-resolution segmentation as Refign uses it (refign `models/hrda.py`, refign.md section 6), NHWC.

The encoder and decode head are the UDA system's own (MiT + DAFormer head); HRDA adds a scale-attention
head (`SegFormerHead`, refign's `hrda_scale_attention`) and runs them on two resolutions:

- Student, training (`student_forward`): context `lr` = the image at x0.5 (bilinear with scale factor 0.5
  = 2x2 average pooling), detail `hr` = one full-resolution crop of the context's size at a random offset
  (multiples of 2 * os, at most the margin rounded down: 504 for a 512 margin), the same box for the whole
  batch. Encoder and head run on cat[lr, hr] (BatchNorm statistics over both); the attention
  a = sigmoid(scale_attention(lr feats)) is masked to the box at context-logit resolution and then
  upsampled, so it blurs across the box border:
  fused = up2(a_m) * ins(hr_seg) + up2((1 - a_m) * lr_seg), a_m = a * 1[box / 2os].
- Teacher and evaluation (`slide_forward`): the detail crops are sliding windows of the context's size,
  stride half of it, the last one clamped to the border, all batched crop-major; their logits are averaged
  where they overlap; the attention is not masked: fused = up2(a) * hr_seg + up2((1 - a) * lr_seg).
- Test time (`slide_predict`): 1080x1080 windows every 420 pixels (the last clamped), each window through
  `slide_forward` and bilinearly upsampled to the window, averaged (lqseg_jax.eval.inference.slide_inference).

Every function is pure in (modules, inputs, key); BatchNorm and dropout follow the modules' train/eval mode.
Logits come out fp32 at stride os = 4 of the full-resolution input.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lqseg_jax.eval.inference import slide_inference, window_starts
from lqseg_jax.models.daformer_head import MLP
from lqseg_jax.models.layers import ConvModule, resize_bilinear

HEAD_OS = 4  # refign `hrda_output_stride`
TEST_CROP = (1080, 1080)  # refign `inference_crop_size`
TEST_STRIDE = (420, 420)  # refign `inference_stride`


class SegFormerHead(nnx.Module):
    """The scale attention (refign `models/heads/segformer.py`): per level `linear_c{i}` Linear to
    `channels`, bilinear to the c1 size, concat in the order [c4, c3, c2, c1], `linear_fuse` 1x1 ConvBNReLU,
    Dropout2d, `linear_pred` 1x1 conv (bias) to the classes. Logits (no sigmoid) fp32 at the c1 size."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout_ratio: float = 0.1,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        if len(in_channels) != 4:
            raise ValueError(f"SegFormerHead: in_channels must have 4 entries (c1..c4), got {in_channels}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = num_classes
        for i, c in enumerate(self.in_channels, start=1):
            setattr(self, f"linear_c{i}", MLP(c, channels, dtype=dtype, rngs=rngs))
        self.linear_fuse = ConvModule(4 * channels, channels, 1, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_ratio, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d on NHWC
        self.linear_pred = nnx.Conv(
            channels,
            num_classes,
            (1, 1),
            dtype=dtype,
            kernel_init=jax.nn.initializers.normal(0.01),
            bias_init=jax.nn.initializers.zeros,
            rngs=rngs,
        )

    def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
        if len(feats) != 4 or any(f.shape[-1] != c for f, c in zip(feats, self.in_channels)):
            raise ValueError(
                f"SegFormerHead: expected 4 NHWC features with channels {self.in_channels}, got shapes "
                f"{[tuple(f.shape) for f in feats]}"
            )
        size = feats[0].shape[1:3]
        embedded = [
            resize_bilinear(getattr(self, f"linear_c{i}")(feats[i - 1]), size) for i in (4, 3, 2, 1)
        ]  # 4 x (b, h_1, w_1, channels), [c4, c3, c2, c1]
        x = self.linear_fuse(jnp.concatenate(embedded, axis=-1))  # (b, h_1, w_1, channels)
        x = self.dropout(x)  # (b, h_1, w_1, channels)
        return self.linear_pred(x).astype(jnp.float32)  # (b, h_1, w_1, num_classes)


# ------------------------------------------------------------------------------------------- pieces
def half(x: jax.Array) -> jax.Array:
    """torch `interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)` of NHWC `x`: with a
    given scale factor torch reads source 2i + 0.5, i.e. 2x2 average pooling of the top-left even part."""
    b, h, w, c = x.shape
    y = x[:, : 2 * (h // 2), : 2 * (w // 2)].astype(jnp.promote_types(x.dtype, jnp.float32))
    y = y.reshape(b, h // 2, 2, w // 2, 2, c)  # (b, h/2, 2, w/2, 2, c)
    return y.mean(axis=(2, 4)).astype(x.dtype)  # (b, h/2, w/2, c)


def crop_offsets(key: jax.Array, size: Sequence[int], crop: Sequence[int], divisible: int) -> jax.Array:
    """(y, x) int32 offset of the detail crop: per axis randrange(0, (margin + 1) // divisible) * divisible,
    margin = size - crop (refign `extract_crop`); 0 where the crop fills the axis."""
    counts = []
    for s, c in zip(size, crop):
        margin = max(int(s) - int(c), 0)
        if margin and (margin + 1) // divisible < 1:
            raise ValueError(
                f"HRDA detail crop: margin {margin} (image {tuple(size)}, crop {tuple(crop)}) leaves no offset "
                f"that is a multiple of {divisible}"
            )
        counts.append(max((margin + 1) // divisible, 1))
    draws = jax.random.randint(key, (2,), 0, jnp.asarray(counts, jnp.int32))  # (2,)
    return (draws * divisible).astype(jnp.int32)


def crop_at(x: jax.Array, offset: jax.Array, crop: Sequence[int]) -> jax.Array:
    """x (b, h, w, ...) -> x[:, y:y + ch, x:x + cw] at the traced offset (y, x)."""
    start = (0, offset[0], offset[1]) + (0,) * (x.ndim - 3)
    return jax.lax.dynamic_slice(x, start, (x.shape[0], int(crop[0]), int(crop[1]), *x.shape[3:]))


def box_mask(offset: jax.Array, crop: Sequence[int], shape: Sequence[int], scale: int) -> jax.Array:
    """(h, w) float32 mask of the box offset..offset + crop scaled by 1/scale (int division, `scale_box`)
    on a map of `shape`."""
    ys = jnp.arange(shape[0])[:, None]  # (h, 1)
    xs = jnp.arange(shape[1])[None, :]  # (1, w)
    y0, x0 = offset[0] // scale, offset[1] // scale
    y1, x1 = (offset[0] + crop[0]) // scale, (offset[1] + crop[1]) // scale
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).astype(jnp.float32)  # (h, w)


def slide_boxes(size: Sequence[int], crop: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Static (y1, y2, x1, x2) of the teacher's detail crops (refign `extract_slide_crop`): windows of
    `crop` every crop // 2, row-major, the last of a row/column clamped to the border."""
    h, w = int(size[0]), int(size[1])
    ch, cw = min(int(crop[0]), h), min(int(crop[1]), w)
    return [
        (y, y + ch, x, x + cw)
        for y in window_starts(h, ch, max(int(crop[0]) // 2, 1))
        for x in window_starts(w, cw, max(int(crop[1]) // 2, 1))
    ]


def _encode_decode(backbone: nnx.Module, head: nnx.Module, lr: jax.Array, hr: jax.Array):
    """Encoder and head on cat[lr, hr] (one batch: BatchNorm statistics over both); split back."""
    n = lr.shape[0]
    feats = backbone(jnp.concatenate([lr, hr], axis=0))  # 4 x (n + m, h_s, w_s, c_s)
    seg = head(feats).astype(jnp.float32)  # (n + m, h/4, w/4, K)
    return [f[:n] for f in feats], seg[:n], seg[n:]


def fuse_train(
    att: jax.Array,
    lr_seg: jax.Array,
    hr_seg: jax.Array,
    offset: jax.Array,
    crop: Sequence[int],
    os: int = HEAD_OS,
) -> jax.Array:
    """Student fusion: att (b, h, w, K) sigmoid attention and lr_seg (b, h, w, K) at context-logit
    resolution, hr_seg (b, ch/os, cw/os, K) the detail logits, offset (2,) the box in input pixels ->
    fused (b, 2h, 2w, K) = up2(a_m) * ins(hr_seg) + up2((1 - a_m) * lr_seg), a_m = att * 1[box / 2os]."""
    _, h, w, _ = lr_seg.shape
    if hr_seg.shape[1:3] != (crop[0] // os, crop[1] // os):
        raise ValueError(
            f"HRDA: detail logits {tuple(hr_seg.shape)} do not cover the crop {tuple(crop)} at stride {os}"
        )
    att = att * box_mask(offset, crop, (h, w), 2 * os)[None, :, :, None]  # (b, h, w, K)
    up_lr = resize_bilinear((1.0 - att) * lr_seg, (2 * h, 2 * w))  # (b, 2h, 2w, K)
    up_att = resize_bilinear(att, (2 * h, 2 * w))  # (b, 2h, 2w, K)
    inserted = jax.lax.dynamic_update_slice(
        jnp.zeros_like(up_lr), hr_seg.astype(up_lr.dtype), (0, offset[0] // os, offset[1] // os, 0)
    )  # (b, 2h, 2w, K)
    return up_att * inserted + up_lr


def fuse_slide(
    att: jax.Array,
    lr_seg: jax.Array,
    crop_segs: jax.Array,
    boxes: Sequence[tuple[int, int, int, int]],
    os: int = HEAD_OS,
) -> jax.Array:
    """Teacher/eval fusion: crop_segs (n * b, ch/os, cw/os, K) crop-major, averaged where the boxes (scaled
    by int(v / os)) overlap -> fused (b, 2h, 2w, K) = up2(att) * hr_seg + up2((1 - att) * lr_seg)."""
    b, h, w, k = lr_seg.shape
    scaled = [tuple(int(v / os) for v in box) for box in boxes]
    out_h, out_w = max(s[1] for s in scaled), max(s[3] for s in scaled)
    if (out_h, out_w) != (2 * h, 2 * w):
        raise ValueError(f"HRDA: detail crops cover {out_h}x{out_w} logits, the context {2 * h}x{2 * w}")
    total = jnp.zeros((b, out_h, out_w, k), jnp.float32)
    count = jnp.zeros((1, out_h, out_w, 1), jnp.float32)
    for i, (y1, y2, x1, x2) in enumerate(scaled):
        pad = ((0, 0), (y1, out_h - y2), (x1, out_w - x2), (0, 0))
        total = total + jnp.pad(crop_segs[i * b : (i + 1) * b], pad)  # (b, 2h, 2w, K)
        count = count + jnp.pad(jnp.ones((1, y2 - y1, x2 - x1, 1), jnp.float32), pad)
    hr_seg = total / count  # (b, 2h, 2w, K)
    up_lr = resize_bilinear((1.0 - att) * lr_seg, (2 * h, 2 * w))  # (b, 2h, 2w, K)
    return resize_bilinear(att, (2 * h, 2 * w)) * hr_seg + up_lr


# ------------------------------------------------------------------------------------------ forwards
def student_forward(
    backbone: nnx.Module,
    head: nnx.Module,
    scale_attention: nnx.Module,
    x: jax.Array,
    key: jax.Array,
    os: int = HEAD_OS,
) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
    """Training forward of the student on normalised images x (b, H, W, 3) ->
    (fused (b, H/os, W/os, K), hr_logits (b, H/2, W/2, K) at the crop's pixels, offset (2,) of the detail
    box in x, lr_feats: the 4 context features, for the feature distance)."""
    lr = half(x)  # (b, H/2, W/2, 3)
    crop = lr.shape[1:3]
    offset = crop_offsets(key, x.shape[1:3], crop, 2 * os)  # (2,)
    hr = crop_at(x, offset, crop)  # (b, H/2, W/2, 3)
    lr_feats, lr_seg, hr_seg = _encode_decode(backbone, head, lr, hr)  # (b, H/8, W/8, K) each
    att = jax.nn.sigmoid(scale_attention(lr_feats))  # (b, H/8, W/8, K)
    fused = fuse_train(att, lr_seg, hr_seg, offset, crop, os)  # (b, H/4, W/4, K)
    hr_logits = resize_bilinear(hr_seg, crop)  # (b, H/2, W/2, K)
    return fused, hr_logits, offset, lr_feats


def slide_forward(
    backbone: nnx.Module, head: nnx.Module, scale_attention: nnx.Module, x: jax.Array, os: int = HEAD_OS
) -> jax.Array:
    """Teacher / evaluation forward on normalised images x (b, H, W, 3) -> fused logits (b, H/os, W/os, K):
    the detail crops slide over x (context size, stride half of it) and are batched crop-major."""
    lr = half(x)  # (b, H/2, W/2, 3)
    boxes = slide_boxes(x.shape[1:3], lr.shape[1:3])
    crops = jnp.concatenate([x[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], axis=0)  # (n * b, H/2, W/2, 3)
    lr_feats, lr_seg, crop_segs = _encode_decode(backbone, head, lr, crops)
    att = jax.nn.sigmoid(scale_attention(lr_feats))  # (b, H/8, W/8, K)
    return fuse_slide(att, lr_seg, crop_segs, boxes, os)  # (b, H/4, W/4, K)


def window_predict(
    backbone: nnx.Module, head: nnx.Module, scale_attention: nnx.Module, x: jax.Array, os: int = HEAD_OS
) -> jax.Array:
    """refign `whole_inference` under HRDA: slide_forward bilinearly upsampled to x's size (b, H, W, K)."""
    return resize_bilinear(slide_forward(backbone, head, scale_attention, x, os), x.shape[1:3])


def slide_predict(
    backbone: nnx.Module,
    head: nnx.Module,
    scale_attention: nnx.Module,
    x: jax.Array,
    crop: Sequence[int] = TEST_CROP,
    stride: Sequence[int] = TEST_STRIDE,
    os: int = HEAD_OS,
) -> jax.Array:
    """Test-time sliding windows (refign `slide_inference`): scores (b, H, W, K) averaged over the windows."""
    return slide_inference(
        lambda w: window_predict(backbone, head, scale_attention, w, os), x, tuple(crop), tuple(stride)
    )
