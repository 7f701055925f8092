"""Deterministic synthetic scenes: a small learnable dataset in the ADE20K (or Cityscapes) on-disk layout.

Every scene has a sky band over a jagged horizon, two ground regions split by a slanted boundary, an
optional building, and 2-5 objects. Each of the 10 classes has its own texture (gradient, blades,
lane marks, ripples, bricks, speckle, blobs) and a jittered colour, so a network must use texture and
shape, not one colour. Object outlines are written as "unlabeled", like ADE20K's label 0.

ADE20K layout (labels are raw ADE values: 0 = unlabeled, class c -> c + 1):
    ROOT/images/{training,validation}/synth_XXXXX.jpg
    ROOT/annotations/{training,validation}/synth_XXXXX.png
Cityscapes layout (labels are train ids, 255 = ignore):
    ROOT/leftImg8bit/{train,val}/synth/synth_XXXXX_leftImg8bit.png
    ROOT/gtFine/{train,val}/synth/synth_XXXXX_gtFine_labelTrainIds.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

CLASSES = ("sky", "grass", "road", "water", "building", "sand", "tree", "ball", "car", "sign")
GROUND = (1, 2, 3, 5)  # grass, road, water, sand
UNLABELED = 255  # internal value of unlabeled pixels before writing
VERSION = 2  # bump when scenes change, so datasets written by an older generator are rewritten


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.BICUBIC), np.float32) / 255.0  # (h, w)


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float = 0.12) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0)  # (3,)


def _texture(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """A full-frame texture of class `cls`, float RGB in [0, 1], (h, w, 3)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fine = rng.random((h, w)).astype(np.float32)  # (h, w)
    name = CLASSES[cls]
    if name == "sky":
        top, bottom = _jitter(rng, (0.25, 0.45, 0.85)), _jitter(rng, (0.7, 0.85, 1.0))
        t = (yy / max(h - 1, 1))[..., None]
        img = top * (1 - t) + bottom * t + 0.05 * (_smooth_noise(rng, h, w, 24)[..., None] - 0.5)
    elif name == "grass":
        base = _jitter(rng, (0.2, 0.55, 0.15))
        blades = np.asarray(Image.fromarray((fine * 255).astype(np.uint8)).resize((w, max(1, h // 4))))
        blades = np.asarray(Image.fromarray(blades).resize((w, h), Image.NEAREST), np.float32) / 255.0
        img = base * (0.6 + 0.5 * blades[..., None])
    elif name == "road":
        base = _jitter(rng, (0.35, 0.35, 0.37), 0.06)
        img = base * (0.85 + 0.3 * fine[..., None])
        marks = (np.abs(xx - w / 2) < max(1, w // 40)) & ((yy // 6) % 2 == 0)
        img[marks] = _jitter(rng, (0.95, 0.95, 0.9), 0.05)
    elif name == "water":
        base = _jitter(rng, (0.1, 0.4, 0.6))
        phase = rng.uniform(0, 2 * np.pi)
        ripple = 0.5 + 0.5 * np.sin(yy * rng.uniform(0.8, 1.4) + 2 * np.sin(xx / 9.0) + phase)
        img = base * (0.7 + 0.5 * ripple[..., None])
    elif name == "building":
        brick, mortar = _jitter(rng, (0.6, 0.3, 0.2)), _jitter(rng, (0.8, 0.78, 0.7), 0.05)
        bh, bw = 6, 12
        row = (yy // bh).astype(int)
        shifted = xx + (row % 2) * (bw / 2)
        is_mortar = (yy % bh < 1) | (shifted % bw < 1)
        img = np.where(is_mortar[..., None], mortar, brick * (0.85 + 0.3 * fine[..., None]))
    elif name == "sand":
        base = _jitter(rng, (0.85, 0.75, 0.5), 0.08)
        speck = (fine > 0.9).astype(np.float32)
        img = base * (0.9 + 0.1 * _smooth_noise(rng, h, w, 8)[..., None]) - 0.25 * speck[..., None]
    elif name == "tree":
        base = _jitter(rng, (0.1, 0.3, 0.1), 0.06)
        blobs = _smooth_noise(rng, h, w, 4)
        img = base * (0.5 + 1.0 * blobs[..., None])
    elif name == "ball":
        base = _jitter(rng, (0.9, 0.3, 0.1))
        img = base * (0.8 + 0.2 * fine[..., None])
    elif name == "car":
        base = _jitter(rng, (0.55, 0.2, 0.6), 0.2)
        stripes = ((xx // 3) % 2).astype(np.float32)
        img = base * (0.75 + 0.25 * stripes[..., None])
    else:  # sign
        base = _jitter(rng, (0.95, 0.85, 0.1), 0.05)
        img = base * (0.9 + 0.1 * fine[..., None])
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _draw_mask(h: int, w: int, shape: str, *args, **kwargs) -> np.ndarray:
    """A boolean (h, w) mask of one PIL ImageDraw shape ("polygon", "ellipse", ...)."""
    mask = Image.new("L", (w, h), 0)
    getattr(ImageDraw.Draw(mask), shape)(*args, fill=1, **kwargs)
    return np.asarray(mask) > 0  # (h, w)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` that touch a pixel outside it (4-neighbourhood)."""
    m = np.pad(mask, 1, mode="edge")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def make_scene(seed: int, height: int = 120, width: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """One scene from `seed`: image uint8 (h, w, 3) and labels uint8 (h, w) in 0..9 or 255."""
    rng = np.random.default_rng(seed)
    h, w = height, width
    label = np.zeros((h, w), np.uint8)  # sky everywhere first
    image = _texture(rng, 0, h, w)  # (h, w, 3)

    def paint(mask: np.ndarray, cls: int) -> None:
        image[mask] = _texture(rng, cls, h, w)[mask]
        label[mask] = cls

    # Ground under a jagged horizon, split in two by a slanted boundary.
    horizon = int(h * rng.uniform(0.3, 0.55))
    xs = np.linspace(0, w, 9)
    ys = horizon + rng.integers(-h // 12, h // 12 + 1, size=9)
    ground = _draw_mask(h, w, "polygon", [*zip(xs, ys, strict=True), (w, h), (0, h)])
    left, right = rng.choice(GROUND, size=2, replace=False)
    x_top, x_bottom = rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.9) * w
    left_mask = ground & _draw_mask(h, w, "polygon", [(0, 0), (x_top, 0), (x_bottom, h), (0, h)])
    paint(left_mask, int(left))
    paint(ground & ~left_mask, int(right))

    if rng.random() < 0.6:  # a building standing on the horizon
        bw = int(w * rng.uniform(0.15, 0.35))
        bx = int(rng.uniform(0, w - bw))
        top = int(horizon * rng.uniform(0.1, 0.6))
        paint(_draw_mask(h, w, "rectangle", [bx, top, bx + bw, horizon + 2]), 4)

    outlines = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.choice([6, 7, 8, 9]))
        size = rng.uniform(0.2, 0.4) * min(h, w)
        cx = rng.uniform(size, w - size)
        cy = rng.uniform(max(horizon, size), h - size / 2)
        if cls == 6:  # tree: triangle canopy
            mask = _draw_mask(
                h, w, "polygon", [(cx, cy - 1.6 * size), (cx - size * 0.8, cy), (cx + size * 0.8, cy)]
            )
        elif cls == 7:  # ball
            mask = _draw_mask(h, w, "ellipse", [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
        elif cls == 8:  # car: rounded box
            box = [cx - size, cy - size * 0.45, cx + size, cy + size * 0.2]
            mask = _draw_mask(h, w, "rounded_rectangle", box, radius=size * 0.2)
        else:  # sign: diamond
            s = size * 0.6
            mask = _draw_mask(h, w, "polygon", [(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)])
        paint(mask, cls)
        outlines |= _outline(mask)
    label[outlines] = UNLABELED
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


SPLITS = {"ade20k": ("training", "validation"), "cityscapes": ("train", "val")}


def write_dataset(
    root: str | Path,
    *,
    num_train: int = 400,
    num_val: int = 50,
    height: int = 120,
    width: int = 160,
    seed: int = 0,
    layout: str = "ade20k",
    progress: bool = True,
) -> Path:
    """Writes the synthetic dataset under `root` in the given layout; returns root.

    Scene i of split s uses seed (seed, s, i), so the same arguments always write the same files.
    """
    if layout not in SPLITS:
        raise ValueError(f"layout must be one of {tuple(SPLITS)}, got {layout!r}")
    root = Path(root)
    for split_id, (split, count) in enumerate(zip(SPLITS[layout], (num_train, num_val), strict=True)):
        for i in tqdm(range(count), desc=f"synthetic {split}", disable=not progress):
            image, label = make_scene(
                int(np.random.SeedSequence([seed, split_id, i]).generate_state(1)[0]), height, width
            )
            name = f"synth_{i:05d}"
            if layout == "ade20k":
                img_path = root / "images" / split / f"{name}.jpg"
                lbl_path = root / "annotations" / split / f"{name}.png"
                raw = np.where(label == UNLABELED, 0, label + 1).astype(np.uint8)  # ADE: 0 = unlabeled
            else:
                img_path = root / "leftImg8bit" / split / "synth" / f"{name}_leftImg8bit.png"
                lbl_path = root / "gtFine" / split / "synth" / f"{name}_gtFine_labelTrainIds.png"
                raw = label
            img_path.parent.mkdir(parents=True, exist_ok=True)
            lbl_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img_path, **({"quality": 95} if layout == "ade20k" else {}))
            Image.fromarray(raw).save(lbl_path)
    return root


def ensure_dataset(root: str | Path, *, layout: str = "ade20k", **spec) -> Path:
    """Writes the dataset unless `root` already holds one written with the same arguments."""
    root = Path(root)
    marker = root / "synthetic.json"
    record = {"version": VERSION, "layout": layout, **spec}
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return root
    write_dataset(root, layout=layout, **spec)
    marker.write_text(json.dumps(record))
    return root


def ensure_data(config) -> None:
    """For configs with data.synthetic.enabled: writes the dataset at data.root on first use (process 0
    writes, the others wait)."""
    syn = config.data.synthetic
    if not syn.enabled:
        return
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        ensure_dataset(
            config.data.root,
            num_train=syn.num_train,
            num_val=syn.num_val,
            height=syn.height,
            width=syn.width,
            seed=syn.seed,
            progress=False,
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic dataset written")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic-scenes dataset.")
    parser.add_argument("root")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=tuple(SPLITS), default="ade20k")
    a = parser.parse_args(argv)
    write_dataset(
        a.root,
        num_train=a.num_train,
        num_val=a.num_val,
        height=a.height,
        width=a.width,
        seed=a.seed,
        layout=a.layout,
    )


if __name__ == "__main__":
    main()
