"""ADE20K (and datasets in its layout: degraded ADE20K-val, RealLQ) -> prepared ArrayRecord splits.

Input: the official ADEChallengeData2016.zip, or a folder in its layout (the extracted zip, or any folder
with images/<split>/*.jpg|png and annotations/<split>/<stem>.png, raw ADE labels: 0 = unlabeled,
c = class c - 1). Output: OUT/<split>/ in the format of `records.py`, labels already mapped to detectron2
ids (raw - 1, 0 -> 255, what Mask2Former's datasets/prepare_ade20k_sem_seg.py writes to
annotations_detectron2), images kept byte for byte. Every example is checked on the way: the image
decodes, the annotation exists, is single-channel, has the image's size and values in 0..150.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .records import write_split
from .sources import DataError, map_labels
from .transforms import decode_image

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road, route", "bed", "window", "grass",
    "cabinet", "sidewalk, pavement", "person", "earth, ground", "door", "table", "mountain, mount", "plant",
    "curtain", "chair", "car", "water", "painting, picture", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock, stone", "wardrobe, closet, press", "lamp",
    "tub", "rail", "cushion", "base, pedestal, stand", "box", "column, pillar", "signboard, sign",
    "chest of drawers, chest, bureau, dresser", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator, icebox", "grandstand, covered stand", "path", "stairs", "runway",
    "case, display case, showcase, vitrine", "pool table, billiard table, snooker table", "pillow",
    "screen door, screen", "stairway, staircase", "river", "bridge, span", "bookcase", "blind, screen",
    "coffee table", "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm, palm tree", "kitchen island", "computer", "swivel chair", "boat",
    "bar", "arcade machine", "hovel, hut, hutch, shack, shanty", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning, sunshade, sunblind", "street lamp", "booth", "tv", "plane", "dirt track",
    "clothes", "pole", "land, ground, soil", "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock", "bottle",
    "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card", "stage", "van", "ship",
    "fountain", "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic washer, washing machine", "plaything, toy", "pool", "stool", "barrel, cask",
    "basket, handbasket", "falls", "tent", "bag", "minibike, motorbike", "cradle", "oven", "ball",
    "food, solid food", "step, stair", "tank, storage tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket, cover", "sculpture", "hood, exhaust hood",
    "sconce", "vase", "traffic light", "tray", "trash can", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass, drinking glass", "clock", "flag",
)  # fmt: skip

NUM_CLASSES = len(ADE20K_CLASSES)
ZIP_ROOT = "ADEChallengeData2016/"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = "images/<split>/*.jpg with annotations/<split>/<same stem>.png"


class _Folder:
    """ADE layout on disk; `root` holds images/ and annotations/."""

    def __init__(self, root: Path):
        self.root = root

    def has_split(self, split: str) -> bool:
        return (self.root / "images" / split).is_dir()

    def list(self, split: str) -> tuple[list[str], set[str]]:
        images = sorted(p.name for p in (self.root / "images" / split).iterdir() if p.is_file())
        ann_dir = self.root / "annotations" / split
        anns = {p.name for p in ann_dir.iterdir()} if ann_dir.is_dir() else set()
        return images, anns

    def path(self, kind: str, split: str, name: str) -> str:
        return str(self.root / kind / split / name)

    def read(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def where(self, path: str) -> str:
        return path

    def close(self) -> None:
        pass

    def size(self, path: str) -> int:
        return os.path.getsize(path)


class _Zip:
    """The official zip: members under ADEChallengeData2016/{images,annotations}/<split>/."""

    def __init__(self, path: Path):
        self.source = path
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise DataError(
                f"{path}: not a readable zip file ({e}); expected ADEChallengeData2016.zip"
            ) from e
        self.members = {i.filename: i for i in self.zip.infolist() if not i.is_dir()}
        if not any(m.startswith(ZIP_ROOT + "images/") for m in self.members):
            top = sorted({m.split("/", 1)[0] for m in self.members})[:5]
            raise DataError(
                f"{path}: the zip has no {ZIP_ROOT}images/ folder (found top-level entries {top}; expected the "
                f"official ADEChallengeData2016.zip with {ZIP_ROOT}{LAYOUT})"
            )

    def _names(self, kind: str, split: str) -> list[str]:
        prefix = f"{ZIP_ROOT}{kind}/{split}/"
        return [
            m[len(prefix) :] for m in self.members if m.startswith(prefix) and "/" not in m[len(prefix) :]
        ]

    def has_split(self, split: str) -> bool:
        return bool(self._names("images", split))

    def list(self, split: str) -> tuple[list[str], set[str]]:
        return sorted(self._names("images", split)), set(self._names("annotations", split))

    def path(self, kind: str, split: str, name: str) -> str:
        return f"{ZIP_ROOT}{kind}/{split}/{name}"

    def read(self, path: str) -> bytes:
        return self.zip.read(path)  # zipfile serialises access to the shared file: safe from threads

    def where(self, path: str) -> str:
        return f"{self.source}:{path}"

    def close(self) -> None:
        self.zip.close()

    def size(self, path: str) -> int:
        return self.members[path].file_size


def open_ade20k(src: str | Path) -> _Folder | _Zip:
    """A folder or zip in the ADE20K layout; raises DataError naming what was expected when it is not."""
    src = Path(src)
    if src.is_file():
        return _Zip(src)
    if not src.is_dir():
        raise DataError(
            f"ADE20K source {src} does not exist (expected ADEChallengeData2016.zip or its folder)"
        )
    for root in (src, src / "ADEChallengeData2016"):
        if (root / "images").is_dir():
            return _Folder(root)
    raise DataError(
        f"ADE20K source {src} has no images/ folder (expected {src}/{LAYOUT}, or the official "
        "ADEChallengeData2016.zip)"
    )


def _list_split(data: _Folder | _Zip, split: str) -> list[tuple[str, str, str]]:
    """(name, image path, annotation path) for every image of `split`, sorted by name."""
    if not data.has_split(split):
        raise DataError(
            f"ADE20K source has no {data.where(data.path('images', split, ''))} folder (expected {LAYOUT}; "
            "evaluation-only folders such as RealLQ usually hold only --splits validation)"
        )
    images, anns = data.list(split)
    examples = []
    for name in images:
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        ann = f"{Path(name).stem}.png"
        if ann not in anns:
            raise DataError(
                f"image {data.where(data.path('images', split, name))} has no annotation "
                f"{data.path('annotations', split, ann)} (expected one label PNG per image)"
            )
        examples.append((name, data.path("images", split, name), data.path("annotations", split, ann)))
    if not examples:
        raise DataError(
            f"ADE20K source: {data.where(data.path('images', split, ''))} holds no .jpg/.png images"
        )
    return examples


def convert_example(name: str, image: bytes, label: bytes, image_path: str, label_path: str):
    """Checks one example and maps its label: -> (name, image bytes unchanged, label PNG of detectron2 ids)."""
    decoded = decode_image(image, image_path)
    try:
        with Image.open(io.BytesIO(label)) as im:
            im.load()
            mode = im.mode
            raw = np.asarray(im)  # (h, w)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable annotation {label_path}: {e} (expected a PNG)") from e
    if mode not in ("L", "P", "I", "I;16") or raw.ndim != 2:
        raise DataError(f"annotation {label_path} has mode {mode} (expected a single-channel 8-bit PNG)")
    if raw.shape != decoded.shape[:2]:
        raise DataError(
            f"annotation {label_path} is {raw.shape[0]}x{raw.shape[1]} but image {image_path} is "
            f"{decoded.shape[0]}x{decoded.shape[1]} (expected equal sizes)"
        )
    if raw.min(initial=0) < 0 or raw.max(initial=0) > NUM_CLASSES:
        bad = np.unique(raw[(raw < 0) | (raw > NUM_CLASSES)])
        raise DataError(
            f"annotation {label_path} has values {bad[:10].tolist()} (expected raw ADE20K labels 0..{NUM_CLASSES}, "
            "0 = unlabeled)"
        )
    ids = map_labels(raw.astype(np.uint8), "ade20k")  # (h, w) raw - 1, 0 -> 255
    buf = io.BytesIO()
    Image.fromarray(ids).save(buf, format="PNG")
    return name, image, buf.getvalue()


def ordered_map(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """fn over items in a thread pool, results in order, at most 4 x workers in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def prepare_ade20k(
    src: str | Path,
    out: str | Path,
    splits: Iterable[str] = ("training", "validation"),
    *,
    workers: int = 4,
    shard_size_mb: float = 512,
    progress: bool = True,
) -> dict[str, dict]:
    """Writes OUT/<split>/ for each split of the ADE20K-layout `src` (folder or zip); returns the metadata.

    Shards: ceil(bytes of the split's files / shard_size_mb), at least one. Re-running replaces each split
    atomically (see records.write_split).
    """
    data = open_ade20k(src)
    results = {}
    try:
        for split in splits:
            examples = _list_split(data, split)
            total = sum(data.size(img) + data.size(ann) for _, img, ann in examples)
            num_shards = max(1, math.ceil(total / (shard_size_mb * 2**20)))

            def load(example, data=data):
                name, img, ann = example
                return convert_example(name, data.read(img), data.read(ann), data.where(img), data.where(ann))

            results[split] = write_split(
                out,
                split,
                ordered_map(load, examples, workers),
                count=len(examples),
                num_shards=num_shards,
                metadata={
                    "dataset": "ade20k",
                    "num_classes": NUM_CLASSES,
                    "classes": list(ADE20K_CLASSES),
                    "label_map": "identity",
                    "ignore_label": 255,
                    "label_encoding": "detectron2 ids: raw ADE label - 1, raw 0 (unlabeled) -> 255",
                    "source": str(Path(src).resolve()),
                },
                progress=progress,
            )
    finally:
        data.close()
    return results
