"""Paired grain pipelines for Refign: image + reference (+ label) with one crop and one flip, the source +
target batch of UDA training with optional rare-class sampling, and the evaluation resizes of refign.md 9.

Training streams follow pipeline.py: every random choice comes from grain's rng for (seed, global index),
global batch t holds global indices [t*B, (t+1)*B) whatever the number of processes, process p reads its
contiguous block, and the iterator state ({"next_index": ...}) resumes the stream exactly.

UDA batch (this process's part), the keys of refign's training step (refign.md 7):
    image_src (bs, h, w, 3) uint8, label_src (bs, h, w) uint8 train ids (255 = ignore),
    image_trg (bt, h, w, 3) uint8, image_ref (bt, h, w, 3) uint8 (target and reference share crop and flip),
    with a labelled target (RobotCar, refign.md O8) also image_lab (bl, h, w, 3) uint8, label_lab (bl, h, w)
    uint8, blank_lab (bl, h, w) bool (rotated-in pixels, zeroed after normalisation)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from PIL import Image

from .pipeline import ProcessBlock, _check_batch
from .sources import DataError
from .transforms import IGNORE, decode_image, decode_label

_BIG = np.iinfo(np.int64).max // 2


def _resize(image: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), resample))


@dataclasses.dataclass(frozen=True)
class PairedDecode:
    """Record -> {"image" (h, w, 3) uint8, "label" (h, w) uint8 if labelled, "reference" (h, w, 3) uint8 if
    paired, "name"}. With `size` (h, w) every image is resized to it at load as refign's `dims` (PIL bilinear
    for images, nearest for labels); otherwise a reference of another size is resized to the image's.
    Decoding errors name the record's "image_path" / "label_path" / "reference_path" (full paths) when it
    has them, else its name."""

    num_classes: int
    size: tuple[int, int] | None = None

    def __call__(self, record: dict) -> dict:
        name = record["name"]
        where = record.get("image_path") or name  # errors name the file (the record, for prepared records)
        image = decode_image(record["image"], where)  # (h, w, 3)
        size = tuple(self.size) if self.size is not None else image.shape[:2]
        out = {"image": _resize(image, size, Image.BILINEAR), "name": name}
        if record.get("label"):
            label_where = record.get("label_path") or f"of {where}"
            label = decode_label(record["label"], label_where, "identity", self.num_classes)  # (h, w)
            if label.shape != image.shape[:2]:
                raise DataError(
                    f"label {label_where} is {label.shape} but the image {where} is {image.shape[:2]}"
                )
            out["label"] = _resize(label, size, Image.NEAREST)
        if record.get("reference"):
            ref = decode_image(record["reference"], record.get("reference_path") or f"reference of {where}")
            out["reference"] = _resize(ref, size, Image.BILINEAR)  # (h, w, 3)
        return out


def crop_offsets(
    label: np.ndarray | None, shape: tuple[int, int], crop: tuple[int, int], cat_max_ratio: float, rng
) -> tuple[int, int]:
    """refign RandomCrop: offsets uniform in 0..H-h inclusive; with cat_max_ratio < 1, up to 10 redraws until
    the crop holds more than one class and no class covers cat_max_ratio of its labelled pixels."""
    (h, w), (ch, cw) = shape, crop
    for _ in range(10):
        y, x = int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))
        if label is None or cat_max_ratio >= 1.0:
            break
        part = label[y : y + ch, x : x + cw]
        _, counts = np.unique(part[part != IGNORE], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y, x


@dataclasses.dataclass(frozen=True)
class PairedAugment:
    """One random crop and one horizontal flip applied to image, reference and label alike (crops larger
    than the image are padded: images with 0, labels with 255)."""

    crop: tuple[int, int]
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.5

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        ch, cw = self.crop
        label = example.get("label")
        y, x = crop_offsets(label, example["image"].shape[:2], self.crop, self.cat_max_ratio, rng)
        flip = rng.random() < self.flip_prob
        out = {"name": example["name"]}
        for key in ("image", "reference", "label"):
            if key not in example:
                continue
            a = example[key][y : y + ch, x : x + cw]
            if flip:
                a = a[:, ::-1]
            pad = ((0, ch - a.shape[0]), (0, cw - a.shape[1])) + ((0, 0),) * (a.ndim - 2)
            if pad[0][1] or pad[1][1]:
                a = np.pad(a, pad, constant_values=IGNORE if key == "label" else 0)
            out[key] = np.ascontiguousarray(a)
        return out


# ------------------------------------------------------------------ labelled target (RobotCar, refign.md O8)


def _blend(a: np.ndarray, b: np.ndarray, ratio: float) -> np.ndarray:
    """torchvision `_blend` on uint8: (ratio a + (1 - ratio) b) in fp32, clamped to [0, 255], truncated."""
    out = np.float32(ratio) * a.astype(np.float32) + np.float32(1.0 - ratio) * b.astype(np.float32)
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    """torchvision `rgb_to_grayscale` on uint8: 0.2989 r + 0.587 g + 0.114 b in fp32, truncated. (h, w, 1)"""
    r, g, b = (image[..., i].astype(np.float32) for i in range(3))
    return (np.float32(0.2989) * r + np.float32(0.587) * g + np.float32(0.114) * b).astype(np.uint8)[
        ..., None
    ]


def _adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision `adjust_hue` on uint8: /255, RGB -> HSV, h = (h + factor) mod 1, HSV -> RGB, *255 truncated."""
    x = image.astype(np.float32) / np.float32(255.0)  # (h, w, 3)
    maxc, minc = x.max(-1), x.min(-1)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / np.where(eqc, np.float32(1.0), maxc)
    div = np.where(eqc, np.float32(1.0), cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (np.float32(2.0) + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (np.float32(4.0) + gc - rc)
    h = np.fmod((hr + hg + hb) / np.float32(6.0) + np.float32(1.0), np.float32(1.0))
    h = np.mod(h + np.float32(factor), np.float32(1.0))
    v = maxc
    i = np.floor(h * np.float32(6.0))
    f = h * np.float32(6.0) - i
    i = i.astype(np.int32) % 6
    p = np.clip(v * (np.float32(1.0) - s), 0.0, 1.0)
    q = np.clip(v * (np.float32(1.0) - s * f), 0.0, 1.0)
    t = np.clip(v * (np.float32(1.0) - s * (np.float32(1.0) - f)), 0.0, 1.0)
    table = np.stack(
        [np.stack(c, -1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], -1
    )  # (h, w, 6 sectors, 3 channels)
    rgb = np.take_along_axis(table, i[..., None, None], axis=-2)[..., 0, :]  # (h, w, 3)
    return (rgb * np.float32(255.0)).astype(np.uint8)


def torchvision_color_jitter(image: np.ndarray, order: Sequence[int], factors: Sequence[float]) -> np.ndarray:
    """torchvision ColorJitter on a uint8 (h, w, 3) image with given draws: `order` a permutation of
    (0 brightness, 1 contrast, 2 saturation, 3 hue), `factors` (brightness, contrast, saturation, hue)."""
    for op in order:
        factor = float(factors[op])
        if op == 0:
            image = _blend(image, np.zeros_like(image), factor)
        elif op == 1:
            mean = np.float32(_grey(image).astype(np.float32).mean(dtype=np.float64))
            image = _blend(image, np.full_like(image, mean, dtype=np.float32), factor)
        elif op == 2:
            image = _blend(image, _grey(image), factor)
        else:
            image = _adjust_hue(image, factor)
    return image


def _rotate(image: np.ndarray, angle: float, fill) -> np.ndarray:
    """torchvision rotate of a PIL image: nearest, about the centre, same size, `fill` outside."""
    return np.asarray(Image.fromarray(image).rotate(angle, Image.NEAREST, expand=False, fillcolor=fill))


@dataclasses.dataclass(frozen=True)
class LabelledTargetAugment:
    """refign's labelled RobotCar transforms (refign.md O8): RandomRotation(rotation) of image (fill 0) and
    label (fill 255) with the rotated-in area as "blank" (h, w) bool (the step zeroes it after
    normalisation), a random crop without the cat-max check, torchvision ColorJitter(*jitter), a flip."""

    crop: tuple[int, int]
    rotation: float = 10.0
    jitter: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.1)
    flip_prob: float = 0.5

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        if "label" not in example:
            raise DataError(f"labelled target {example['name']}: no label (a labelled split is expected)")
        angle = float(rng.uniform(-self.rotation, self.rotation))
        h, w = example["image"].shape[:2]
        rotated = {
            "name": example["name"],
            "image": _rotate(example["image"], angle, (0, 0, 0)),  # (h, w, 3)
            "label": _rotate(example["label"], angle, IGNORE),  # (h, w)
            "blank": _rotate(np.zeros((h, w), np.uint8), angle, 1),  # (h, w) 1 = rotated in
        }
        (ch, cw), fills = self.crop, {"image": 0, "label": IGNORE, "blank": 1}
        y, x = crop_offsets(None, (h, w), self.crop, 1.0, rng)
        out = {"name": example["name"]}
        for key, fill in fills.items():
            a = rotated[key][y : y + ch, x : x + cw]
            pad = ((0, ch - a.shape[0]), (0, cw - a.shape[1])) + ((0, 0),) * (a.ndim - 2)
            out[key] = np.pad(a, pad, constant_values=fill) if pad[0][1] or pad[1][1] else a
        b, c, s, hue = self.jitter
        order = rng.permutation(4)
        factors = (
            rng.uniform(max(0.0, 1 - b), 1 + b),
            rng.uniform(max(0.0, 1 - c), 1 + c),
            rng.uniform(max(0.0, 1 - s), 1 + s),
            rng.uniform(-hue, hue),
        )
        out["image"] = torchvision_color_jitter(out["image"], order, factors)  # (ch, cw, 3)
        if rng.random() < self.flip_prob:
            out = {k: np.ascontiguousarray(v[:, ::-1]) if k != "name" else v for k, v in out.items()}
        out["blank"] = out["blank"].astype(bool)
        return out


def _examples(source, decode: PairedDecode, augment, seed: int) -> grain.MapDataset:
    return grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).map(decode).random_map(augment)


def paired_train_dataset(
    source,
    augment: PairedAugment,
    *,
    seed: int,
    global_batch: int,
    size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    num_workers: int = 0,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Infinite batches {"image" (b, h, w, 3), "reference" (b, h, w, 3) if paired, "label" (b, h, w) if
    labelled, "name"} for this process; one crop and one flip per example shared by its arrays."""
    local = _check_batch(global_batch, process_count)
    decode = PairedDecode(num_classes or source.num_classes, size)
    ds = grain.MapDataset.range(_BIG).map(
        ProcessBlock(_examples(source, decode, augment, seed), global_batch, process_index, process_count)
    )
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    it = it.batch(local, drop_remainder=True)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


# --------------------------------------------------------------------------------- rare-class sampling


def source_names(source) -> list[str]:
    """Example names in index order: a PairedSource's examples, or a prepared split's manifest.json."""
    if hasattr(source, "examples"):
        return [e.name for e in source.examples]
    path = Path(source.directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{source.description}: {path} is missing (re-run scripts/prepare_data.py)")
    return [row["name"] for row in json.loads(path.read_text())["examples"]]


def rcs_class_probs(sample_class_stats: Sequence[dict], temperature: float) -> tuple[list[int], np.ndarray]:
    """Classes sorted by total pixel count (ascending) and P(c) = softmax((1 - f_c) / temperature), f_c the
    class's share of all counted pixels (DAFormer/refign get_rcs_class_probs)."""
    totals: dict[int, int] = {}
    for s in sample_class_stats:
        for c, n in s.items():
            if c != "file":
                totals[int(c)] = totals.get(int(c), 0) + int(n)
    classes = sorted(totals, key=lambda c: totals[c])
    freq = np.array([totals[c] for c in classes], np.float64)
    logits = (1 - freq / freq.sum()) / temperature
    p = np.exp(logits - logits.max())
    return classes, p / p.sum()


@dataclasses.dataclass(frozen=True)
class RareClassSampling:
    """Example i (the stream index, as in refign the dataset index is ignored): draw a class c by
    rcs_class_probs, then an image with more than `min_pixels` pixels of c, then load and augment it again
    (up to 10 times) until the crop has more than min_pixels * min_crop_ratio pixels of c."""

    source: object
    decode: PairedDecode
    augment: PairedAugment
    classes: tuple[int, ...]
    probs: tuple[float, ...]
    indices: tuple[tuple[int, ...], ...]  # per class, the images with enough pixels of it
    seed: int
    min_pixels: int
    min_crop_ratio: float

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, 0x5C5, int(i)])
        k = int(rng.choice(len(self.classes), p=np.asarray(self.probs)))
        c, index = self.classes[k], int(rng.choice(self.indices[k]))
        decoded = self.decode(self.source[index])
        sample = self.augment(decoded, rng)
        if self.min_crop_ratio > 0:
            for _ in range(10):
                if (sample["label"] == c).sum() > self.min_pixels * self.min_crop_ratio:
                    break
                sample = self.augment(decoded, rng)
        return sample

    def __len__(self) -> int:
        return _BIG


