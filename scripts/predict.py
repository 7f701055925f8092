"""Segment your own images with a training workdir's checkpoint or converted released weights.

    python scripts/predict.py --config configs/demo.py:rass --workdir runs/demo/rass \\
        --input data/synthetic/images/validation --out runs/predict
    python scripts/predict.py --config configs/rass.py --converted converted/rass --input 'photos/*.jpg' \\
        --out runs/photos --degrade medium

--input is an image file, a folder (its files with a suffix Pillow reads; not recursive) or a quoted glob
(`**` recursive). Any size and any format Pillow reads; grayscale, palette, RGBA (alpha dropped) and 16-bit
images are converted to RGB as the data sources do. Images are predicted as config.eval evaluates them
(resize, whole or sliding-window mode) and batched by eval.batch_size among images of one padded size.

Writes per image into OUT: NAME_labels.png (class ids, 8-bit), NAME_color.png (the dataset's palette:
ADE20K 150, Cityscapes 19), NAME_overlay.png (image and colours blended, legend of the classes present).
With --degrade PRESET (light, medium, heavy, rass) also NAME_degraded_labels.png, NAME_degraded_color.png
and NAME_compare.png (input and overlay, clean above, degraded below). OUT must not be the input folder
or lie inside it (the input is never written to).

Exit code: 0 when every image was written; 1 when some files could not be read (or degraded): they are
listed at the end and skipped, the others written; 2 for an error in the arguments or the model (one
line; --debug or LQSEG_DEBUG=1: the traceback).
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lqseg_jax.cli import flag_config, report_errors, run_absl, setup_logging
from lqseg_jax.data_pipelines.degradation import PRESETS

config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint predicts")
flags.DEFINE_integer("step", None, "with --workdir: use this saved step instead of the latest")
flags.DEFINE_string("converted", None, "a scripts/convert.py output folder to predict with instead")
flags.DEFINE_string("input", None, "an image file, a folder of images or a quoted glob")
flags.DEFINE_string("out", None, "output folder (outside the input folder)")
flags.DEFINE_enum("degrade", None, list(PRESETS), "also segment a copy degraded by this preset")
flags.DEFINE_integer("seed", 0, "with --degrade: seed of the per-image degradation draws")
flags.DEFINE_float("alpha", 0.5, "weight of the class colours in the overlay (0..1)")
flags.DEFINE_integer(
    "image_bucket", None, "pad inputs to multiples of this (default eval.image_bucket or 32)"
)
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_bool("debug", False, "show the traceback of errors (or LQSEG_DEBUG=1)")
flags.mark_flags_as_required(["config", "input", "out"])


@report_errors
def main(argv):
    del argv
    setup_logging()
    from lqseg_jax.eval.evaluate import load_converted_state, restore_workdir
    from lqseg_jax.predict import Predictor, check_out, find_images, predict_files

    f = flags.FLAGS
    config = flag_config("config")
    if (f.workdir is None) == (f.converted is None):
        raise app.UsageError("give exactly one of --workdir and --converted")
    if f.step is not None and f.workdir is None:
        raise app.UsageError("--step N needs --workdir")
    if not 0.0 <= f.alpha <= 1.0:
        raise app.UsageError(f"--alpha {f.alpha}: expected a weight in 0..1")
    files, folder, ignored = find_images(f.input)
    out = Path(f.out)
    check_out(out, folder, files)
    if f.workdir is not None:
        trainer, state = restore_workdir(config, f.workdir, f.step)
    else:
        trainer, state = load_converted_state(config, f.converted)
    predictor = Predictor(trainer, state, image_bucket=f.image_bucket)
    summary = predict_files(
        predictor, files, out, degrade=f.degrade, seed=f.seed, alpha=f.alpha, progress=f.progress
    )
    per_image = "_labels, _color, _overlay" + (
        ", _degraded_labels, _degraded_color, _compare" if f.degrade else ""
    )
    print(f"wrote {len(summary.written)} of {len(files)} images to {out} ({per_image} .png each)")
    if ignored:
        print(f"skipped {ignored} files of {folder} without an image suffix")
    if summary.failed:
        print(f"{len(summary.failed)} files could not be read and were skipped:", file=sys.stderr)
        for path, why in summary.failed:
            print(f"  {path}: {why}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    run_absl(main)
