"""Evaluate a training workdir's checkpoint, or converted released weights, on config.eval.split.

    python scripts/eval.py --config configs/daformer.py:tiny --workdir runs/tiny [--step 40]
    python scripts/eval.py --config configs/rass.py --converted converted/rass \\
        --config.model.tokenizer=converted/sd21/tokenizer --config.prompt.tags_file=tags/ade_val.json
    python scripts/eval.py --config configs/rass.py:tiny --workdir runs/rass_tiny --robustness
    python scripts/eval.py --config configs/refign.py:darkzurich --converted converted/refign_dz --protocol test
    python scripts/eval.py --config configs/refign.py:acdc --converted converted/refign_acdc --predict

Writes OUT/metrics.json (mIoU, per_class_iou, num_images), per_class_iou.txt and pictures
(image | prediction | ground truth) under OUT/pictures, and prints the table; OUT is --out, else
WORKDIR/eval or CONVERTED/eval. --protocol val (default) evaluates config.eval.split as training-time
evaluation does; --protocol test is refign's test stage: eval.test_split (default eval.split) with the labels
at full resolution. Either way the config's eval.extra_sets (Dark Zurich: Nighttime Driving, BDD100k-night)
follow, each in OUT/<name>/ with its own table, and OUT/summary.json holds the mIoU of every set
(lqseg_jax/eval/refign_protocols.py). With --robustness the same images are evaluated clean and degraded at
the light / medium / heavy presets (seeded by --degradation_seed and the image index): OUT/robustness.json
(mIoU per severity), OUT/robustness.png (the curve) and one result folder per severity.

--predict writes, instead, the predictions of eval.predict_split (default test: ACDC 2000, Dark Zurich 151
unlabelled images) as refign's predict stage does, with a progress bar: OUT/preds/<Dataset>/<image name>
(8-bit train ids at the image's size, 1080x1920: what the ACDC and Dark Zurich servers score) and
OUT/color_preds/<Dataset>/<image name> (Cityscapes-palette PNG); for Dark Zurich also the zip its CodaLab
server takes, OUT/DarkZurich_test_submission.zip. OUT is --out, else WORKDIR/predict or CONVERTED/predict,
and must lie outside the dataset folder.

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
flags.DEFINE_string(
    "out", None, "results folder (default WORKDIR/eval or CONVERTED/eval; with --predict .../predict)"
)
flags.DEFINE_enum(
    "protocol", "val", ["val", "test"], "val: eval.split as in training; test: refign's test stage"
)
flags.DEFINE_bool("predict", False, "write the predictions of eval.predict_split instead of evaluating")
flags.DEFINE_bool("robustness", False, "also evaluate degraded copies at the light/medium/heavy presets")
flags.DEFINE_integer("degradation_seed", 0, "seed of the per-image degradation draws (--robustness)")
flags.DEFINE_bool("debug", False, "show the traceback of errors (or LQSEG_DEBUG=1)")
flags.mark_flags_as_required(["config"])


@report_errors
def main(argv):
    del argv
    setup_logging()
    initialize_from_env()
    from lqseg_jax.eval.evaluate import load_converted_state, restore_workdir
    from lqseg_jax.eval.refign_protocols import check_predict_out, evaluate_protocol, predict_split
    from lqseg_jax.eval.robustness import robustness_curve

    f = flags.FLAGS
    config = flag_config("config")
    if (f.workdir is None) == (f.converted is None):
        raise app.UsageError("give exactly one of --workdir and --converted")
    if f.step is not None and f.workdir is None:
        raise app.UsageError("--step N needs --workdir")
    if f.predict and f.robustness:
        raise app.UsageError("give at most one of --predict and --robustness")
    out = Path(f.out) if f.out else Path(f.workdir or f.converted) / ("predict" if f.predict else "eval")
    if f.predict:
        check_predict_out(config, out)
    if f.workdir is not None:
        trainer, state = restore_workdir(config, f.workdir, f.step)
    else:
        trainer, state = load_converted_state(config, f.converted)
    if f.predict:
        record = predict_split(trainer, state, out)
        print(
            f"wrote {record['num_images']} {record['dataset']} {record['split']} predictions: train ids in "
            f"{record['preds']}, colours in {record['color_preds']}"
        )
        if "submission" in record:
            print(f"the zip for the benchmark server: {record['submission']}")
        return
    if f.robustness:
        record = robustness_curve(trainer, state, out, seed=f.degradation_seed)
        print("\n".join(f"{name:<8} mIoU {miou:6.2f}" for name, miou in record["mIoU"].items()))
        print(
            f"{record['num_images']} images; curve in {out}/robustness.png, values in {out}/robustness.json"
        )
        return
    results = evaluate_protocol(trainer, state, out, f.protocol)
    for k, (name, summary) in enumerate(results.items()):
        where = out / name if k else out
        if len(results) > 1:
            print(f"\n== {name}: {summary['source']} ({f.protocol} protocol)")
        print(summary["table"])
        print(
            f"mIoU {summary['mIoU']:.2f} on {summary['num_images']} images; results in {where}/metrics.json, "
            f"pictures in {where}/pictures/"
        )
    if len(results) > 1:
        print("\n" + "\n".join(f"{name:<20} mIoU {s['mIoU']:6.2f}" for name, s in results.items()))
        print(f"all sets in {out}/summary.json")


if __name__ == "__main__":
    run_absl(main)
