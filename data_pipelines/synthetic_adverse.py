"""Deterministic synthetic paired adverse-condition dataset: Cityscapes-layout source scenes and ACDC-layout
adverse targets, each with a normal-condition reference of the same scene moved by a known warp.

Scenes are those of `synthetic.py` (same 10 classes and look). A target is a clean scene put under an
adverse condition:
    night  dark, low contrast, blue cast, sensor noise, a few glowing light sources
    fog    contrast loss growing with depth (rows near the horizon are far): I t + A (1 - t), t = exp(-b d)
    rain   bright slanted streaks, blur, dimmer and flatter colours
Its reference is the same scene in normal conditions seen from a moved camera: the reference pixel at
T(p) shows what the target shows at p, with T = a random homography (corner shifts up to `warp` of the
size) plus, for half the pairs, a smooth field of Gaussian bumps. The stored flow is F(p) = T(p) - p in
pixels, (dx, dy), on the target grid, the convention of Refign's warp: sampling the reference at p + F(p)
reproduces the target's geometry. Scenes are rendered on a canvas with a margin, so the reference has
real content wherever the warp looks outside the target's frame.

Layout (labels are train ids 0..9, 255 = ignore):
    ROOT/cityscapes/leftImg8bit/{train,val}/synth/synth_XXXXX_leftImg8bit.png
    ROOT/cityscapes/gtFine/{train,val}/synth/synth_XXXXX_gtFine_labelTrainIds.png
    ROOT/acdc/rgb_anon/<cond>/{train,val}/<REC>/<REC>_frame_XXXXXX_rgb_anon.png
    ROOT/acdc/rgb_anon/<cond>/{train,val}_ref/<REC>/<REC>_frame_XXXXXX_rgb_ref_anon.png
    ROOT/acdc/gt/<cond>/{train,val}/<REC>/<REC>_frame_XXXXXX_gt_labelTrainIds.png
    ROOT/acdc/flow/<cond>/{train,val}/<REC>/<REC>_frame_XXXXXX_flow.npy      (h, w, 2) float16
with <cond> in night, fog, rain and one recording <REC> = GOPR0<c><s>0 per condition c and split s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from .synthetic import CLASSES, make_scene

CONDITIONS = ("night", "fog", "rain")
SPLITS = ("train", "val")
VERSION = 1  # bump when the pairs change
MARKER = "synthetic_adverse.json"


def example_seed(*key: int) -> int:
    """The generator seed of example i of (domain, split): example_seed(seed, domain, split, i), domain 0 =
    source, 1 + index in CONDITIONS for a condition; split 0 = train, 1 = val."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography (h33 = 1) mapping 4 points src (4, 2) onto dst (4, 2) (direct linear transform)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b.extend([u, v])
    h = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))  # (8,)
    return np.append(h, 1.0).reshape(3, 3)


class Warp:
    """T(p) = H p + sum_k a_k exp(-|p - c_k|^2 / (2 s_k^2)) on pixel coordinates (x, y), float64."""

    def __init__(self, rng: np.random.Generator, h: int, w: int, amount: float, smooth: bool):
        corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
        shift = rng.uniform(-amount, amount, (4, 2)) * np.array([w, h])
        self.H = homography(corners, corners + shift)
        k = int(rng.integers(3, 7)) if smooth else 0
        self.centres = rng.uniform([0, 0], [w, h], (k, 2))  # (k, 2)
        self.sigmas = rng.uniform(0.1, 0.25, k) * min(h, w)  # (k,)
        self.amps = rng.uniform(-1, 1, (k, 2)) * amount * 0.5 * min(h, w)  # (k, 2)

    @staticmethod
    def _project(h: np.ndarray, p: np.ndarray) -> np.ndarray:
        x, y = p[..., 0], p[..., 1]
        den = h[2, 0] * x + h[2, 1] * y + h[2, 2]
        return np.stack(
            [(h[0, 0] * x + h[0, 1] * y + h[0, 2]) / den, (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / den], -1
        )

    def _bumps(self, p: np.ndarray) -> np.ndarray:
        out = np.zeros_like(p)
        for c, s, a in zip(self.centres, self.sigmas, self.amps, strict=True):
            d = p - c
            out += np.exp(-(d[..., 0] ** 2 + d[..., 1] ** 2) / (2 * s * s))[..., None] * a
        return out

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """(..., 2) points -> (..., 2) mapped points."""
        return self._project(self.H, p) + self._bumps(p)

    def inverse(self, q: np.ndarray, tol: float = 1e-4) -> np.ndarray:
        """Points p with T(p) = q: p <- H^-1 (q - bumps(p)), a contraction because the bumps are gentle."""
        h_inv = np.linalg.inv(self.H)
        p = self._project(h_inv, q)
        for _ in range(100):
            if not len(self.amps):
                break
            new = self._project(h_inv, q - self._bumps(p))
            done = np.abs(new - p).max() < tol
            p = new
            if done:
                break
        return p


def _sample(image: np.ndarray, pts: np.ndarray, nearest: bool = False) -> np.ndarray:
    """image (H, W[, C]) at float points (h, w, 2) (x, y): bilinear (or nearest), clamped to the border."""
    hh, ww = image.shape[:2]
    x = np.clip(pts[..., 0], 0, ww - 1)
    y = np.clip(pts[..., 1], 0, hh - 1)
    if nearest:
        return image[np.rint(y).astype(int), np.rint(x).astype(int)]
    x0 = np.minimum(np.floor(x).astype(int), ww - 2)
    y0 = np.minimum(np.floor(y).astype(int), hh - 2)
    fx, fy = x - x0, y - y0
    img = image.astype(np.float32)
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _night(rng: np.random.Generator, img: np.ndarray, label: np.ndarray) -> np.ndarray:
    h, w = label.shape
    x = img * rng.uniform(0.28, 0.4)
    x = x ** rng.uniform(1.1, 1.4) * np.array([0.8, 0.85, 1.2], np.float32)  # darker shadows, blue cast
    x = 0.6 * x + 0.4 * x.mean()  # low contrast
    glow = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(2, 6))):  # street lamps and headlights
        cx, cy = rng.uniform(0, w), rng.uniform(0.1 * h, 0.8 * h)
        r = rng.uniform(0.02, 0.06) * min(h, w)
        glow += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (3 * r) ** 2)) * 0.5
        glow += ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * 1.0
    x = x + np.minimum(glow, 1.0)[..., None] * np.array([1.0, 0.85, 0.5], np.float32)
    return x + rng.normal(0, 0.03, x.shape).astype(np.float32)


