"""Train (or resume) an experiment.

    python scripts/train.py --config configs/daformer.py:tiny --workdir runs/tiny [--config.total_steps=40]

Resumes from WORKDIR's newest intact checkpoint; one run per workdir at a time. Several processes: see
lqseg_jax/train/distributed.py. Errors in the inputs end in one line and exit code 2 (--debug or
LQSEG_DEBUG=1: the traceback).
"""

import logging

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lqseg_jax.cli import flag_config, report_errors, run_absl
from lqseg_jax.train.distributed import initialize_from_env

config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and results go here")
flags.DEFINE_bool("debug", False, "show the traceback of errors (or LQSEG_DEBUG=1)")
flags.mark_flags_as_required(["config", "workdir"])


@report_errors
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    config = flag_config("config")  # before anything is created: a bad config leaves no workdir behind
    initialize_from_env()
    from lqseg_jax.train.loop import train  # after jax.distributed is up

    train(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    run_absl(main)
