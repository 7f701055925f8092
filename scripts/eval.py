"""Evaluate a training workdir's checkpoint, or converted released weights, on config.eval.split.

    python scripts/eval.py --config configs/daformer.py:tiny --workdir runs/tiny [--step 40]
    python scripts/eval.py --config configs/rass.py --converted converted/rass \\
        --config.model.tokenizer=converted/sd21/tokenizer --config.prompt.tags_file=tags/ade_val.json
    python scripts/eval.py --config configs/rass.py:tiny --workdir runs/rass_tiny --robustness

Writes OUT/metrics.json (mIoU, per_class_iou, num_images), per_class_iou.txt and pictures
(image | prediction | ground truth) under OUT/pictures, and prints the table; OUT is --out, else
WORKDIR/eval or CONVERTED/eval. With --robustness the same images are evaluated clean and degraded at the
light / medium / heavy presets (seeded by --degradation_seed and the image index): OUT/robustness.json
(mIoU per severity), OUT/robustness.png (the curve) and one result folder per severity.

The workdir's latest checkpoint is evaluated unless --step N names another; a damaged checkpoint (files
changed since the save, or non-finite values) is refused. Errors in the inputs end in one line and exit
code 2 (--debug or LQSEG_DEBUG=1: the traceback).
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lqseg_jax.cli import flag_config, report_errors, run_absl, setup_logging
from lqseg_jax.train.distributed import initialize_from_env

config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint is evaluated")
flags.DEFINE_integer("step", None, "with --workdir: evaluate this saved step instead of the latest")
flags.DEFINE_string("converted", None, "a scripts/convert.py output folder to evaluate instead of a workdir")
flags.DEFINE_string("out", None, "results folder (default WORKDIR/eval or CONVERTED/eval)")
flags.DEFINE_bool("robustness", False, "also evaluate degraded copies at the light/medium/heavy presets")
flags.DEFINE_integer("degradation_seed", 0, "seed of the per-image degradation draws (--robustness)")
flags.DEFINE_bool("debug", False, "show the traceback of errors (or LQSEG_DEBUG=1)")
flags.mark_flags_as_required(["config"])


@report_errors
def main(argv):
    del argv
    setup_logging()
    initialize_from_env()
    from lqseg_jax.eval.evaluate import evaluate, load_converted_state, restore_workdir
    from lqseg_jax.eval.robustness import robustness_curve

    f = flags.FLAGS
    config = flag_config("config")
    if (f.workdir is None) == (f.converted is None):
        raise app.UsageError("give exactly one of --workdir and --converted")
    if f.step is not None and f.workdir is None:
        raise app.UsageError("--step N needs --workdir")
    if f.workdir is not None:
        trainer, state = restore_workdir(config, f.workdir, f.step)
    else:
        trainer, state = load_converted_state(config, f.converted)
    out = Path(f.out) if f.out else Path(f.workdir or f.converted) / "eval"
    if f.robustness:
        record = robustness_curve(trainer, state, out, seed=f.degradation_seed)
        print("\n".join(f"{name:<8} mIoU {miou:6.2f}" for name, miou in record["mIoU"].items()))
        print(
            f"{record['num_images']} images; curve in {out}/robustness.png, values in {out}/robustness.json"
        )
        return
    summary = evaluate(trainer, state, out)
    print(summary["table"])
    print(
        f"mIoU {summary['mIoU']:.2f} on {summary['num_images']} images; results in {out}/metrics.json, "
        f"pictures in {out}/pictures/"
    )


if __name__ == "__main__":
    run_absl(main)