def _fog(rng: np.random.Generator, img: np.ndarray, label: np.ndarray) -> np.ndarray:
    h, _ = label.shape
    rows = np.arange(h, dtype=np.float32)[:, None, None] / (h - 1)  # (h, 1, 1), 0 = top (far)
    depth = 0.25 + 2.5 * (1 - rows) ** 1.5
    t = np.exp(-rng.uniform(0.9, 1.4) * depth)
    airlight = rng.uniform(0.7, 0.85) * np.ones(3, np.float32)
    return img * t + airlight * (1 - t) + rng.normal(0, 0.01, img.shape).astype(np.float32)


def _rain(rng: np.random.Generator, img: np.ndarray, label: np.ndarray) -> np.ndarray:
    h, w = label.shape
    x = 0.55 * img + 0.15 * img.mean()  # overcast: dimmer, flatter
    blurred = Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.8, 1.4))
    )
    x = np.asarray(blurred, np.float32) / 255.0
    streaks = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(streaks)
    slant = rng.uniform(-0.4, 0.4)
    for _ in range(int(rng.integers(80, 140))):
        sx, sy, n = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.06, 0.15) * h
        draw.line([(sx, sy), (sx + slant * n, sy + n)], fill=int(rng.integers(120, 230)), width=1)
    s = np.asarray(streaks.filter(ImageFilter.GaussianBlur(0.5)), np.float32)[..., None] / 255.0
    return x * (1 - 0.8 * s) + 0.9 * s


ADVERSE = {"night": _night, "fog": _fog, "rain": _rain}


def make_pair(seed: int, condition: str, height: int = 120, width: int = 160, warp: float = 0.06) -> dict:
    """One target/reference pair from `seed`: {"image" (h, w, 3) uint8 adverse target, "clean" the target
    scene in normal conditions, "label" (h, w) uint8, "reference" (h, w, 3) uint8, "reference_label",
    "flow" (h, w, 2) float32 (dx, dy) with reference(p + flow(p)) = clean(p)}."""
    if condition not in ADVERSE:
        raise ValueError(f"condition must be one of {tuple(ADVERSE)}, got {condition!r}")
    rng = np.random.default_rng(seed)
    m = int(np.ceil(2.2 * warp * max(height, width))) + 2  # margin holding what the warp may look at
    canvas, canvas_label = make_scene(int(rng.integers(2**31)), height + 2 * m, width + 2 * m)
    clean = canvas[m : m + height, m : m + width]  # (h, w, 3)
    label = canvas_label[m : m + height, m : m + width]  # (h, w)
    t = Warp(rng, height, width, warp, smooth=bool(rng.random() < 0.5))
    grid = np.stack(np.meshgrid(np.arange(width), np.arange(height)), -1).astype(np.float64)  # (h, w, 2)
    flow = (t(grid) - grid).astype(np.float32)  # (h, w, 2)
    src = t.inverse(grid) + m  # (h, w, 2) canvas points each reference pixel shows
    bright = rng.uniform(0.9, 1.1)  # another day: slightly different exposure
    reference = np.clip(_sample(canvas, src) * bright, 0, 255).round().astype(np.uint8)
    adverse = ADVERSE[condition](rng, clean.astype(np.float32) / 255.0, label)
    return {
        "image": (np.clip(adverse, 0, 1) * 255).round().astype(np.uint8),
        "clean": np.ascontiguousarray(clean),
        "label": np.ascontiguousarray(label),
        "reference": reference,
        "reference_label": _sample(canvas_label, src, nearest=True),
        "flow": flow,
    }


