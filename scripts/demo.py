"""`make demo`: writes the synthetic scenes, trains each demo network on CPU, evaluates, prints mIoU.

Default: DAFormer (MiT-B0) and tiny RASS; `--variants daformer,mask2former` compares the two heads.
`--variants uda`: domain adaptation on the synthetic paired adverse data (Cityscapes-layout scenes ->
ACDC-layout night/fog/rain): configs/refign.py:tiny trained source-only and with self-training UDA for the
same steps, both evaluated on the adverse val split (data/synthetic_adverse).

Runs from scratch each time into runs/demo/<variant>; the dataset is written once to data/synthetic.
Compiled programs go to a persistent cache in runs/demo/jax_cache, so a second run compiles far less.
XLA's C++ log is limited to fatal messages: on 2 cores the first tiny-RASS step compiles for minutes and
XLA would print an alarming "Very slow compile?" line; the demo says instead what it is doing.
"""

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before jax loads XLA: see the docstring
# The demo's virtualenv has no torch (RASS uses only transformers' CLIP tokenizer): no advice about it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax
from absl import logging as absl_logging

from lqseg_jax.cli import add_debug_flag, report_errors
from lqseg_jax.eval.evaluate import evaluate_workdir
from lqseg_jax.train.config import load_config
from lqseg_jax.train.loop import train


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--variants",
        default="daformer,rass",
        help="comma-separated variants: configs/demo.py's (daformer, mask2former, rass) and uda",
    )
    parser.add_argument("--out", default="runs/demo")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
    cache = Path(args.out) / "jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    first = not any(cache.glob("*"))
    results = {}
    runs = []
    for variant in args.variants.split(","):
        if variant == "uda":  # the adaptation demo: both runs, same network, data and steps
            runs += [("source_only", "configs/refign.py:tiny,source_only"), ("uda", "configs/refign.py:tiny")]
        else:
            runs.append((variant, f"configs/demo.py:{variant}"))
    for variant, config_path in runs:
        config = load_config(config_path)
        workdir = Path(args.out) / variant
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"== {variant}: training {config.total_steps} steps on {config.data.root} ==", flush=True)
        if first:
            print(
                "(first run: compiling the train step takes a few minutes on 2 cores; cached for the next run)"
            )
        t0 = time.time()
        train(config, workdir)
        summary = evaluate_workdir(config, workdir)
        results[variant] = (summary["mIoU"], time.time() - t0)
        print(summary["table"])
        print(f"pictures (image | prediction | ground truth): {workdir / 'eval' / 'pictures'}/")
    print("\n== demo results (synthetic validation split; uda / source_only: its adverse conditions) ==")
    for variant, (miou, seconds) in results.items():
        print(f"{variant:<12} mIoU {miou:6.2f}   ({seconds:.0f} s)")
    if "uda" in results and "source_only" in results:
        print(f"UDA - source-only: {results['uda'][0] - results['source_only'][0]:+.2f} mIoU")


if __name__ == "__main__":
    main()
