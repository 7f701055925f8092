"""Degraded copies of a dataset split in the ADE20K layout, and a picture of the severity presets.

    ROOT/images/<split>/*.jpg + ROOT/annotations/<split>/*.png
      -> OUT/images/<split>/*.png (lossless) + OUT/annotations/<split>/*.png (copied)

Images of any size: each is padded (in the top-left corner of a canvas whose sides are multiples of
`pad_to`) and degraded at its own size (`degrade(..., sizes=)`), so one compilation serves every image of
a canvas size; batches are filled up with blank images to keep the batch shape. Image i of the sorted file
list uses the key fold_in(key(seed), i), so the output depends on (seed, preset, pad_to), not on the batch
size or on which other images are in the folder.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

from .config import get_config
from .pipeline import degrade, min_image_side

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
GRID_PRESETS = ("light", "medium", "heavy", "rass")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {path} does not exist (expected the ADE20K layout)")


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; a file that cannot be decoded raises ValueError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _canvas(h: int, w: int, pad_to: int) -> tuple[int, int]:
    return -(-h // pad_to) * pad_to, -(-w // pad_to) * pad_to


def degrade_images(images, cfg, seed: int, indices, canvas: tuple[int, int], batch_size: int):
    """Degrades uint8 images (list of (h, w, 3)) on one canvas; image j uses key fold_in(key(seed),
    indices[j]). Yields (j, degraded uint8 (h, w, 3)) as batches finish."""
    base = jax.random.key(seed)
    min_side = min_image_side(cfg)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = np.zeros((batch_size, *canvas, 3), np.float32)
        sizes = np.full((batch_size, 2), canvas, np.int32)  # blank fillers keep the batch shape
        for j, im in enumerate(chunk):
            batch[j, : im.shape[0], : im.shape[1]] = im / 255.0
            sizes[j] = im.shape[:2]
        if sizes.min() < min_side:
            raise ValueError(
                f"images smaller than {min_side} pixels a side cannot be degraded with this config"
            )
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(
            np.asarray([*indices[start : start + batch_size], *[0] * (batch_size - len(chunk))], np.uint32)
        )
        out = np.asarray(degrade(keys, batch, cfg, sizes))
        for j, im in enumerate(chunk):
            yield start + j, np.round(out[j, : im.shape[0], : im.shape[1]] * 255).astype(np.uint8)


def degrade_split(
    root,
    split: str,
    out,
    *,
    preset: str = "rass",
    seed: int = 0,
    batch_size: int = 8,
    pad_to: int = 64,
    progress: bool = True,
) -> int:
    """Writes the degraded copy of ROOT/images/<split> (+ its annotations) under OUT; returns the count."""
    root, out = Path(root), Path(out)
    src_images, src_labels = root / "images" / split, root / "annotations" / split
    _require_dir(src_images, "images")
    _require_dir(src_labels, "annotations")
    files = list_images(src_images)
    labels = [src_labels / f"{f.stem}.png" for f in files]
    missing = [str(p) for p in labels if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"annotations missing for {len(missing)} images, first: {missing[0]}")
    cfg = get_config(preset)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations" / split).mkdir(parents=True, exist_ok=True)

    min_side = min_image_side(cfg)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, f in enumerate(files):
        h, w = read_rgb(f).shape[:2]
        if min(h, w) < min_side:
            raise ValueError(f"image {f} is {h}x{w}; the {preset!r} degradation needs sides >= {min_side}")
        groups[_canvas(h, w, pad_to)].append(i)

    bar = tqdm(total=len(files), desc=f"degrade {split} ({preset})", unit="img", disable=not progress)
    for canvas, members in sorted(groups.items()):
        for first in range(0, len(members), batch_size):
            chunk = members[first : first + batch_size]
            images = [read_rgb(files[i]) for i in chunk]
            for j, lq in degrade_images(images, cfg, seed, chunk, canvas, batch_size):
                i = chunk[j]
                Image.fromarray(lq).save(out / "images" / split / f"{files[i].stem}.png")
                shutil.copyfile(labels[i], out / "annotations" / split / labels[i].name)
                bar.update(1)
    bar.close()
    return len(files)


def severity_grid(image: np.ndarray, path, *, seed: int = 0, pad_to: int = 64) -> np.ndarray:
    """Saves clean | light | medium | heavy | rass side by side with labels; returns the picture."""
    canvas = _canvas(*image.shape[:2], pad_to)
    tiles = [image] + [
        next(degrade_images([image], get_config(p), seed, [0], canvas, 1))[1] for p in GRID_PRESETS
    ]
    h, w = image.shape[:2]
    label_h, gap = 18, 4
    grid = Image.new("RGB", (len(tiles) * (w + gap) - gap, h + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (tile, name) in enumerate(zip(tiles, ("clean", *GRID_PRESETS))):
        grid.paste(Image.fromarray(tile), (k * (w + gap), label_h))
        draw.text((k * (w + gap) + 4, 3), name, fill="black")
    grid.save(path)
    return np.asarray(grid)
