"""Refign's datasets: on-disk layouts -> explicit example lists (image, label, reference), count checks,
preparation into ArrayRecord splits with a pairing manifest, and Cityscapes rare-class statistics.

Every dataset is listed once into `PairedExample`s whose `name` is the image's path relative to the dataset
root (posix); the pairing the original resolves by string replacements and folder searches at every load
(refign.md section 10) is resolved here, checked, and written to manifest.json at preparation. A source
serves {"image": bytes, "label": bytes (PNG of train ids, b"" if unlabelled), "reference": bytes (b"" if
none), "name": str}; labels in Cityscapes label ids (Cityscapes gtFine_labelIds, RobotCar annos) are mapped
to train ids (ID_TO_TRAINID) when served and when prepared.

Layouts (ROOT is the folder given to --src; names exactly as the originals):
    cityscapes        ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
                      ROOT/gtFine/{train,val}/<city>/<..>_gtFine_labelIds.png (or _labelTrainIds.png)
    acdc              ROOT/rgb_anon/<cond>/{train,val,test}/<REC>/<REC>_frame_<n>_rgb_anon.png
                      ROOT/rgb_anon/<cond>/<split>_ref/<REC>/<REC>_frame_<n>_rgb_ref_anon.png
                      ROOT/gt/<cond>/{train,val}/<REC>/<REC>_frame_<n>_gt_labelTrainIds.png
    darkzurich        train: pairs "train/night/<REC>/<name>,train/day/<REC'>/<name'>" of the pair list ->
                      ROOT/rgb_anon/<entry>_rgb_anon.png; val: ROOT/rgb_anon/val/night/<REC>/<name>_rgb_anon.png,
                      ROOT/rgb_anon/val_ref/day/<REC>_ref/<name>_ref_rgb_anon.png,
                      ROOT/gt/val/night/<REC>/<name>_gt_labelTrainIds.png; test: ROOT/rgb_anon/test/night/..
                      with the reference the first (sorted) ROOT/rgb_anon/test_ref/day/<REC>_ref/<name>_*
    nighttimedriving  ROOT/leftImg8bit/test/night/<name>_leftImg8bit.png,
                      ROOT/gtCoarse_daytime_trainvaltest/test/night/<name>_gtCoarse_labelTrainIds.png
    bdd100k-night     lines "seg/images/<split>/<id>.jpg" of the night list -> ROOT/images/10k/<split>/<id>.jpg,
                      ROOT/labels/sem_seg/masks/<split>/<id>.png
    robotcar          ROOT/segmented_images/{training,validation,testing}/{imgs,annos}/<name>; split "pairs":
                      ROOT/correspondence_data/*.mat (HDF5: im_i_path = reference, im_j_path = target) with the
                      images under ROOT/images/
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .ade20k import ordered_map
from .archives import dataset_root, source_description
from .records import write_split
from .sources import DataError
from .transforms import decode_image

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
NUM_CLASSES = len(CITYSCAPES_CLASSES)
IGNORE = 255
# Cityscapes label id -> train id (cityscapesscripts labels.py; RobotCar's id_to_trainid is the same table).
ID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
_LUT = np.full(256, IGNORE, np.uint8)
_LUT[list(ID_TO_TRAINID)] = list(ID_TO_TRAINID.values())

EXPECTED = {  # split -> number of examples of the full dataset (refign.md section 10)
    "cityscapes": {"train": 2975, "val": 500},
    "acdc": {"train": 1600, "val": 406, "test": 2000},
    "darkzurich": {"train": 2416, "val": 50, "test": 151},
    "nighttimedriving": {"test": 50},
    "bdd100k-night": {"test": 87},
}
ACDC_PER_CONDITION = {  # (train, val, test) per condition; their sums are EXPECTED["acdc"]
    "fog": (400, 100, 500), "night": (400, 106, 500), "rain": (400, 100, 500), "snow": (400, 100, 500),
}  # fmt: skip


def ids_to_train_ids(raw: np.ndarray) -> np.ndarray:
    """Cityscapes label ids (h, w) -> train ids uint8 (h, w), everything outside the 19 classes -> 255."""
    return _LUT[raw.astype(np.uint8)]


@dataclasses.dataclass(frozen=True)
class PairedExample:
    """One example: `name` is the image path relative to the dataset root; `label_map` is "identity" for
    train-id labels or "cityscapes_ids" for label ids."""

    name: str
    image: Path
    label: Path | None = None
    reference: Path | None = None
    label_map: str = "identity"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def read_label(path: Path, label_map: str) -> np.ndarray:
    """A label file -> (h, w) uint8 train ids; a non single-channel or unreadable file raises DataError."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, raw = im.mode, np.asarray(im)  # (h, w)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable label {path}: {e} (expected a single-channel PNG)") from e
    if mode not in ("L", "P", "I", "I;16") or raw.ndim != 2:
        raise DataError(f"label {path} has mode {mode} (expected a single-channel 8-bit PNG)")
    if raw.max(initial=0) > 255:
        raise DataError(f"label {path} has values up to {raw.max()} (expected 8-bit ids)")
    if label_map == "cityscapes_ids":
        return ids_to_train_ids(raw)
    if label_map == "identity":
        return raw.astype(np.uint8)
    raise ValueError(f"unknown label_map {label_map!r}")


