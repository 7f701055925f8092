"""Results a person can read: metrics.json, the per-class table, and pictures (image | prediction | truth)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .metrics import IGNORE, format_table

CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: Cityscapes' for 19 classes, else a fixed spread of hues; 255 is black."""
    pal = np.zeros((256, 3), np.uint8)
    if num_classes == len(CITYSCAPES_PALETTE):
        pal[:num_classes] = CITYSCAPES_PALETTE
    else:
        rng = np.random.default_rng(12345)
        pal[:num_classes] = rng.integers(40, 256, size=(num_classes, 3))
    pal[IGNORE] = 0
    return pal


def colorize(ids: np.ndarray, num_classes: int) -> np.ndarray:
    return palette(num_classes)[np.asarray(ids, np.uint8)]  # (h, w, 3)


def save_triptych(
    path: Path, image: np.ndarray, pred: np.ndarray, label: np.ndarray, num_classes: int
) -> None:
    """image | prediction | ground truth side by side, all at the label's resolution."""
    h, w = label.shape
    img = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((w, h), Image.BILINEAR))
    row = np.concatenate([img, colorize(pred, num_classes), colorize(label, num_classes)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(path)


def write_results(out_dir: Path, summary: dict, num_images: int, extra: dict | None = None) -> str:
    """Writes out_dir/metrics.json (mIoU, per_class_iou, num_images, ...) and returns the printed table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**summary, "num_images": int(num_images), **(extra or {})}
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    table = format_table(summary)
    (out_dir / "per_class_iou.txt").write_text(table + "\n")
    return table


def class_names_or_ids(names: Sequence[str] | None, num_classes: int) -> list[str]:
    if names and len(names) == num_classes:
        return list(names)
    return [f"class_{i}" for i in range(num_classes)]
