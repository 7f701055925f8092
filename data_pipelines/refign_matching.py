"""Matching datasets of UAWarpC (refign.md 3.8, 3.10, 10): MegaDepth training/validation pairs from the D2-Net
preprocessing, the MegaDepth 1600-pair test set and the RobotCar 6511-pair test set, listed once into
pairs with their pixel correspondences and prepared into records (image = target, reference = source,
matches = (n, 4) float32 x_ref, y_ref, x, y); MatchDecode turns a record back into arrays, resized as
refign loads them.

Layouts:
    megadepth train/val  ROOT/scene_info/<scene>.0.npz (the pre-made D2-Net download) or <scene>.npz (what
                         current D2-Net preprocess_scene.py writes), with image_paths / depth_paths relative
                         to ROOT, overlap_matrix and points3D_id_to_2D; the scenes come from your copy of
                         refign's lists/{train,validation}_scenes_MegaDepth.txt
    megadepth test       ROOT/Test/test1600Pairs.csv and ROOT/Test/test1600Pairs/<scene>/<image>
    robotcar-matching    ROOT/test6511.csv and ROOT/images/<scene>/<image>
The csv columns: scene ('/' = none), source_image, target_image, XA, YA, XB, YB (';'-separated floats;
A = source = reference, B = target = image).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .ade20k import ordered_map
from .archives import dataset_root, source_description
from .records import write_split
from .refign_sources import _check_count, _dir, _need, _rel
from .sources import DataError
from .transforms import decode_image

MEGADEPTH_PAIRS_PER_SCENE = {"train": 300, "val": 25}
EXPECTED = {"megadepth": {"test": 1600}, "robotcar-matching": {"test": 6511}}
MIN_OVERLAP, MAX_OVERLAP, SEED = 0.3, 1.0, 400


@dataclasses.dataclass(frozen=True)
class MatchPair:
    """A target image, its reference (source) image and their correspondences (n, 4) x_ref, y_ref, x, y."""

    name: str
    image: Path
    reference: Path
    matches: np.ndarray


def encode_matches(matches: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(matches, np.float32).reshape(-1, 4), allow_pickle=False)
    return buf.getvalue()


def decode_matches(data: bytes) -> np.ndarray:
    """A record's "matches" bytes -> (n, 4) float32 (x_ref, y_ref, x, y) in pixels of the stored images."""
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclasses.dataclass(frozen=True)
class MatchDecode:
    """Record -> {"image" (h, w, 3) uint8 target, "reference" (h, w, 3) uint8 source, "matches" (n, 4)
    float32 x_ref, y_ref, x, y, "name"}; with `size` (h, w) both images are resized to it with PIL lanczos
    (aspect not kept) and the points scaled by size / original size per axis, as refign's MegaDepth and
    RobotCar-matching loaders do."""

    size: tuple[int, int] | None = None

    def __call__(self, record: dict) -> dict:
        name = record["name"]
        image = decode_image(record["image"], name)  # (h, w, 3)
        ref = decode_image(record["reference"], f"reference of {name}")  # (h', w', 3)
        matches = decode_matches(record["matches"]).copy()  # (n, 4)
        if self.size is not None:
            h, w = self.size
            for arr, (x, y) in ((ref, (0, 1)), (image, (2, 3))):
                matches[:, x] *= w / arr.shape[1]
                matches[:, y] *= h / arr.shape[0]
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.LANCZOS))
            ref = np.asarray(Image.fromarray(ref).resize((w, h), Image.LANCZOS))
        return {"image": image, "reference": ref, "matches": matches, "name": name}


def scene_info_path(root: Path, scene: str) -> Path | None:
    """ROOT/scene_info/<scene>.0.npz or, failing that, <scene>.npz (the D2-Net name trap); None if neither."""
    for name in (f"{scene}.0.npz", f"{scene}.npz"):
        if (root / "scene_info" / name).is_file():
            return root / "scene_info" / name
    return None


