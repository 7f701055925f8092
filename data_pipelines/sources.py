"""Random-access sources over on-disk datasets. A source returns encoded bytes; decoding is a transform.

Each record is {"image": bytes, "label": bytes, "name": str} (a folder source adds the files' paths,
"image_path" and "label_path", which errors name). Labels are decoded and mapped to train ids
by `decode_example` with the source's `label_map` (ADE20K: label - 1, 0 -> 255; Cityscapes labelTrainIds:
identity), so every dataset reaches the pipeline as uint8 train ids with 255 = ignore.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset folder or file is missing, malformed or holds values the model cannot take."""


@dataclasses.dataclass(frozen=True)
class Example:
    image_path: Path
    label_path: Path | None


class FolderSource:
    """A list of (image, label) file pairs with random access; grain's RandomAccessDataSource protocol."""

    def __init__(self, examples: Sequence[Example], *, label_map: str, num_classes: int, description: str):
        if not examples:
            raise DataError(f"{description}: no images found")
        self.examples = list(examples)
        self.label_map = label_map
        self.num_classes = num_classes
        self.description = description

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        image = ex.image_path.read_bytes()
        if not image:
            raise DataError(f"image {ex.image_path} is empty (0 bytes; expected an RGB JPEG or PNG)")
        label = b""
        if ex.label_path is not None:
            label = ex.label_path.read_bytes()
            if not label:
                raise DataError(f"label {ex.label_path} is empty (0 bytes; expected a single-channel PNG)")
        return {
            "image": image,
            "label": label,
            "name": ex.image_path.name,
            "image_path": str(ex.image_path),  # for error messages (Decode)
            "label_path": str(ex.label_path or ""),
        }

    def __repr__(self) -> str:
        return f"FolderSource({self.description}, {len(self)} examples)"


def _require_dir(path: Path, what: str, expected: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what}: folder {path} does not exist (expected {expected})")


def ade20k_source(
    root: str | Path, split: str, *, num_classes: int = 150, labels: bool = True
) -> FolderSource:
    """ADE20K layout: ROOT/images/<split>/*.jpg|png and ROOT/annotations/<split>/*.png (raw ADE labels).

    Serves ADE20K (split training|validation), degraded ADE20K-val and RealLQ, which share the layout.
    With labels=False (prediction on unlabeled images) the annotations folder is not required.
    """
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    _require_dir(
        img_dir, "ADE20K-layout dataset", "ROOT/images/<split>/*.jpg with ROOT/annotations/<split>/*.png"
    )
    if labels:
        _require_dir(
            ann_dir, "ADE20K-layout dataset", "ROOT/annotations/<split>/*.png beside ROOT/images/<split>"
        )
    examples = []
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        ann = ann_dir / f"{img.stem}.png"
        if labels and not ann.is_file():
            raise DataError(f"ADE20K-layout dataset: image {img} has no annotation {ann}")
        examples.append(Example(img, ann if labels else None))
    return FolderSource(
        examples, label_map="ade20k", num_classes=num_classes, description=f"ADE20K {root} [{split}]"
    )


def cityscapes_source(root: str | Path, split: str, *, num_classes: int = 19) -> FolderSource:
    """Cityscapes layout: ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png and
    ROOT/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (train ids, 255 = ignore)."""
    root = Path(root)
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    expected = (
        "ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png and ROOT/gtFine/<split>/<city>/*_labelTrainIds.png"
    )
    _require_dir(img_dir, "Cityscapes-layout dataset", expected)
    _require_dir(gt_dir, "Cityscapes-layout dataset", expected)
    examples = []
    for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        gt = gt_dir / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not gt.is_file():
            raise DataError(
                f"Cityscapes-layout dataset: image {img} has no label {gt} "
                "(create *_labelTrainIds.png with cityscapesscripts' createTrainIdLabelImgs)"
            )
        examples.append(Example(img, gt))
    return FolderSource(
        examples, label_map="identity", num_classes=num_classes, description=f"Cityscapes {root} [{split}]"
    )


SOURCES = {"ade20k": ade20k_source, "cityscapes": cityscapes_source}


def build_source(kind: str, root: str | Path, split: str, *, num_classes: int):
    """The split's prepared records when ROOT/<split>/records.json exists (scripts/prepare_data.py), else the
    on-disk layout of `kind`. Both give the same records and expose label_map and num_classes."""
    if kind not in SOURCES:
        raise ValueError(f"data.source must be one of {tuple(SOURCES)}, got {kind!r}")
    from . import records

    if records.has_records(root, split):
        source = records.RecordSource(records.split_dir(root, split), num_classes=num_classes)
        if source.metadata["dataset"] != kind:
            raise DataError(
                f"{source.description}: prepared from a {source.metadata['dataset']} dataset, but data.source "
                f"is {kind!r}"
            )
        return source
    return SOURCES[kind](root, split, num_classes=num_classes)


def map_labels(raw: np.ndarray, label_map: str) -> np.ndarray:
    """Raw label image (h, w) -> train ids uint8 with 255 = ignore."""
    if label_map == "ade20k":  # detectron2 / mmseg reduce_zero_label: 0 (other) -> 255, c -> c - 1
        return np.where(raw == 0, 255, raw.astype(np.int32) - 1).astype(np.uint8)
    if label_map == "identity":
        return raw.astype(np.uint8)
    raise ValueError(f"unknown label_map {label_map!r}")
