"""detectron2 / Mask2Former semantic-segmentation transforms, as RASS trains and evaluates on ADE20K.

Training (Mask2Former's MaskFormerSemanticDatasetMapper with configs/ade20k/semantic-segmentation/
Base-ADE20K-SemanticSegmentation.yaml, unchanged in RASS), in this order:
  1. ResizeShortestEdge: short side drawn uniformly from MIN_SIZE_TRAIN = [int(x * 0.1 * 512) for x in
     range(5, 21)] (256 ... 1024, "choice"), long side capped at 2048; image PIL bilinear. The mapper reads
     the label as float64, so detectron2 resizes it with torch's F.interpolate(mode="nearest"), whose
     source index is floor(i * in / out) in float32 (not PIL's pixel-centre nearest).
  2. RandomCrop_CategoryAreaConstraint "absolute" 512x512 (crop = min(512, side)): up to 10 draws of the
     corner until no single class, ignoring 255, covers >= single_category_max_area of the counted
     pixels and more than one class is present; the last draw is kept otherwise. 1.0 = no constraint.
  3. ColorAugSSDTransform (PointRend's, INPUT.FORMAT "RGB": channels reversed to BGR around it).
  4. RandomFlip horizontal, p 0.5.
  5. Pad bottom/right to the crop size (SIZE_DIVISIBILITY 512): image with 128, label with 255.
Evaluation (detectron2's DatasetMapper, then MaskFormer's ImageList.from_tensors): ResizeShortestEdge 512
(max 2048) on the image, padded bottom/right with 0 to a multiple of SIZE_DIVISIBILITY 8; the label stays
at its original size. "valid_hw" is the resized size before padding: a system crops its prediction to it,
then resizes to the label size (detectron2's sem_seg_postprocess).

Randomness comes from the np.random.Generator grain derives from (seed, example index), not from the
global `random` / `np.random` the originals use; the distributions are the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

IGNORE = 255
MASK2FORMER_ADE20K_MIN_SIZES = tuple(int(x * 0.1 * 512) for x in range(5, 21))


def shortest_edge_size(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge.get_output_shape: short side -> short_edge, long side <= max_size."""
    size = float(short_edge)
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        clamp = max_size / max(newh, neww)
        newh, neww = newh * clamp, neww * clamp
    return int(newh + 0.5), int(neww + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) -> (size) with PIL bilinear, as detectron2's ResizeTransform does for uint8."""
    h, w = size
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))  # (h, w, 3)


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """torch's legacy 'nearest' source indices: floorf(i * (float)in / out), clamped (ATen nearest_idx)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) label -> (size) with torch F.interpolate(mode="nearest") semantics."""
    rows = _nearest_index(size[0], label.shape[0])
    cols = _nearest_index(size[1], label.shape[1])
    return label[rows[:, None], cols[None, :]]  # (new_h, new_w)


# ---- OpenCV's 8-bit BGR <-> HSV (H in 0..179), reproduced exactly -------------------------------------
_HSV_SHIFT = 12
_DIV = np.arange(1, 256, dtype=np.float64)
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _DIV)]).astype(np.int32)  # (256,)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * _DIV))]).astype(np.int32)  # (256,)
_SECTOR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])  # tab index of b, g, r