class PairedSource:
    """Random access over PairedExamples (grain RandomAccessDataSource), labels served as train-id PNGs."""

    label_map = "identity"

    def __init__(self, examples: Sequence[PairedExample], *, num_classes: int, description: str):
        if not examples:
            raise DataError(f"{description}: no images found")
        self.examples = list(examples)
        self.num_classes = num_classes
        self.description = description

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        label = b""
        if ex.label is not None:
            label = (
                ex.label.read_bytes()
                if ex.label_map == "identity"
                else _png(read_label(ex.label, ex.label_map))
            )
        return {
            "image": ex.image.read_bytes(),
            "label": label,
            "reference": ex.reference.read_bytes() if ex.reference is not None else b"",
            "name": ex.name,
            # full paths, for decoding errors (paired.PairedDecode)
            "image_path": str(ex.image),
            "label_path": str(ex.label or ""),
            "reference_path": str(ex.reference or ""),
        }

    def __repr__(self) -> str:
        return f"PairedSource({self.description}, {len(self)} examples)"


# ----------------------------------------------------------------------------------------------- listing


def _dir(path: Path, what: str, expected: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what}: folder {path} does not exist (expected {expected})")
    return path


def _need(path: Path, what: str, of: Path, count: int | None) -> Path:
    if not path.is_file():
        tail = f" (expected {count} complete examples)" if count else ""
        raise DataError(f"{what}: {path} is missing, needed by {of}{tail}")
    return path


def _check_count(found: int, expected: int | None, what: str, where: Path) -> None:
    if expected is not None and found != expected:
        raise DataError(f"{what}: found {found} examples under {where}, expected {expected}")


def _reverse(files: Iterable[Path], to_image: Callable[[Path], Path], what: str, count: int | None) -> None:
    """Every label/reference file must have its image: a missing image is named."""
    for f in files:
        _need(to_image(f), what, f, count)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _strip(name: str, suffix: str) -> str:
    return name[: -len(suffix)]


def cityscapes(root: str | Path, split: str, *, check_counts: bool = True) -> list[PairedExample]:
    """Cityscapes train/val: image + label (its _gtFine_labelIds.png mapped to train ids, or its
    _gtFine_labelTrainIds.png when only that exists)."""
    root = Path(root)
    what = f"Cityscapes {split}"
    expected = EXPECTED["cityscapes"].get(split) if check_counts else None
    img_dir = _dir(root / "leftImg8bit" / split, what, "ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png")
    gt_dir = _dir(root / "gtFine" / split, what, "ROOT/gtFine/<split>/<city>/*_gtFine_labelIds.png")
    examples = []
    for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = gt_dir / img.parent.name / _strip(img.name, "_leftImg8bit.png")
        ids, train_ids = Path(f"{stem}_gtFine_labelIds.png"), Path(f"{stem}_gtFine_labelTrainIds.png")
        if ids.is_file() or not train_ids.is_file():  # label ids are in the official gtFine archive
            examples.append(
                PairedExample(_rel(img, root), img, _need(ids, what, img, expected), None, "cityscapes_ids")
            )
        else:
            examples.append(PairedExample(_rel(img, root), img, train_ids))
    for suffix in ("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"):
        _reverse(
            sorted(gt_dir.glob(f"*/*{suffix}")),
            lambda g, suffix=suffix: img_dir / g.parent.name / (_strip(g.name, suffix) + "_leftImg8bit.png"),
            what,
            expected,
        )
    _check_count(len(examples), expected, what, img_dir)
    return examples


