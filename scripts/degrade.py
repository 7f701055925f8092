"""Writes a degraded copy of a dataset split (ADE20K layout) with the Real-ESRGAN model of RASS.

    python scripts/degrade.py --root data/ADEChallengeData2016 --split validation --out data/ade_lq \
        --preset rass --seed 0 [--grid grid.png]

ROOT/images/<split>/*.jpg -> OUT/images/<split>/*.png (lossless), ROOT/annotations/<split>/*.png copied.
Reproducible: the output depends on --seed, --preset and --pad-to only. --grid OUT.png also saves one image
under every severity preset side by side (clean | light | medium | heavy | rass).

OUT must lie outside ROOT (the input is never written to). The split is written into a temporary folder
under OUT and moved into place when complete, so an interrupted run leaves no partial split; re-running
replaces the split. Errors in the inputs end in one line and exit code 2 (--debug: the traceback).
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from lqseg_jax.cli import add_debug_flag, check_output_outside_input, report_errors, setup_logging
from lqseg_jax.data_pipelines.degradation import PRESETS
from lqseg_jax.data_pipelines.degradation.dataset import degrade_split, list_images, read_rgb, severity_grid


def write_split_atomically(root: Path, split: str, out: Path, **kwargs) -> int:
    """degrade_split into OUT/.degrade-tmp-*/, then OUT/{images,annotations}/<split> renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".degrade-tmp-", dir=out))
    try:
        n = degrade_split(root, split, tmp, **kwargs)
        for part in ("images", "annotations"):
            dest = out / part / split
            dest.parent.mkdir(exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            (tmp / part / split).rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return n


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", required=True, help="dataset root holding images/<split> and annotations/<split>"
    )
    parser.add_argument("--split", default="validation")
    parser.add_argument("--out", required=True, help="output root (same layout), outside --root")
    parser.add_argument("--preset", default="rass", choices=PRESETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="images per device call (>= 1)")
    parser.add_argument("--pad-to", type=int, default=64, help="canvas sides are multiples of this (>= 1)")
    parser.add_argument("--grid", help="also save a severity grid of one image to this PNG")
    parser.add_argument("--grid-image", help="file name in images/<split> for --grid (default: the first)")
    parser.add_argument("--no-progress", action="store_true")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    setup_logging()
    for flag, value in (("--batch-size", args.batch_size), ("--pad-to", args.pad_to)):
        if value < 1:
            parser.error(f"{flag} {value}: expected a positive integer")
    root, out = Path(args.root), Path(args.out)
    check_output_outside_input(out, root)
    if args.grid:
        check_output_outside_input(Path(args.grid), root, "--grid")

    n = write_split_atomically(
        root, args.split, out, preset=args.preset, seed=args.seed, batch_size=args.batch_size,
        pad_to=args.pad_to, progress=not args.no_progress,
    )  # fmt: skip
    print(f"wrote {n} degraded images to {out / 'images' / args.split}")
    if args.grid:
        folder = root / "images" / args.split
        source = folder / args.grid_image if args.grid_image else list_images(folder)[0]
        severity_grid(read_rgb(source), args.grid, seed=args.seed, pad_to=args.pad_to)
        print(f"wrote the severity grid of {source.name} to {args.grid}")


if __name__ == "__main__":
    main()
