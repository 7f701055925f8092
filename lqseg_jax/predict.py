"""Segmentation of one's own images with a trained or converted model: label ids, colours, overlays.

`Predictor(trainer, state)` runs the system's prediction as its evaluation does (config.eval's resize,
whole or sliding-window mode, the scores resized back to each image's own size), on images of any size:
each resized image is padded (0, bottom/right) to a canvas whose sides are multiples of `image_bucket`
(default config.eval.image_bucket, else 32) and the predictions are made on an output canvas whose sides
are multiples of `output_bucket` (config.eval.label_bucket, else 128), so a folder of varied sizes
compiles one program per (canvas, output canvas) pair; images sharing one are batched by
config.eval.batch_size, a short batch filled with copies. Padding is what the network sees near the
bottom/right border, so `image_bucket` = the config's size divisibility reproduces evaluation exactly.

Pictures: `colorize` (the dataset's palette: ADE20K's 150 colours, Cityscapes' 19, else a fixed spread of
hues), `overlay` (alpha blend of image and colours, with `legend` at the right: one row per class present,
most pixels first, a colour swatch and the name with its share of the image).

`predict_files` writes per image NAME_labels.png (uint8 class ids, 255 = none), NAME_color.png and
NAME_overlay.png; with a degradation preset also NAME_degraded_labels.png, NAME_degraded_color.png and
NAME_compare.png (input and overlay, clean above, degraded below, one legend of both). Image i of the
sorted file list is degraded with the key fold_in(key(seed), i), as scripts/degrade.py does.
"""

from __future__ import annotations

import dataclasses
import glob
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .data_pipelines.ade20k import ADE20K_CLASSES
from .data_pipelines.refign_sources import CITYSCAPES_CLASSES
from .data_pipelines.sources import DataError
from .data_pipelines.transforms import decode_image
from .eval.evaluate import eval_resize
from .eval.inference import predict_at_label_size
from .eval.metrics import IGNORE
from .eval.report import class_names_or_ids, palette

# mmseg's ADE20KDataset.PALETTE, one colour per class id 0..149 (ADE20K_CLASSES order).
ADE20K_PALETTE = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
]  # fmt: skip

# Legend layout (pixels): rows of LEGEND_ROW, a LEGEND_SWATCH square at (LEGEND_PAD, row top + 2), the text
# after it; the legend sits right of the picture, on white.
LEGEND_ROW, LEGEND_SWATCH, LEGEND_PAD = 18, 14, 6
LEGEND_TEXT_X = LEGEND_PAD + LEGEND_SWATCH + 6


