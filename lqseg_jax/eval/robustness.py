"""Robustness curves: the same evaluation images clean and degraded at increasing severity.

`robustness_curve` evaluates a state on config.eval.split once clean, then once per degradation preset
(data_pipelines/degradation/config.py: "light", "medium", "heavy" by default), each image degraded on the
device with a key from (seed, image index), so every preset and every run sees the same draws per image.
The degradation acts on the evaluation input as the network receives it (after the eval resize, on the
padded canvas when eval.image_bucket pads), which matters only near a padded bottom/right border.

Writes OUT/robustness.json {"mIoU": {"clean": .., "light": .., ...}, "seed", "num_images", "split"},
OUT/robustness.png (mIoU against severity, drawn with PIL), and each evaluation's metrics and pictures
under OUT/<severity>/.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data_pipelines.degradation import get_config as degradation_config
from .evaluate import evaluate

SEVERITIES = ("light", "medium", "heavy")


def robustness_curve(
    trainer,
    state,
    out_dir: str | Path,
    *,
    presets: Sequence[str] = SEVERITIES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """mIoU clean and at each degradation preset; writes robustness.json and robustness.png to out_dir."""
    out_dir = Path(out_dir)
    results = {"clean": evaluate(trainer, state, out_dir / "clean", progress=progress)}
    for preset in presets:
        results[preset] = evaluate(
            trainer,
            state,
            out_dir / preset,
            progress=progress,
            degradation=degradation_config(preset),
            degradation_seed=seed,
        )
    record = {
        "mIoU": {name: r["mIoU"] for name, r in results.items()},
        "seed": seed,
        "num_images": results["clean"]["num_images"],
        "split": trainer.config.eval.split,
        "step": int(state.step),
    }
    (out_dir / "robustness.json").write_text(json.dumps(record, indent=2))
    plot_curve(record["mIoU"], out_dir / "robustness.png", title=f"mIoU on {record['split']} (seed {seed})")
    return record


def plot_curve(values: dict[str, float], path: str | Path, *, title: str = "") -> None:
    """A line plot of `values` (label -> mIoU in %, in the given order) as a PNG."""
    w, h, left, right, top, bottom = 640, 400, 70, 30, 50, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    names, ys = list(values), np.asarray([values[n] for n in values], np.float64)
    finite = ys[np.isfinite(ys)]
    hi = min(100.0, max(10.0, float(np.ceil((finite.max() + 5.0) / 10.0) * 10.0))) if finite.size else 100.0
    x0, x1, y0, y1 = left, w - right, h - bottom, top  # plot area (y grows downwards)

    def px(i: int) -> float:
        return x0 + (x1 - x0) * (i + 0.5) / len(names)

    def py(v: float) -> float:
        return y0 - (y0 - y1) * v / hi

    for k in range(6):  # horizontal grid and y labels
        v = hi * k / 5
        d.line([(x0, py(v)), (x1, py(v))], fill=(225, 225, 225))
        d.text((8, py(v) - 6), f"{v:5.1f}", fill="black")
    d.rectangle([x0, y1, x1, y0], outline="black")
    points = [(px(i), py(v)) for i, v in enumerate(ys) if np.isfinite(v)]
    if len(points) > 1:
        d.line(points, fill=(31, 119, 180), width=3)
    for i, (name, v) in enumerate(zip(names, ys)):
        d.text((px(i) - 3 * len(name), y0 + 10), name, fill="black")
        if np.isfinite(v):
            d.ellipse([px(i) - 5, py(v) - 5, px(i) + 5, py(v) + 5], fill=(31, 119, 180))
            d.text((px(i) - 15, py(v) - 20), f"{v:.1f}", fill="black")
    d.text((x0, 15), title or "mIoU", fill="black")
    d.text((8, top - 25), "mIoU %", fill="black")
    d.text(((x0 + x1) // 2 - 25, h - 25), "severity", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