def read_scene_list(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"MegaDepth scene list {path} does not exist (expected refign's data_modules/datasets/lists/"
            "train_scenes_MegaDepth.txt or validation_scenes_MegaDepth.txt)"
        )
    return path.read_text().split()


def megadepth_pairs(
    root: str | Path,
    split: str,
    *,
    scene_list: str | Path | None = None,
    skip_missing_scenes: bool = False,
    check_counts: bool = True,
) -> list[MatchPair]:
    """MegaDepth train/val pairs as refign samples them once: per scene the valid images (image and depth
    path set), pairs (i, j) with overlap in (0.3, 1], at most 300 (train) / 25 (val) of them chosen with a
    fresh RandomState(400).choice, then all pairs shuffled with RandomState(400). The matches are the 3-D
    points both images see (sorted by point id). image_path1 = source = reference, image_path2 = image."""
    root = Path(root)
    what = f"MegaDepth {split}"
    if split == "test":
        return match_csv(root / "Test" / "test1600Pairs.csv", root / "Test" / "test1600Pairs", what,
                         EXPECTED["megadepth"]["test"] if check_counts else None)  # fmt: skip
    if scene_list is None:
        raise DataError(f"{what}: needs the scene list (--{split}-scenes)")
    scenes = read_scene_list(scene_list)
    _dir(root / "scene_info", what, "ROOT/scene_info/<scene>.0.npz or <scene>.npz (D2-Net preprocessing)")
    num = MEGADEPTH_PAIRS_PER_SCENE[split]
    items = []
    for scene in scenes:
        path = scene_info_path(root, scene)
        if path is None:
            if skip_missing_scenes:
                continue
            raise DataError(
                f"{what}: {root / 'scene_info' / (scene + '.0.npz')} (or {scene}.npz) is missing, scene {scene} of "
                f"{scene_list} (expected {len(scenes)} scene files; --skip-missing-scenes skips them as refign does)"
            )
        info = np.load(path, allow_pickle=True)
        valid = np.array([p is not None for p in info["image_paths"]]) & np.array(
            [p is not None for p in info["depth_paths"]]
        )
        paths = info["image_paths"][valid]
        points = info["points3D_id_to_2D"][valid]
        mat = info["overlap_matrix"][valid][:, valid]
        pairs = np.stack(np.where((mat > MIN_OVERLAP) & (mat <= MAX_OVERLAP)), -1)  # (p, 2)
        if len(pairs) > num:
            pairs = pairs[np.random.RandomState(SEED).choice(len(pairs), num, replace=False)]
        for i, j in pairs:
            common = sorted(points[i].keys() & points[j].keys())
            matches = np.array([[*points[i][k], *points[j][k]] for k in common], np.float32).reshape(-1, 4)
            ref, img = root / str(paths[i]), root / str(paths[j])
            items.append(MatchPair(f"{_rel(ref, root)},{_rel(img, root)}", img, ref, matches))
    np.random.RandomState(SEED).shuffle(items)
    for item in items:
        _need(item.reference, what, root / "scene_info", None)
        _need(item.image, what, root / "scene_info", None)
    return items


def _floats(text: str, where: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in text.split(";")], np.float32)
    except ValueError as e:
        raise DataError(f"{where}: {e} (expected ';'-separated numbers)") from e


def match_csv(csv_path: Path, images: Path, what: str, expected: int | None) -> list[MatchPair]:
    """Pairs of a test csv (columns scene, source_image, target_image, XA, YA, XB, YB)."""
    if not csv_path.is_file():
        raise DataError(f"{what}: {csv_path} does not exist (expected the csv of the test pairs)")
    _dir(images, what, f"{images}/<scene>/<image>")
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"scene", "source_image", "target_image", "XA", "YA", "XB", "YB"}
    if rows and not need <= set(rows[0]):
        raise DataError(f"{what}: {csv_path} has columns {sorted(rows[0])}, expected {sorted(need)}")
    pairs = []
    for n, row in enumerate(rows, 2):
        scene = "." if row["scene"] == "/" else row["scene"]
        ref = _need(images / scene / row["source_image"], what, csv_path, expected)
        img = _need(images / scene / row["target_image"], what, csv_path, expected)
        where = f"{csv_path}:{n}"
        xa, ya, xb, yb = (_floats(row[k], where) for k in ("XA", "YA", "XB", "YB"))
        if not len(xa) == len(ya) == len(xb) == len(yb):
            raise DataError(f"{where}: XA, YA, XB, YB hold {len(xa)}, {len(ya)}, {len(xb)}, {len(yb)} values")
        pairs.append(
            MatchPair(f"{_rel(ref, images)},{_rel(img, images)}", img, ref, np.stack([xa, ya, xb, yb], -1))
        )
    _check_count(len(pairs), expected, f"{what} ({csv_path})", images)
    return pairs