def dataset_palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8: ADE20K's colours for 150 classes, else eval/report.py's (Cityscapes' for 19); 255 black."""
    if num_classes != len(ADE20K_PALETTE):
        return palette(num_classes)
    pal = np.zeros((256, 3), np.uint8)
    pal[:num_classes] = ADE20K_PALETTE
    return pal


def dataset_class_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The config's class names, else ADE20K's (150) or Cityscapes' (19), else class_<i>."""
    if not (names and len(names) == num_classes):
        names = {len(ADE20K_CLASSES): ADE20K_CLASSES, len(CITYSCAPES_CLASSES): CITYSCAPES_CLASSES}.get(
            num_classes
        )
    return class_names_or_ids(names, num_classes)


def colorize(labels: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """(h, w) class ids -> (h, w, 3) uint8 colours of the (256, 3) palette."""
    return pal[np.asarray(labels, np.uint8)]  # (h, w, 3)


def classes_present(labels: np.ndarray) -> list[tuple[int, float]]:
    """(class id, share of the pixels in %) of each class in `labels` except 255, most pixels first."""
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    keep = ids != IGNORE
    ids, counts = ids[keep], counts[keep]
    order = np.lexsort((ids, -counts))  # most pixels first, ties by id
    total = max(int(np.asarray(labels).size), 1)
    return [(int(ids[i]), 100.0 * int(counts[i]) / total) for i in order]


def legend(
    labels: np.ndarray | Sequence[np.ndarray], pal: np.ndarray, names: Sequence[str], *, min_height: int = 0
) -> np.ndarray:
    """(H, W, 3) uint8 legend of the classes in `labels` (one map, or several pooled: shares are of all
    their pixels): a row per class, most pixels first; H >= min_height, white below the last row."""
    maps = [labels] if isinstance(labels, np.ndarray) else list(labels)
    pooled = np.concatenate([np.asarray(m).reshape(-1) for m in maps])  # (n,)
    rows = classes_present(pooled)
    font = ImageFont.load_default()
    texts = [f"{names[c]} {share:.1f}%" if share >= 0.05 else f"{names[c]} <0.1%" for c, share in rows]
    width = LEGEND_TEXT_X + max([int(font.getlength(t)) for t in texts] or [40]) + LEGEND_PAD
    height = max(min_height, 2 * LEGEND_PAD + LEGEND_ROW * max(len(rows), 1))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if not rows:
        draw.text((LEGEND_PAD, LEGEND_PAD), "no class", fill="black", font=font)
    for r, ((c, _), text) in enumerate(zip(rows, texts)):
        top = LEGEND_PAD + r * LEGEND_ROW
        x0, y0 = LEGEND_PAD, top + 2
        draw.rectangle(
            [x0, y0, x0 + LEGEND_SWATCH - 1, y0 + LEGEND_SWATCH - 1], fill=tuple(int(v) for v in pal[c])
        )
        draw.text((LEGEND_TEXT_X, top + 3), text, fill="black", font=font)
    return np.asarray(img)


def blend(image: np.ndarray, labels: np.ndarray, pal: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(h, w, 3) uint8: (1 - alpha) * image + alpha * colours, rounded; pixels labelled 255 keep the image."""
    colours = colorize(labels, pal).astype(np.float32)  # (h, w, 3)
    mixed = (1.0 - alpha) * np.asarray(image, np.float32) + alpha * colours  # (h, w, 3)
    mixed = np.where((np.asarray(labels) == IGNORE)[..., None], image, mixed)  # (h, w, 3)
    return np.round(mixed).astype(np.uint8)


def _beside(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two (h, w, 3) pictures side by side on white, top-aligned."""
    h = max(left.shape[0], right.shape[0])
    out = np.full((h, left.shape[1] + right.shape[1], 3), 255, np.uint8)  # (h, w1 + w2, 3)
    out[: left.shape[0], : left.shape[1]] = left
    out[: right.shape[0], left.shape[1] :] = right
    return out


def overlay(
    image: np.ndarray, labels: np.ndarray, pal: np.ndarray, names: Sequence[str], alpha: float = 0.5
) -> np.ndarray:
    """The blend of `image` (h, w, 3) and its `labels` (h, w) with the legend at its right."""
    return _beside(blend(image, labels, pal, alpha), legend(labels, pal, names, min_height=image.shape[0]))


def comparison(
    image: np.ndarray,
    labels: np.ndarray,
    degraded: np.ndarray,
    degraded_labels: np.ndarray,
    pal: np.ndarray,
    names: Sequence[str],
    alpha: float = 0.5,
) -> np.ndarray:
    """[input | overlay] of the clean image above the same of the degraded one, one legend of both."""
    grid = np.concatenate(
        [
            np.concatenate([image, blend(image, labels, pal, alpha)], axis=1),
            np.concatenate([degraded, blend(degraded, degraded_labels, pal, alpha)], axis=1),
        ],
        axis=0,
    )  # (2h, 2w, 3)
    return _beside(grid, legend([labels, degraded_labels], pal, names, min_height=grid.shape[0]))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = image.shape[:2]
    return np.pad(image, ((0, hw[0] - h), (0, hw[1] - w), (0, 0)))  # (H, W, 3)


@dataclasses.dataclass
class _Item:
    index: int  # position in the caller's sequence
    name: str  # for the system's host_batch
    image: np.ndarray  # (h, w, 3) uint8, the network input after the eval resize, padded to the canvas
    valid_hw: tuple[int, int]  # the resized image before padding
    out_hw: tuple[int, int]  # the original image size: predictions are made at it


class Predictor:
    """Class-id maps for uint8 RGB images of any size, with the system's prediction as evaluated.

    One process (the batch goes to this process's devices); `state` is a train state (restore_workdir or
    load_converted_state in eval/evaluate.py).
    """

    def __init__(self, trainer, state, *, image_bucket: int | None = None, output_bucket: int | None = None):
        cfg = trainer.config
        self.trainer, self.config = trainer, cfg
        self.num_classes = cfg.model.num_classes
        self.palette = dataset_palette(self.num_classes)
        self.class_names = dataset_class_names(cfg.data.get("class_names"), self.num_classes)
        self.image_bucket = image_bucket or cfg.eval.image_bucket or 32
        self.output_bucket = output_bucket or cfg.eval.label_bucket or 128
        if self.image_bucket < 1 or self.output_bucket < 1:
            raise ValueError(
                f"image_bucket {self.image_bucket} / output_bucket {self.output_bucket}: expected positive sizes"
            )
        self.batch_size = cfg.eval.batch_size
        self.resize = eval_resize(cfg.eval)
        self.params, self.rest = trainer.eval_params(state), state.rest
        self._step = jax.jit(self._predict, static_argnames="out_hw")

    def _predict(self, params, rest, batch: dict, out_hw: tuple[int, int]) -> jax.Array:
        cfg, system = self.config, self.trainer.system
        model = nnx.merge(self.trainer.eval_graphdef, params, rest)
        return predict_at_label_size(
            lambda x: system.predict_batch(model, {**batch, "image": x}),
            batch["image"],
            out_hw,
            batch["valid_hw"],
            batch["label_hw"],
            mode=cfg.eval.mode,
            crop=tuple(cfg.eval.crop),
            stride=tuple(cfg.eval.stride),
        )  # (b, H, W) class ids

    def _item(self, index: int, name: str, image: np.ndarray) -> _Item:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {index}: expected (h, w, 3) uint8 RGB, got {image.shape} {image.dtype}")
        example = self.resize({"image": image})
        resized = example["image"]  # (h', w', 3), possibly padded by the resize
        valid = tuple(int(v) for v in example.get("valid_hw", resized.shape[:2]))
        canvas = (
            _round_up(resized.shape[0], self.image_bucket),
            _round_up(resized.shape[1], self.image_bucket),
        )
        return _Item(index, name, _pad(resized, canvas), valid, image.shape[:2])

    def _run(self, items: list[_Item]) -> list[tuple[int, np.ndarray]]:
        """(k, class ids (h, w) uint8) of items sharing one canvas, in one batch of self.batch_size."""
        out_hw = tuple(
            _round_up(max(it.out_hw[k] for it in items), self.output_bucket) for k in range(2)
        )  # (H, W) output canvas
        fill = [items[0]] * (self.batch_size - len(items))
        rows = [*items, *fill]
        batch = {
            "image": np.stack([it.image for it in rows]),  # (b, h, w, 3) uint8
            "valid_hw": np.array([it.valid_hw for it in rows], np.int32),  # (b, 2)
            "label_hw": np.array([it.out_hw for it in rows], np.int32),  # (b, 2)
            "name": [it.name for it in rows],
        }
        arrays = self.trainer.device_batch(batch)
        with jax.set_mesh(self.trainer.mesh):
            preds = np.asarray(self._step(self.params, self.rest, arrays, out_hw=out_hw))  # (b, H, W)
        return [
            (it.index, preds[j, : it.out_hw[0], : it.out_hw[1]].astype(np.uint8))
            for j, it in enumerate(items)
        ]

    def predict_many(
        self, named_images: Iterable[tuple[str, np.ndarray]]
    ) -> Iterable[tuple[int, np.ndarray]]:
        """Yields (k, class ids (h, w) uint8) for the k-th (name, image) pair, batching images that share a
        canvas (so not in order); the names reach the system's host_batch (RASS prompt mode "tags")."""
        groups: dict[tuple[int, int], list[_Item]] = defaultdict(list)
        for k, (name, image) in enumerate(named_images):
            item = self._item(k, name, image)
            group = groups[item.image.shape[:2]]
            group.append(item)
            if len(group) == self.batch_size:
                yield from self._run(groups.pop(item.image.shape[:2]))
        for group in groups.values():
            yield from self._run(group)

    def predict(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        """Class ids (h, w) uint8 of one (h, w, 3) uint8 image."""
        return next(iter(self.predict_many([(name, image)])))[1]


def degrade_image(
    image: np.ndarray, preset: str, seed: int = 0, index: int = 0, pad_to: int = 64
) -> np.ndarray:
    """A degraded copy of one (h, w, 3) uint8 image by the `preset` Real-ESRGAN model, with the key
    fold_in(key(seed), index); an image below the preset's smallest side is a ValueError naming both."""
    from .data_pipelines.degradation import get_config
    from .data_pipelines.degradation.dataset import degrade_images
    from .data_pipelines.degradation.pipeline import min_image_side

    cfg = get_config(preset)
    h, w = image.shape[:2]
    if min(h, w) < min_image_side(cfg):
        raise ValueError(
            f"image of {h}x{w} pixels: the {preset!r} degradation needs sides >= {min_image_side(cfg)}"
        )
    canvas = (_round_up(h, pad_to), _round_up(w, pad_to))
    return next(degrade_images([image], cfg, seed, [index], canvas, 1))[1]  # (h, w, 3) uint8


# ---------------------------------------------------------------------------------------------- files
def image_suffixes() -> set[str]:
    """The file suffixes Pillow opens (lower case, with the dot)."""
    return {s.lower() for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def find_images(spec: str | Path) -> tuple[list[Path], Path | None, int]:
    """(image files, the input folder or None, files skipped for their suffix) for --input: a FILE (taken
    whatever its suffix), a DIR (its files with an image suffix, not recursive) or a GLOB (`**` recursive;
    its image-suffix matches, the folder being the pattern's part before the first wildcard)."""
    spec = str(spec)
    suffixes = image_suffixes()
    path = Path(spec)
    if path.is_file():
        return [path], None, 0
    if path.is_dir():
        files, folder = sorted(p for p in path.iterdir() if p.is_file()), path
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        parts = Path(spec).parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        folder = Path(*parts[:fixed]) if fixed else Path(".")
    else:
        raise FileNotFoundError(
            f"--input {spec}: no such file or folder (expected an image, a folder or a glob)"
        )
    images = [p for p in files if p.suffix.lower() in suffixes]
    if not images:
        raise FileNotFoundError(
            f"--input {spec}: no image files in {len(files)} files (suffixes Pillow reads)"
        )
    return images, folder, len(files) - len(images)


def check_out(out: Path, folder: Path | None, files: Sequence[Path]) -> None:
    """Refuses an output folder that is the input folder or lies inside it (or, for one file, is its folder)."""
    o = out.resolve()
    if folder is not None:
        f = folder.resolve()
        if o == f or f in o.parents:
            raise ValueError(
                f"--out {out.absolute()} is or lies inside the input folder {folder.absolute()} "
                "(expected a folder outside it: the input is never written to)"
            )
    elif o == files[0].resolve().parent:
        raise ValueError(
            f"--out {out.absolute()} is the folder of --input {files[0]} (expected another folder: the input "
            "is never written to)"
        )


def output_names(files: Sequence[Path]) -> list[str]:
    """A distinct output stem per file: the file's stem, then stem_<suffix>, then stem_<suffix>_<n>."""
    names, taken = [], set()
    for f in files:
        name = f.stem
        if name in taken:
            name = f"{f.stem}_{f.suffix.lstrip('.').lower()}"
        n = 2
        base = name
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


def read_image(path: Path) -> np.ndarray:
    """(h, w, 3) uint8 RGB as the data sources decode it (grayscale, palette, RGBA, 16-bit: PIL's RGB
    conversion); an unreadable file is a DataError naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return decode_image(data, str(path))


@dataclasses.dataclass
class Summary:
    written: list[str]  # output stems, in input order
    failed: list[tuple[str, str]]  # (input file, why), in input order


def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    out: str | Path,
    *,
    degrade: str | None = None,
    seed: int = 0,
    alpha: float = 0.5,
    progress: bool = True,
) -> Summary:
    """Writes the pictures of every readable file into OUT (see the module docstring); a file that cannot be
    read (or degraded) is reported in the summary and skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(files)
    need = 1 if degrade is None else 2  # predictions per file: clean (, degraded)
    owners: list[tuple[int, int]] = []  # network input k -> (file i, 0 clean / 1 degraded)
    pictures: dict[int, list[np.ndarray]] = {}  # file i -> [image (, degraded image)] until written
    labels: dict[int, dict[int, np.ndarray]] = defaultdict(dict)  # file i -> {0/1: class ids}
    written, failed = [], []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)

    def inputs():
        for i, path in enumerate(files):
            try:
                image = read_image(path)
                pictures[i] = [image] if degrade is None else [image, degrade_image(image, degrade, seed, i)]
            except (DataError, ValueError) as e:
                failed.append((str(path), " ".join(str(e).split())))
                bar.update()
                continue
            for which, x in enumerate(pictures[i]):
                owners.append((i, which))
                yield path.stem, x

    for k, ids in predictor.predict_many(inputs()):
        i, which = owners[k]
        labels[i][which] = ids
        if len(labels[i]) < need:
            continue
        got, shown = labels.pop(i), pictures.pop(i)
        _write(out, names[i], shown, got, predictor.palette, predictor.class_names, alpha)
        written.append(i)
        bar.update()
    bar.close()
    return Summary(written=[names[i] for i in sorted(written)], failed=failed)


def _write(out: Path, name: str, shown: list[np.ndarray], labels: dict, pal, classes, alpha: float) -> None:
    Image.fromarray(labels[0], mode="L").save(out / f"{name}_labels.png")
    Image.fromarray(colorize(labels[0], pal)).save(out / f"{name}_color.png")
    Image.fromarray(overlay(shown[0], labels[0], pal, classes, alpha)).save(out / f"{name}_overlay.png")
    if len(shown) == 2:
        Image.fromarray(labels[1], mode="L").save(out / f"{name}_degraded_labels.png")
        Image.fromarray(colorize(labels[1], pal)).save(out / f"{name}_degraded_color.png")
        picture = comparison(shown[0], labels[0], shown[1], labels[1], pal, classes, alpha)
        Image.fromarray(picture).save(out / f"{name}_compare.png")
