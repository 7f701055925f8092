"""Confusion-matrix segmentation metrics with ignore label 255 (mIoU over classes present)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = 255


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int) -> jax.Array:
    """(K, K) int32 counts, rows = ground truth, columns = prediction; label 255 is skipped."""
    label = label.astype(jnp.int32).reshape(-1)  # (n,)
    pred = pred.astype(jnp.int32).reshape(-1)  # (n,)
    valid = (label != IGNORE) & (label < num_classes)
    index = jnp.where(valid, label * num_classes + pred, 0)  # (n,)
    counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN for classes absent from both labels and predictions."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def summarize(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """{"mIoU", "per_class_iou", "pixel_accuracy"}; mIoU averages the classes that occur in the labels
    (mmseg/detectron2 convention: a class with no ground truth pixels is left out)."""
    cm = np.asarray(cm, np.int64)
    iou = iou_from_confusion(cm)
    present = cm.sum(1) > 0
    miou = float(np.nanmean(np.where(present, iou, np.nan))) if present.any() else float("nan")
    return {
        "mIoU": 100.0 * miou,
        "per_class_iou": {
            name: (None if not present[i] else 100.0 * float(iou[i])) for i, name in enumerate(class_names)
        },
        "pixel_accuracy": 100.0 * float(np.trace(cm) / max(cm.sum(), 1)),
    }


def format_table(summary: dict) -> str:
    """A fixed-width per-class IoU table with the mean at the bottom."""
    rows = summary["per_class_iou"]
    width = max([len("class"), len("mIoU"), *map(len, rows)])
    lines = [f"{'class':<{width}}  IoU", f"{'-' * width}  ------"]
    for name, iou in rows.items():
        lines.append(f"{name:<{width}}  " + ("   n/a" if iou is None else f"{iou:6.2f}"))
    lines += [f"{'-' * width}  ------", f"{'mIoU':<{width}}  {summary['mIoU']:6.2f}"]
    return "\n".join(lines)
