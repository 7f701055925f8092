"""Evaluate the latest checkpoint of a workdir on config.eval.split.

    python scripts/eval.py --config configs/daformer.py:tiny --workdir runs/tiny

Writes WORKDIR/eval/metrics.json (mIoU, per_class_iou, num_images), per_class_iou.txt and pictures
(image | prediction | ground truth) under WORKDIR/eval/pictures, and prints the table.
"""

import logging
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lqseg_jax.train.distributed import initialize_from_env

config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "the training workdir whose latest checkpoint is evaluated")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    initialize_from_env()
    from lqseg_jax.eval.evaluate import evaluate_workdir

    summary = evaluate_workdir(flags.FLAGS.config, flags.FLAGS.workdir)
    out = Path(flags.FLAGS.workdir) / "eval"
    print(summary["table"])
    print(
        f"mIoU {summary['mIoU']:.2f} on {summary['num_images']} images; results in {out}/metrics.json, "
        f"pictures in {out}/pictures/"
    )


if __name__ == "__main__":
    app.run(main)