def bgr_to_hsv(image: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(uint8 BGR, COLOR_BGR2HSV): OpenCV's fixed-point RGB2HSV_b (12-bit tables)."""
    b, g, r = (image[..., k].astype(np.int32) for k in range(3))  # (h, w) each
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    half = 1 << (_HSV_SHIFT - 1)
    out = np.empty(image.shape, np.uint8)  # (h, w, 3)
    out[..., 1] = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h[h < 0] += 180
    out[..., 0] = h
    out[..., 2] = v
    return out


def hsv_to_bgr(hsv: np.ndarray, simd_pixels: int = 32) -> np.ndarray:
    """cv2.cvtColor(uint8 HSV, COLOR_HSV2BGR) as OpenCV 4.x/5.x computes it (HSV2RGB_b), bit for bit.

    In float32: sector = trunc(H * 6/180), f = the fraction, s = S/255, v = V/255; the four candidates
    v, v(1 - s), v(1 - s f), v(1 - s (1 - f)) (1 - s f with one rounding: a fused multiply-add, as
    compiled); x 255. OpenCV converts each row in SIMD blocks of `simd_pixels` pixels, which TRUNCATE to
    uint8, and the row's last width % simd_pixels pixels in scalar code, which ROUNDS. The block is
    4 x the float32 lanes of the build's dispatch: 32 for AVX2 (opencv-python 5.0 here), 64 for AVX-512
    (4.14 on an AVX-512 CPU), so cv2 itself differs by 1 on a few pixels between machines.
    """
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)  # (h, w)
    sector = np.trunc(h)
    f = h - sector
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    one = np.float32(1.0)
    s64 = s.astype(np.float64)  # s * f is exact in float64; one rounding to float32 = FMA
    tab = (
        v,
        v * (one - s),
        v * (1.0 - s64 * f).astype(np.float32),
        v * (1.0 - s64 * (one - f)).astype(np.float32),
    )
    sector = sector.astype(np.intp) % 6
    tail = hsv.shape[1] - hsv.shape[1] % simd_pixels  # first column of the scalar (rounding) part
    out = np.empty(hsv.shape, np.uint8)  # (h, w, 3)
    for c in range(3):
        x = np.choose(_SECTOR[sector, c], tab) * np.float32(255.0)  # (h, w)
        y = np.trunc(x)
        y[:, tail:] = np.rint(x[:, tail:])
        out[..., c] = np.clip(y, 0, 255)
    return out


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """ColorAugSSDTransform.convert: float32 x * alpha + beta, clipped to 0..255, truncated to uint8."""
    return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ColorAugSSD:
    """detectron2 PointRend's ColorAugSSDTransform (SSD photometric distortion) on a uint8 image.

    On BGR (an RGB image is reversed first and back after): brightness (p 0.5, + U(-32, 32)); then with
    p 0.5 either contrast, saturation, hue or saturation, hue, contrast; contrast (p 0.5, x U(0.5, 1.5));
    saturation (p 0.5, HSV S x U(0.5, 1.5)); hue (p 0.5, HSV H + randint[-18, 18] mod 180). Each step
    clips to 0..255 and truncates to uint8, as the original does.
    """

    image_format: str = "RGB"
    brightness_delta: float = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18
    simd_pixels: int = 32  # see hsv_to_bgr

    def __post_init__(self):
        if self.image_format not in ("RGB", "BGR"):
            raise ValueError(f"ColorAugSSD image_format must be 'RGB' or 'BGR', got {self.image_format!r}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = image[..., ::-1] if self.image_format == "RGB" else image  # (h, w, 3) BGR
        if rng.integers(2):
            img = _convert(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        if rng.integers(2):
            steps = (self._contrast, self._saturation, self._hue)
        else:
            steps = (self._saturation, self._hue, self._contrast)
        for step in steps:
            img = step(img, rng)
        img = img[..., ::-1] if self.image_format == "RGB" else img
        return np.ascontiguousarray(img)

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return _convert(img, alpha=rng.uniform(*self.contrast_range))
        return img

    def _saturation(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            hsv = bgr_to_hsv(img)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            return hsv_to_bgr(hsv, self.simd_pixels)
        return img

    def _hue(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            hsv = bgr_to_hsv(img)
            shift = int(rng.integers(-self.hue_delta, self.hue_delta + 1))
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
            return hsv_to_bgr(hsv, self.simd_pixels)
        return img


def category_area_crop(
    label: np.ndarray,
    crop: tuple[int, int],
    single_category_max_area: float,
    rng: np.random.Generator,
    ignore: int = IGNORE,
) -> tuple[int, int, int, int]:
    """detectron2 RandomCrop_CategoryAreaConstraint("absolute", crop): -> (y0, x0, crop_h, crop_w)."""
    h, w = label.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    attempts = 1 if single_category_max_area >= 1.0 else 10
    for _ in range(attempts):
        y0 = int(rng.integers(h - ch + 1))
        x0 = int(rng.integers(w - cw + 1))
        if attempts == 1:
            break
        values, counts = np.unique(label[y0 : y0 + ch, x0 : x0 + cw], return_counts=True)
        counts = counts[values != ignore]
        if len(counts) > 1 and counts.max() < counts.sum() * single_category_max_area:
            break
    return y0, x0, ch, cw


@dataclasses.dataclass(frozen=True)
class Detectron2TrainAugment:
    """Mask2Former/RASS semantic training augmentation (module docstring): (example, rng) -> example.

    In: {"image": (h, w, 3) uint8 RGB, "label": (h, w) uint8 train ids, "name"}; out: {"image": (ch, cw, 3)
    uint8, "label": (ch, cw) uint8, "name"}, (ch, cw) = crop. color_aug=None leaves colours alone.
    """

    crop: tuple[int, int] = (512, 512)
    min_sizes: tuple[int, ...] = MASK2FORMER_ADE20K_MIN_SIZES
    max_size: int = 2048
    sample_style: str = "choice"  # "choice": one of min_sizes; "range": uniform integer in [min, max]
    single_category_max_area: float = 1.0
    color_aug: ColorAugSSD | None = ColorAugSSD()
    flip_prob: float = 0.5
    pad_value: int = 128

    def __post_init__(self):
        if self.sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style must be 'choice' or 'range', got {self.sample_style!r}")
        if self.sample_style == "range" and len(self.min_sizes) != 2:
            raise ValueError(f"sample_style 'range' takes min_sizes (min, max), got {self.min_sizes}")
        if not self.min_sizes or min(self.min_sizes) <= 0 or min(self.crop) <= 0:
            raise ValueError(f"min_sizes {self.min_sizes} and crop {self.crop} must be positive")

    def short_edge(self, rng: np.random.Generator) -> int:
        if self.sample_style == "range":
            return int(rng.integers(self.min_sizes[0], self.min_sizes[1] + 1))
        return int(self.min_sizes[rng.integers(len(self.min_sizes))])

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image, label = example["image"], example["label"]
        size = shortest_edge_size(*label.shape, self.short_edge(rng), self.max_size)
        image, label = resize_image(image, size), resize_label(label, size)  # (nh, nw, 3), (nh, nw)
        y0, x0, ch, cw = category_area_crop(label, self.crop, self.single_category_max_area, rng)
        image, label = image[y0 : y0 + ch, x0 : x0 + cw], label[y0 : y0 + ch, x0 : x0 + cw]
        if self.color_aug is not None:
            image = self.color_aug(image, rng)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        ph, pw = self.crop[0] - ch, self.crop[1] - cw
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=self.pad_value)  # (H, W, 3)
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)  # (H, W)
        return {
            "image": np.ascontiguousarray(image),
            "label": np.ascontiguousarray(label),
            "name": example["name"],
        }


@dataclasses.dataclass(frozen=True)
class Detectron2EvalResize:
    """RASS/Mask2Former test input: short side -> short_edge (long <= max_size; 0 = keep), PIL bilinear,
    padded bottom/right with pad_value to a multiple of size_divisibility.

    Adds "valid_hw" (int32 (2,)): the resized size before padding. The label keeps its original size, so
    images of different sizes cannot share a batch: evaluate with one image per process
    (eval.batch_size = number of processes).
    """

    short_edge: int = 512
    max_size: int = 2048
    size_divisibility: int = 8
    pad_value: int = 0

    def __call__(self, example: dict) -> dict:
        image = example["image"]
        if self.short_edge:
            image = resize_image(image, shortest_edge_size(*image.shape[:2], self.short_edge, self.max_size))
        h, w = image.shape[:2]
        d = max(self.size_divisibility, 1)
        ph, pw = -h % d, -w % d
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=self.pad_value)  # (H, W, 3)
        return {**example, "image": image, "valid_hw": np.array([h, w], np.int32)}