def rare_class_sampling(
    source,
    stats_dir: str | Path,
    decode: PairedDecode,
    augment: PairedAugment,
    *,
    seed: int,
    temperature: float = 0.01,
    min_pixels: int = 3000,
    min_crop_ratio: float = 0.5,
) -> RareClassSampling:
    """RareClassSampling over `source` from STATS_DIR/sample_class_stats.json and samples_with_class.json
    (written by prepare_data.py cityscapes into OUT/train, keyed by the examples' names)."""
    stats_dir = Path(stats_dir)
    try:
        stats = json.loads((stats_dir / "sample_class_stats.json").read_text())
        with_class = json.loads((stats_dir / "samples_with_class.json").read_text())
    except OSError as e:
        raise DataError(f"rare-class sampling: {e} (run scripts/prepare_data.py cityscapes)") from e
    classes, probs = rcs_class_probs(stats, temperature)
    index_of = {name: i for i, name in enumerate(source_names(source))}
    indices = []
    for c in classes:
        names = [name for name, n in with_class.get(str(c), []) if n > min_pixels]
        missing = [n for n in names if n not in index_of]
        if missing:
            raise DataError(
                f"rare-class sampling: {missing[0]} of {stats_dir} is not in {source.description}"
            )
        if not names:
            raise DataError(
                f"rare-class sampling: no image has more than {min_pixels} pixels of class {c} "
                f"(lower min_pixels for small images)"
            )
        indices.append(tuple(index_of[n] for n in names))
    return RareClassSampling(
        source, decode, augment, tuple(classes), tuple(probs.tolist()), tuple(indices), seed, min_pixels,
        min_crop_ratio,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- UDA batch


@dataclasses.dataclass(frozen=True)
class UdaStep:
    """Step t -> this process's block of source examples [t*Bs, (t+1)*Bs), target examples [t*Bt, (t+1)*Bt)
    and, with a labelled target stream, labelled examples [t*Bl, (t+1)*Bl), stacked under the batch keys."""

    source: object
    target: object
    source_batch: int  # global
    target_batch: int  # global
    process_index: int
    process_count: int
    labelled: object = None
    labelled_batch: int = 0  # global

    def __call__(self, t: int) -> dict:
        t = int(t)
        ls, lt = self.source_batch // self.process_count, self.target_batch // self.process_count
        src = [self.source[t * self.source_batch + self.process_index * ls + k] for k in range(ls)]
        trg = [self.target[t * self.target_batch + self.process_index * lt + k] for k in range(lt)]
        if any("reference" not in x for x in trg):
            raise DataError(
                "UDA target examples need a reference (an ACDC / Dark Zurich / RobotCar-style source)"
            )
        batch = {
            "image_src": np.stack([x["image"] for x in src]),  # (bs, h, w, 3)
            "label_src": np.stack([x["label"] for x in src]),  # (bs, h, w)
            "image_trg": np.stack([x["image"] for x in trg]),  # (bt, h, w, 3)
            "image_ref": np.stack([x["reference"] for x in trg]),  # (bt, h, w, 3)
        }
        if self.labelled is not None:
            ll = self.labelled_batch // self.process_count
            lab = [self.labelled[t * self.labelled_batch + self.process_index * ll + k] for k in range(ll)]
            batch["image_lab"] = np.stack([x["image"] for x in lab])  # (bl, h, w, 3)
            batch["label_lab"] = np.stack([x["label"] for x in lab])  # (bl, h, w)
            batch["blank_lab"] = np.stack([x["blank"] for x in lab])  # (bl, h, w)
        return batch


def uda_dataset(
    source,
    target,
    *,
    source_augment: PairedAugment,
    target_augment: PairedAugment,
    seed: int,
    source_size: tuple[int, int] | None = None,
    target_size: tuple[int, int] | None = None,
    source_batch: int = 2,
    target_batch: int = 2,
    num_classes: int | None = None,
    rcs: dict | None = None,
    labelled=None,
    labelled_augment: LabelledTargetAugment | None = None,
    labelled_batch: int = 2,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Infinite UDA batches (keys above) for this process: `source_batch` labelled source and `target_batch`
    target + reference examples per process per step (2 + 2 as refign). `rcs` (keyword arguments of
    rare_class_sampling, at least stats_dir) turns on rare-class sampling of the source. `labelled` (a
    labelled target split, at target_size, `labelled_augment`) adds `labelled_batch` labelled target
    examples per process per step. The target stream uses seed + 1, the labelled one seed + 2. Resumable
    through the iterator state."""
    k = num_classes or source.num_classes
    src_decode, trg_decode = PairedDecode(k, source_size), PairedDecode(k, target_size)
    if rcs is not None:
        src = grain.MapDataset.source(
            rare_class_sampling(source, decode=src_decode, augment=source_augment, seed=seed, **rcs)
        )
    else:
        src = _examples(source, src_decode, source_augment, seed)
    trg = _examples(target, trg_decode, target_augment, seed + 1)
    lab = None
    if labelled is not None:
        if labelled_augment is None:
            raise ValueError("uda_dataset: a labelled target stream needs labelled_augment")
        lab = _examples(labelled, trg_decode, labelled_augment, seed + 2)
    step = UdaStep(
        src,
        trg,
        source_batch * process_count,
        target_batch * process_count,
        process_index,
        process_count,
        lab,
        labelled_batch * process_count,
    )
    ds = grain.MapDataset.range(_BIG).map(step)
    # an element is a whole step: grain reads at most `prefetch` of them at once, so more threads idle
    threads = min(num_threads, prefetch)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))


# ----------------------------------------------------------------------------------- evaluation resizes


@dataclasses.dataclass(frozen=True)
class ResizeTo:
    """Evaluation resize for pipeline.eval_batches (refign.md 9): the image to `size` (h, w) with PIL
    bilinear; the label too (nearest) when resize_label, else it stays at full resolution ("valid_hw" is the
    resized image's size). size None keeps both (RobotCar 1024x1024, HRDA full-resolution slide)."""

    size: tuple[int, int] | None
    resize_label: bool = False

    def __call__(self, example: dict) -> dict:
        if self.size is None:
            return example
        out = {**example, "image": _resize(example["image"], tuple(self.size), Image.BILINEAR)}
        if self.resize_label and "label" in example:
            out["label"] = _resize(example["label"], tuple(self.size), Image.NEAREST)
        return out


EVAL_PROTOCOLS = {
    # DAFormer on ACDC / Dark Zurich: val image and label at 540x960; test image at 540x960, label full
    # resolution (the logits are upsampled x2 then to the label: the system's side). Nighttime Driving and
    # BDD100k-night follow "test".
    "val": ResizeTo((540, 960), resize_label=True),
    "test": ResizeTo((540, 960), resize_label=False),
    # RobotCar (1024x1024, over present classes: the metric's side) and HRDA (full resolution, slide).
    "native": ResizeTo(None),
}
