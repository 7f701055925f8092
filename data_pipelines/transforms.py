"""Host-side transforms: decode, random resize, crop and flip (mmseg semantics), eval resize.

All are picklable callables (grain may run them in worker processes). Random transforms take the
`np.random.Generator` that grain derives from (seed, example index), so every augmentation is
reproducible from the seed and the index alone.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from .sources import DataError, map_labels

IGNORE = 255


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Encoded bytes -> (h, w, 3) uint8 RGB; a corrupt or truncated file raises DataError naming it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max(initial=0) > 255):
                # 16-bit grey: Pillow's convert("RGB") would clip at 255; scale 0..65535 to 0..255 instead
                grey = np.round(np.asarray(im).astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)  # (h, w, 3)
            return np.asarray(im.convert("RGB"))  # (h, w, 3)
    except UnidentifiedImageError as e:
        raise DataError(
            f"corrupt or unreadable image {name}: not a file Pillow can read (expected an RGB JPEG or PNG)"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {name}: {e} (expected an RGB JPEG or PNG)") from e


def decode_label(data: bytes, name: str, label_map: str, num_classes: int) -> np.ndarray:
    """Encoded label PNG -> (h, w) uint8 train ids; values outside 0..K-1 and 255 raise DataError naming
    `name` and the raw values as stored in the file (and the class ids they map to)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"label {name} has mode {im.mode} (expected a single-channel PNG)")
            raw = np.asarray(im)  # (h, w)
    except (OSError, SyntaxError) as e:
        raise DataError(f"corrupt or unreadable label {name}: {e} (expected a single-channel PNG)") from e
    if raw.max(initial=0) > 255:
        raise DataError(f"label {name} has values up to {raw.max()} (expected 8-bit class ids)")
    ids = map_labels(raw, label_map)
    outside = (ids >= num_classes) & (ids != IGNORE)
    if outside.any():
        raw_bad, bad = np.unique(raw[outside])[:10].tolist(), np.unique(ids[outside])[:10].tolist()
        raise DataError(
            f"label {name} has raw values {raw_bad} (class ids {bad} after the '{label_map}' label map) outside "
            f"0..{num_classes - 1} and {IGNORE} (ignore)"
        )
    return ids


@dataclasses.dataclass(frozen=True)
class Decode:
    """{"image": bytes, "label": bytes, "name"} -> {"image": (h, w, 3) uint8, "label": (h, w) uint8, "name"}."""

    label_map: str
    num_classes: int

    def __call__(self, record: dict) -> dict:
        name = record["name"]
        image_where = record.get("image_path") or name
        image = decode_image(record["image"], image_where)
        out = {"image": image, "name": name}
        if record["label"]:
            label_where = record.get("label_path") or f"of image {name}"
            label = decode_label(record["label"], label_where, self.label_map, self.num_classes)
            if label.shape != image.shape[:2]:
                raise DataError(
                    f"label {label_where} is {label.shape} but the image {image_where} is {image.shape[:2]}"
                )
            out["label"] = label
        return out


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg keep-ratio rescale: fit (h, w) inside scale = (long, short) edges; returns (new_h, new_w)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_pair(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    """Bilinear image, nearest label, to size (h, w)."""
    h, w = size
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))  # (h, w, 3)
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))  # (h, w)
    return image, label


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Random resize (keep ratio, `scale` (long, short) x U(ratio_range)), crop with cat_max_ratio, flip, pad.

    Output: {"image": (ch, cw, 3) uint8, "label": (ch, cw) uint8, "name": str}.
    """

    crop: tuple[int, int]
    scale: tuple[int, int] | None = None
    ratio_range: tuple[float, float] | None = None
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.5
    pad_value: int = 0

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image, label = example["image"], example["label"]
        if self.scale is not None:
            ratio = rng.uniform(*self.ratio_range) if self.ratio_range else 1.0
            scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
            image, label = resize_pair(image, label, rescale_size(*image.shape[:2], scale))
        image, label = self._crop(image, label, rng)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        ch, cw = self.crop
        h, w = label.shape
        if h < ch or w < cw:
            image = np.pad(image, ((0, ch - h), (0, cw - w), (0, 0)), constant_values=self.pad_value)
            label = np.pad(label, ((0, ch - h), (0, cw - w)), constant_values=IGNORE)
        return {
            "image": np.ascontiguousarray(image),
            "label": np.ascontiguousarray(label),
            "name": example["name"],
        }

    def _crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        ch, cw = self.crop
        h, w = label.shape
        for _ in range(10):  # mmseg RandomCrop: retry while one class covers >= cat_max_ratio of the crop
            y = int(rng.integers(0, max(h - ch, 0) + 1))
            x = int(rng.integers(0, max(w - cw, 0) + 1))
            crop = label[y : y + ch, x : x + cw]
            if self.cat_max_ratio >= 1.0:
                break
            _, counts = np.unique(crop[crop != IGNORE], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


@dataclasses.dataclass(frozen=True)
class EvalResize:
    """Resizes the image for the network (keep-ratio `scale` (long, short), or unchanged if None).

    The label keeps its original resolution: metrics are computed there.
    """

    scale: tuple[int, int] | None = None

    def __call__(self, example: dict) -> dict:
        image = example["image"]
        if self.scale is not None:
            image, _ = resize_pair(image, None, rescale_size(*image.shape[:2], self.scale))
        return {**example, "image": image}


@dataclasses.dataclass(frozen=True)
class EvalCanvas:
    """Adds "valid_hw" (the image before any padding, unless a resize already set it) and "label_hw" (the
    label's original size), then pads the label to a multiple of `label_bucket` with 255 and the image to a
    multiple of `image_bucket` with 0, so datasets of varied sizes compile a bounded number of shapes.

    Label padding never changes a metric (255 is ignored). Image padding changes what a network sees near
    the bottom/right border, so `image_bucket` = 0 (the default) keeps evaluation exact.
    """

    label_bucket: int = 0
    image_bucket: int = 0

    def __call__(self, example: dict) -> dict:
        image, label = example["image"], example["label"]
        out = {**example, "label_hw": np.array(label.shape, np.int32)}
        out.setdefault("valid_hw", np.array(image.shape[:2], np.int32))
        out["image"] = _pad_to_multiple(image, self.image_bucket, 0)
        out["label"] = _pad_to_multiple(label, self.label_bucket, IGNORE)
        return out


def _pad_to_multiple(x: np.ndarray, multiple: int, value: int) -> np.ndarray:
    if multiple <= 0:
        return x
    h, w = x.shape[:2]
    pad = ((0, -h % multiple), (0, -w % multiple)) + ((0, 0),) * (x.ndim - 2)
    return np.pad(x, pad, constant_values=value)