def recording(condition: str, split: str) -> str:
    """The ACDC-style recording name of a condition and split."""
    return f"GOPR0{CONDITIONS.index(condition)}{SPLITS.index(split)}0"


def flow_path(acdc_root: str | Path, image_path: str | Path) -> Path:
    """The stored flow of target ROOT/rgb_anon/<cond>/<split>/<REC>/<name>_rgb_anon.png (absolute or relative
    to ROOT)."""
    rel = Path(image_path)
    if rel.is_absolute():
        rel = rel.relative_to(Path(acdc_root))
    cond, split, rec, name = rel.parts[1:5]
    return Path(acdc_root) / "flow" / cond / split / rec / name.replace("_rgb_anon.png", "_flow.npy")


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        Image.fromarray(array).save(path)


def write_dataset(
    root: str | Path,
    *,
    num_source: tuple[int, int] = (200, 40),
    num_target: tuple[int, int] = (40, 10),
    conditions: tuple[str, ...] = CONDITIONS,
    height: int = 120,
    width: int = 160,
    warp: float = 0.06,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Writes the dataset under ROOT (layout above): num_source (train, val) Cityscapes-layout scenes and
    num_target (train, val) pairs per condition. Example i of (domain, split) uses seed (seed, domain,
    split, i), so the same arguments always write the same files. Returns ROOT."""
    root = Path(root)
    for s, split in enumerate(SPLITS):
        city = root / "cityscapes"
        for i in tqdm(range(num_source[s]), desc=f"synthetic source {split}", disable=not progress):
            image, label = make_scene(example_seed(seed, 0, s, i), height, width)
            name = f"synth_{i:05d}"
            _save(city / "leftImg8bit" / split / "synth" / f"{name}_leftImg8bit.png", image)
            _save(city / "gtFine" / split / "synth" / f"{name}_gtFine_labelTrainIds.png", label)
        for condition in conditions:
            c = 1 + CONDITIONS.index(condition)
            rec = recording(condition, split)
            acdc = root / "acdc"
            for i in tqdm(range(num_target[s]), desc=f"synthetic {condition} {split}", disable=not progress):
                pair = make_pair(example_seed(seed, c, s, i), condition, height, width, warp)
                stem = f"{rec}_frame_{i:06d}"
                _save(acdc / "rgb_anon" / condition / split / rec / f"{stem}_rgb_anon.png", pair["image"])
                ref = acdc / "rgb_anon" / condition / f"{split}_ref" / rec / f"{stem}_rgb_ref_anon.png"
                _save(ref, pair["reference"])
                _save(acdc / "gt" / condition / split / rec / f"{stem}_gt_labelTrainIds.png", pair["label"])
                _save(
                    acdc / "flow" / condition / split / rec / f"{stem}_flow.npy",
                    pair["flow"].astype(np.float16),
                )
    return root


def ensure_dataset(root: str | Path, **spec) -> Path:
    """Writes the dataset unless ROOT already holds one written with the same arguments."""
    root = Path(root)
    marker = root / MARKER
    record = {"version": VERSION, **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}}
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return root
    write_dataset(root, **spec)
    marker.write_text(json.dumps(record))
    return root


def sources(root: str | Path, split: str = "train"):
    """(source, target) of a written dataset for the paired pipelines: the labelled Cityscapes-layout scenes
    and the ACDC-layout targets with references (labels too), as refign_sources.PairedSource."""
    from .refign_sources import paired_source

    root = Path(root)
    conditions = tuple(c for c in CONDITIONS if (root / "acdc" / "rgb_anon" / c / split).is_dir())
    kw = {"num_classes": NUM_CLASSES, "check_counts": False}
    return (
        paired_source("cityscapes", root / "cityscapes", split, **kw),
        paired_source("acdc", root / "acdc", split, conditions=conditions, **kw),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic paired adverse-condition dataset.")
    parser.add_argument("root")
    parser.add_argument("--num-source", default="200,40", help="train,val source scenes (%(default)s)")
    parser.add_argument("--num-target", default="40,10", help="train,val pairs per condition (%(default)s)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    write_dataset(
        a.root,
        num_source=tuple(int(n) for n in a.num_source.split(",")),
        num_target=tuple(int(n) for n in a.num_target.split(",")),
        conditions=tuple(c for c in a.conditions.split(",") if c),
        height=a.height,
        width=a.width,
        seed=a.seed,
    )


NUM_CLASSES = len(CLASSES)

if __name__ == "__main__":
    main()