def acdc(
    root: str | Path, split: str, *, conditions: Sequence[str] | None = None, check_counts: bool = True
) -> list[PairedExample]:
    """ACDC train/val/test of the given conditions (default all four): image + reference (+ label for
    train/val)."""
    root = Path(root)
    conditions = tuple(ACDC_PER_CONDITION) if conditions is None else tuple(conditions)
    what = f"ACDC {split}"
    s = ("train", "val", "test").index(split)
    unknown = set(conditions) - set(ACDC_PER_CONDITION)
    if unknown:
        raise ValueError(f"ACDC conditions must be among {tuple(ACDC_PER_CONDITION)}, got {sorted(unknown)}")
    expected = sum(ACDC_PER_CONDITION[c][s] for c in conditions) if check_counts else None
    labelled = split != "test"
    examples = []
    for cond in conditions:
        img_dir = _dir(
            root / "rgb_anon" / cond / split, what, "ROOT/rgb_anon/<cond>/<split>/<REC>/*_rgb_anon.png"
        )
        ref_dir = _dir(
            root / "rgb_anon" / cond / f"{split}_ref",
            what,
            "ROOT/rgb_anon/<cond>/<split>_ref/<REC>/*_rgb_ref_anon.png",
        )
        gt_dir = root / "gt" / cond / split
        if labelled:
            _dir(gt_dir, what, "ROOT/gt/<cond>/<split>/<REC>/*_gt_labelTrainIds.png (gt_trainval.zip)")
        for img in sorted(img_dir.glob("*/*_rgb_anon.png")):
            stem, rec = _strip(img.name, "_rgb_anon.png"), img.parent.name
            ref = _need(ref_dir / rec / f"{stem}_rgb_ref_anon.png", what, img, expected)
            gt = (
                _need(gt_dir / rec / f"{stem}_gt_labelTrainIds.png", what, img, expected)
                if labelled
                else None
            )
            examples.append(PairedExample(_rel(img, root), img, gt, ref))

        def image_of(f: Path, suffix: str, img_dir=img_dir) -> Path:
            return img_dir / f.parent.name / (_strip(f.name, suffix) + "_rgb_anon.png")

        _reverse(
            sorted(ref_dir.glob("*/*_rgb_ref_anon.png")),
            lambda f: image_of(f, "_rgb_ref_anon.png"),
            what,
            expected,
        )
        if labelled:
            _reverse(
                sorted(gt_dir.glob("*/*_gt_labelTrainIds.png")),
                lambda f: image_of(f, "_gt_labelTrainIds.png"),
                what,
                expected,
            )
    _check_count(len(examples), expected, what, root / "rgb_anon")
    return examples


