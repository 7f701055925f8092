"""Train (or resume) an experiment.

    python scripts/train.py --config configs/daformer.py:tiny --workdir runs/tiny [--config.total_steps=40]
    python scripts/train.py --config configs/daformer.py:tiny --config.total_steps=40 --print_config

Resumes from WORKDIR's newest intact checkpoint; one run per workdir at a time. The resolved config (file,
variant and overrides) is written to WORKDIR/config.json when the run starts (a resumed run whose config
differs writes WORKDIR/config.<step>.json beside it); --print_config prints it and exits without creating
anything. Several processes: see lqseg_jax/train/distributed.py. Errors in the inputs end in one line and
exit code 2 (--debug or LQSEG_DEBUG=1: the traceback).
"""

from absl import flags
from ml_collections import config_flags

from lqseg_jax.cli import flag_config, report_errors, run_absl, setup_logging
from lqseg_jax.train.config import config_json
from lqseg_jax.train.distributed import initialize_from_env

config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and results go here")
flags.DEFINE_bool("print_config", False, "print the resolved config as JSON and exit (no workdir needed)")
flags.DEFINE_bool("debug", False, "show the traceback of errors (or LQSEG_DEBUG=1)")
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
    ["workdir", "print_config"],
    lambda f: f["print_config"] or bool(f["workdir"]),
    message="--workdir is required (where checkpoints and metrics go), unless --print_config is given",
)


@report_errors
def main(argv):
    del argv
    setup_logging()
    config = flag_config("config")  # before anything is created: a bad config leaves no workdir behind
    if flags.FLAGS.print_config:
        print(config_json(config))
        return
    initialize_from_env()
    from lqseg_jax.train.loop import train  # after jax.distributed is up

    train(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    run_absl(main)
