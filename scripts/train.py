"""Train (or resume) an experiment.

    python scripts/train.py --config configs/daformer.py:tiny --workdir runs/tiny [--config.total_steps=40]

Resumes from WORKDIR's latest checkpoint. Several processes: see lqseg_jax/train/distributed.py.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lqseg_jax.train.distributed import initialize_from_env

config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and results go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    initialize_from_env()
    from lqseg_jax.train.loop import train  # after jax.distributed is up

    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