def read_pair_list(path: str | Path) -> list[tuple[str, str]]:
    """Dark Zurich's zurich_dn_pair_train.csv: lines "train/night/<REC>/<name>,train/day/<REC'>/<name'>"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Dark Zurich pair list {path} does not exist (expected refign's "
            "data_modules/datasets/lists/zurich_dn_pair_train.csv)"
        )
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{path}:{n}: {line!r} is not 'night entry,day entry'")
        pairs.append((parts[0], parts[1]))
    return pairs


def darkzurich(
    root: str | Path, split: str, *, pair_list: str | Path | None = None, check_counts: bool = True
) -> list[PairedExample]:
    """Dark Zurich: train pairs from the pair list; val image + reference + label; test image + reference."""
    root = Path(root)
    what = f"Dark Zurich {split}"
    expected = EXPECTED["darkzurich"].get(split) if check_counts else None
    rgb = _dir(
        root / "rgb_anon", what, "ROOT/rgb_anon/ (Dark_Zurich_train_anon.zip, Dark_Zurich_val_anon.zip)"
    )
    if split == "train":
        if pair_list is None:
            raise DataError(f"{what}: needs the pair list (--pair-list zurich_dn_pair_train.csv)")
        examples = []
        for night, day in read_pair_list(pair_list):
            img = _need(rgb / f"{night}_rgb_anon.png", what, Path(pair_list), expected)
            ref = _need(rgb / f"{day}_rgb_anon.png", what, Path(pair_list), expected)
            examples.append(PairedExample(_rel(img, root), img, None, ref))
        _check_count(len(examples), expected, f"{what} (pair list {pair_list})", rgb)
        return examples
    img_dir = _dir(rgb / split / "night", what, f"ROOT/rgb_anon/{split}/night/<REC>/*_rgb_anon.png")
    ref_root = _dir(rgb / f"{split}_ref" / "day", what, f"ROOT/rgb_anon/{split}_ref/day/<REC>_ref/")
    gt_dir = root / "gt" / split / "night"
    if split == "val":
        _dir(gt_dir, what, "ROOT/gt/val/night/<REC>/*_gt_labelTrainIds.png")
    examples = []
    for img in sorted(img_dir.glob("*/*_rgb_anon.png")):
        stem, rec = _strip(img.name, "_rgb_anon.png"), img.parent.name
        ref_dir = ref_root / f"{rec}_ref"
        if split == "val":
            ref = _need(ref_dir / f"{stem}_ref_rgb_anon.png", what, img, expected)
            gt = _need(gt_dir / rec / f"{stem}_gt_labelTrainIds.png", what, img, expected)
        else:  # the original takes the first file in listdir order starting with "<stem>_"
            found = sorted(ref_dir.glob(f"{stem}_*")) if ref_dir.is_dir() else []
            if not found:
                raise DataError(f"{what}: no reference {ref_dir}/{stem}_*.png for {img}")
            ref, gt = found[0], None
        examples.append(PairedExample(_rel(img, root), img, gt, ref))
    if split == "val":
        _reverse(
            sorted(gt_dir.glob("*/*_gt_labelTrainIds.png")),
            lambda f: img_dir / f.parent.name / (_strip(f.name, "_gt_labelTrainIds.png") + "_rgb_anon.png"),
            what,
            expected,
        )
        _reverse(
            sorted(ref_root.glob("*_ref/*_ref_rgb_anon.png")),
            lambda f: (
                img_dir
                / _strip(f.parent.name, "_ref")
                / (_strip(f.name, "_ref_rgb_anon.png") + "_rgb_anon.png")
            ),
            what,
            expected,
        )
    _check_count(len(examples), expected, what, img_dir)
    return examples


def nighttimedriving(
    root: str | Path, split: str = "test", *, check_counts: bool = True
) -> list[PairedExample]:
    """Nighttime Driving test: image + coarse train-id label."""
    root = Path(root)
    what = f"Nighttime Driving {split}"
    expected = EXPECTED["nighttimedriving"].get(split) if check_counts else None
    img_dir = _dir(
        root / "leftImg8bit" / split / "night", what, "ROOT/leftImg8bit/test/night/*_leftImg8bit.png"
    )
    gt_dir = _dir(
        root / "gtCoarse_daytime_trainvaltest" / split / "night",
        what,
        "ROOT/gtCoarse_daytime_trainvaltest/test/night/*_gtCoarse_labelTrainIds.png",
    )
    examples = []
    for img in sorted(img_dir.glob("*_leftImg8bit.png")):
        gt = _need(
            gt_dir / (_strip(img.name, "_leftImg8bit.png") + "_gtCoarse_labelTrainIds.png"),
            what,
            img,
            expected,
        )
        examples.append(PairedExample(_rel(img, root), img, gt))
    _reverse(
        sorted(gt_dir.glob("*_gtCoarse_labelTrainIds.png")),
        lambda f: img_dir / (_strip(f.name, "_gtCoarse_labelTrainIds.png") + "_leftImg8bit.png"),
        what,
        expected,
    )
    _check_count(len(examples), expected, what, img_dir)
    return examples


def bdd100k_night(
    root: str | Path, split: str = "test", *, night_list: str | Path | None = None, check_counts: bool = True
) -> list[PairedExample]:
    """BDD100k-night test: the images of the night list (refign's images_trainval_night_correct_filenames.txt)."""
    root = Path(root)
    what = f"BDD100k-night {split}"
    expected = EXPECTED["bdd100k-night"].get(split) if check_counts else None
    if night_list is None or not Path(night_list).is_file():
        raise DataError(
            f"{what}: night list {night_list} does not exist (expected refign's "
            "data_modules/datasets/lists/images_trainval_night_correct_filenames.txt, --night-list)"
        )
    examples = []
    for n, line in enumerate(Path(night_list).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split("/")
        if len(parts) != 4 or parts[:2] != ["seg", "images"]:
            raise DataError(f"{night_list}:{n}: {line!r} is not 'seg/images/<split>/<id>.jpg'")
        part, name = parts[2], parts[3]
        img = _need(root / "images" / "10k" / part / name, what, Path(night_list), expected)
        gt = _need(
            root / "labels" / "sem_seg" / "masks" / part / (Path(name).stem + ".png"), what, img, expected
        )
        examples.append(PairedExample(_rel(img, root), img, gt))
    _check_count(len(examples), expected, f"{what} (night list {night_list})", root / "images" / "10k")
    return examples


ROBOTCAR_SPLITS = {"train": "training", "val": "validation", "test": "testing"}


def robotcar(root: str | Path, split: str, *, check_counts: bool = True) -> list[PairedExample]:
    """RobotCar segmentation train/val/test: image + anno (Cityscapes label ids, mapped by ID_TO_TRAINID).

    The original ships no counts for these splits, so only the image/anno pairing is checked."""
    root = Path(root)
    what = f"RobotCar {split}"
    base = root / "segmented_images" / ROBOTCAR_SPLITS[split]
    img_dir = _dir(base / "imgs", what, f"ROOT/segmented_images/{ROBOTCAR_SPLITS[split]}/imgs/<name>")
    ann_dir = _dir(base / "annos", what, f"ROOT/segmented_images/{ROBOTCAR_SPLITS[split]}/annos/<name>")
    examples = [
        PairedExample(
            _rel(img, root), img, _need(ann_dir / img.name, what, img, None), None, "cityscapes_ids"
        )
        for img in sorted(p for p in img_dir.iterdir() if p.is_file())
    ]
    _reverse(sorted(p for p in ann_dir.iterdir() if p.is_file()), lambda f: img_dir / f.name, what, None)
    return examples


def read_mat_pair(path: Path) -> tuple[str, str]:
    """A RobotCar correspondence .mat (MATLAB v7.3 = HDF5) -> (reference path im_i_path, target path
    im_j_path), each stored as a column of character codes."""
    try:
        import h5py
    except ImportError as e:
        raise DataError(f"reading {path} needs h5py (pip install h5py): RobotCar .mat files are HDF5") from e
    try:
        with h5py.File(path, "r") as f:
            paths = [f[k][()] if k in f else None for k in ("im_i_path", "im_j_path")]
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 .mat file ({e})") from e
    for key, codes in zip(("im_i_path", "im_j_path"), paths, strict=True):
        if codes is None:
            raise DataError(f"{path}: has no {key} (expected im_i_path and im_j_path character arrays)")
    ref, img = ("".join(chr(int(c)) for c in np.asarray(codes).ravel()) for codes in paths)
    return ref, img


def robotcar_pairs(
    root: str | Path, split: str = "pairs", *, check_counts: bool = True
) -> list[PairedExample]:
    """RobotCar unlabelled training pairs: ROOT/correspondence_data/*.mat -> target ROOT/images/<im_j_path>
    with reference ROOT/images/<im_i_path>, resolved once (the original decodes the .mat at every load)."""
    root = Path(root)
    what = "RobotCar pairs"
    corr = _dir(root / "correspondence_data", what, "ROOT/correspondence_data/*.mat")
    mats = sorted(corr.glob("*.mat"))
    if not mats:
        raise DataError(f"{what}: {corr} holds no .mat files")
    examples = []
    for mat in mats:
        ref, img = read_mat_pair(mat)
        reference = _need(root / "images" / ref, what, mat, None)
        image = _need(root / "images" / img, what, mat, None)
        examples.append(PairedExample(_rel(image, root), image, None, reference))
    return examples


def _robotcar(root: str | Path, split: str, *, check_counts: bool = True) -> list[PairedExample]:
    if split == "pairs":
        return robotcar_pairs(root, split, check_counts=check_counts)
    return robotcar(root, split, check_counts=check_counts)


LISTERS: dict[str, Callable[..., list[PairedExample]]] = {
    "cityscapes": cityscapes,
    "acdc": acdc,
    "darkzurich": darkzurich,
    "nighttimedriving": nighttimedriving,
    "bdd100k-night": bdd100k_night,
    "robotcar": _robotcar,
}
DEFAULT_SPLITS = {
    "cityscapes": ("train", "val"),
    "acdc": ("train", "val", "test"),
    "darkzurich": ("train", "val", "test"),
    "nighttimedriving": ("test",),
    "bdd100k-night": ("test",),
    "robotcar": ("train", "val", "test", "pairs"),
}


def paired_source(
    kind: str, root: str | Path, split: str, *, num_classes: int = NUM_CLASSES, **options
) -> PairedSource:
    """The split's prepared records when ROOT/<split>/records.json exists, else the on-disk layout of `kind`
    (options go to its lister, e.g. check_counts=False for the synthetic dataset)."""
    if kind not in LISTERS:
        raise ValueError(f"kind must be one of {tuple(LISTERS)}, got {kind!r}")
    from . import records

    if records.has_records(root, split):
        source = records.RecordSource(records.split_dir(root, split), num_classes=num_classes)
        if source.metadata["dataset"] != kind:
            raise DataError(f"{source.description}: prepared from {source.metadata['dataset']}, not {kind!r}")
        return source
    examples = LISTERS[kind](root, split, **options)
    return PairedSource(examples, num_classes=num_classes, description=f"{kind} {root} [{split}]")


# ------------------------------------------------------------------------------------------ preparation


def class_stats(label: np.ndarray, num_classes: int) -> dict[int, int]:
    """{train id: pixel count} over the classes present (ignore excluded)."""
    counts = np.bincount(label.ravel(), minlength=256)[:num_classes]
    return {int(c): int(n) for c, n in enumerate(counts) if n > 0}


def rcs_files(names: Sequence[str], stats: Sequence[dict[int, int]]) -> dict[str, bytes]:
    """Rare-class sampling statistics in the layout of refign/DAFormer's, keyed by relative name:
    sample_class_stats.json = [{"file": name, "<train id>": count, ...}] (classes present) and
    samples_with_class.json = {"<train id>": [[name, count], ...]}."""
    per_image = [{"file": n, **{str(c): k for c, k in s.items()}} for n, s in zip(names, stats, strict=True)]
    with_class: dict[str, list] = {}
    for n, s in zip(names, stats, strict=True):
        for c, k in s.items():
            with_class.setdefault(str(c), []).append([n, k])
    with_class = dict(sorted(with_class.items(), key=lambda kv: int(kv[0])))
    return {
        "sample_class_stats.json": json.dumps(per_image).encode(),
        "samples_with_class.json": json.dumps(with_class).encode(),
    }


def convert(ex: PairedExample, num_classes: int) -> tuple[tuple, dict[int, int] | None]:
    """Checks one example (image, reference and label decode; sizes agree; label ids valid) -> (record tuple
    (name, image bytes, label PNG bytes, reference bytes | None), class stats of the label or None)."""
    image = ex.image.read_bytes()
    h, w = decode_image(image, str(ex.image)).shape[:2]
    reference = None
    if ex.reference is not None:
        reference = ex.reference.read_bytes()
        decode_image(reference, str(ex.reference))
    label, stats = b"", None
    if ex.label is not None:
        ids = read_label(ex.label, ex.label_map)
        if ids.shape != (h, w):
            raise DataError(
                f"label {ex.label} is {ids.shape[0]}x{ids.shape[1]} but image {ex.image} is {h}x{w}"
            )
        bad = np.unique(ids[(ids >= num_classes) & (ids != IGNORE)])
        if bad.size:
            raise DataError(
                f"label {ex.label} has train ids {bad[:10].tolist()} (expected 0..{num_classes - 1} and {IGNORE})"
            )
        label = ex.label.read_bytes() if ex.label_map == "identity" else _png(ids)
        stats = class_stats(ids, num_classes)
    return (ex.name, image, label, reference), stats


def manifest(kind: str, split: str, root: Path, examples: Sequence[PairedExample], source: str) -> bytes:
    """manifest.json: the examples in record order, paths relative to the dataset root (in `source`)."""

    def rel(p: Path | None) -> str | None:
        return None if p is None else _rel(p, root)

    rows = [
        {"name": e.name, "image": rel(e.image), "label": rel(e.label), "reference": rel(e.reference)}
        for e in examples
    ]
    return json.dumps(
        {"dataset": kind, "split": split, "source": source, "examples": rows}, indent=0
    ).encode()


def prepare(
    kind: str,
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    splits: Iterable[str] | None = None,
    *,
    num_classes: int = NUM_CLASSES,
    workers: int = 4,
    shard_size_mb: float = 512,
    progress: bool = True,
    **options,
) -> dict[str, dict]:
    """Writes OUT/<split>/ (records, records.json, manifest.json; Cityscapes train also the rare-class
    statistics) for each split of dataset `kind` at SRC (the extracted folder or the zip archives); every
    split is listed and checked before anything is written. Returns the metadata per split."""
    with dataset_root(kind, src, out, progress) as root:
        source = source_description(src)
        return _prepare(
            kind, root, source, out, splits, num_classes, workers, shard_size_mb, progress, options
        )


def _prepare(
    kind, root, source, out, splits, num_classes, workers, shard_size_mb, progress, options
) -> dict[str, dict]:
    splits = list(splits or DEFAULT_SPLITS[kind])
    listed = {split: LISTERS[kind](root, split, **options) for split in splits}
    results = {}
    for split, examples in listed.items():
        total = sum(
            sum(p.stat().st_size for p in (e.image, e.label, e.reference) if p is not None) for e in examples
        )
        stats: list = []

        def encoded(examples=examples, stats=stats):
            for record, s in ordered_map(
                functools.partial(convert, num_classes=num_classes), examples, workers
            ):
                stats.append(s)
                yield record

        def extra(split=split, examples=examples, stats=stats):
            files = {"manifest.json": manifest(kind, split, root, examples, source)}
            if kind == "cityscapes" and split == "train":
                files.update(rcs_files([e.name for e in examples], stats))
            return files

        results[split] = write_split(
            out,
            split,
            encoded(),
            count=len(examples),
            num_shards=max(1, math.ceil(total / (shard_size_mb * 2**20))),
            metadata={
                "dataset": kind,
                "num_classes": num_classes,
                "classes": list(CITYSCAPES_CLASSES) if num_classes == NUM_CLASSES else None,
                "label_map": "identity",
                "ignore_label": IGNORE,
                "label_encoding": "train ids (Cityscapes), 255 = ignore",
                "paired": any(e.reference is not None for e in examples),
                "source": source,
            },
            progress=progress,
            extra_files=extra,
        )
    return results
