"""`make demo`: writes the synthetic scenes, trains each demo network on CPU, evaluates, prints mIoU.

Default: DAFormer (MiT-B0) and tiny RASS; `--variants daformer,mask2former` compares the two heads.

Runs from scratch each time into runs/demo/<variant>; the dataset is written once to data/synthetic.
"""

import argparse
import logging
import shutil
import time
from pathlib import Path

from absl import logging as absl_logging

from lqseg_jax.eval.evaluate import evaluate_workdir
from lqseg_jax.train.config import load_config
from lqseg_jax.train.loop import train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--variants",
        default="daformer,rass",
        help="comma-separated configs/demo.py variants (daformer, mask2former, rass)",
    )
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
    results = {}
    for variant in args.variants.split(","):
        config = load_config(f"configs/demo.py:{variant}")
        workdir = Path(args.out) / variant
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"== {variant}: training {config.total_steps} steps on {config.data.root} ==", flush=True)
        t0 = time.time()
        train(config, workdir)
        summary = evaluate_workdir(config, workdir)
        results[variant] = (summary["mIoU"], time.time() - t0)
        print(summary["table"])
        print(f"pictures (image | prediction | ground truth): {workdir / 'eval' / 'pictures'}/")
    print("\n== demo results (synthetic validation split) ==")
    for variant, (miou, seconds) in results.items():
        print(f"{variant:<12} mIoU {miou:6.2f}   ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