def robotcar_matching(root: str | Path, split: str = "test", *, check_counts: bool = True) -> list[MatchPair]:
    """RobotCar matching test: ROOT/test6511.csv with the images under ROOT/images/."""
    root = Path(root)
    expected = EXPECTED["robotcar-matching"]["test"] if check_counts else None
    return match_csv(root / "test6511.csv", root / "images", f"RobotCar matching {split}", expected)


LISTERS = {"megadepth": megadepth_pairs, "robotcar-matching": robotcar_matching}
DEFAULT_SPLITS = {"megadepth": ("train", "val", "test"), "robotcar-matching": ("test",)}


def _convert(pair: MatchPair) -> tuple:
    image, reference = pair.image.read_bytes(), pair.reference.read_bytes()
    decode_image(image, str(pair.image))
    decode_image(reference, str(pair.reference))
    return pair.name, image, b"", reference, encode_matches(pair.matches)


def prepare_matching(
    kind: str,
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    splits: Iterable[str] | None = None,
    *,
    scene_lists: dict[str, str | Path] | None = None,
    skip_missing_scenes: bool = False,
    workers: int = 4,
    shard_size_mb: float = 512,
    progress: bool = True,
) -> dict[str, dict]:
    """Writes OUT/<split>/ (records with image, reference and matches; manifest.json) for each split of
    `kind` (megadepth | robotcar-matching) at SRC (the folder or zip archives); every split is listed and
    checked first."""
    with dataset_root(kind, src, out, progress) as root:
        source = source_description(src)
        return _prepare(
            kind,
            root,
            source,
            out,
            splits,
            scene_lists,
            skip_missing_scenes,
            workers,
            shard_size_mb,
            progress,
        )


def _prepare(
    kind, root, source, out, splits, scene_lists, skip_missing_scenes, workers, shard_size_mb, progress
):
    splits = list(splits or DEFAULT_SPLITS[kind])
    listed: dict[str, Sequence[MatchPair]] = {}
    for split in splits:
        if kind == "megadepth":
            listed[split] = megadepth_pairs(
                root,
                split,
                scene_list=(scene_lists or {}).get(split),
                skip_missing_scenes=skip_missing_scenes,
            )
        else:
            listed[split] = robotcar_matching(root, split)
    results = {}
    for split, pairs in listed.items():
        total = sum(p.image.stat().st_size + p.reference.stat().st_size for p in pairs)
        rows = [
            {"name": p.name, "image": _rel(p.image, root), "reference": _rel(p.reference, root),
             "matches": len(p.matches)}
            for p in pairs
        ]  # fmt: skip
        manifest = json.dumps({"dataset": kind, "split": split, "source": source, "examples": rows}, indent=0)
        results[split] = write_split(
            out,
            split,
            ordered_map(_convert, pairs, workers),
            count=len(pairs),
            num_shards=max(1, math.ceil(total / (shard_size_mb * 2**20))),
            metadata={
                "dataset": kind,
                "num_classes": 0,
                "classes": [],
                "label_map": "identity",
                "ignore_label": 255,
                "label_encoding": "none (matching pairs: image = target, reference = source, matches = x_ref, "
                "y_ref, x, y)",
                "paired": True,
                "source": source,
            },
            progress=progress,
            extra_files={"manifest.json": manifest.encode()},
        )
    return results
