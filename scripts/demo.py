"""`make demo`: writes the synthetic scenes, trains each demo network on CPU, evaluates, prints mIoU.

Default (`make demo`): the two systems of the project, tiny RASS (configs/demo.py:rass, on the synthetic
scenes) and Refign (configs/demo.py:refign: Refign-DAFormer ablation row 1, self-training refined with the
unaligned reference's prediction, so no alignment network is needed; 100 steps at batch 4 + 4) on the
synthetic paired adverse data (data/synthetic_adverse: Cityscapes-layout scenes -> ACDC-layout
night/fog/rain), evaluated on its adverse val split.
Single runs: configs/demo.py's `daformer`, `mask2former`, `rass`, `refign`, and the adaptation runs
`source_only`, `uda`, `refign_row1`, `refign_row6` (configs/refign.py:tiny with the flags ,source_only
,no_refign ,row1 and none), all four with the same network, data, 300 steps at batch 8 + 8, evaluated on the
adverse val split. Groups: `--variants uda` = source_only + uda; `--variants adaptation` = all four. Row 6
(aligned, trust, adaptation to the reference) uses the alignment network at OUT/uawarpc/export, trained
first by the uawarpc variant when it is missing.
`--variants uawarpc`: the alignment network: configs/uawarpc.py:tiny trained on the synthetic pairs
(data/synthetic_matching); PCK-1/5 and AEPE on the held-out val pairs (true flows, small) and on their
targets warped by the training's synthetic warps (large flows; against the target and against the
reference) before training (the untrained network, step 0) and after, beside the zero-flow baseline; the
trained network is exported to OUT/uawarpc/export (a converted folder: Refign's
config.uda.refign.alignment.path).

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

UAWARPC_CONFIG = "configs/uawarpc.py:tiny"


def matching_sets(config) -> dict[str, list[dict]]:
    """config.eval's held-out pairs as stored (small flows), and their targets warped by the training's
    synthetic warps (matching_stream.warped_eval_examples, seed 0: large flows) against the target itself and
    against the pair's reference."""
    from lqseg_jax.data_pipelines.matching_stream import eval_example, matching_source, warped_eval_examples
    from lqseg_jax.systems.uawarpc import warp_spec

    e = config.eval
    source = matching_source(e.source, e.root, e.split)
    spec = warp_spec(config)
    return {
        "val pairs": [eval_example(source[i]) for i in range(len(source))],
        "warped vs target": warped_eval_examples(source, spec, seed=0, against="target"),
        "warped vs reference": warped_eval_examples(source, spec, seed=0, against="reference"),
    }


def zero_flow(target, reference):
    """The identity matcher: flow 0 and uncertainty 0 everywhere."""
    import numpy as np

    return np.zeros((*target.shape[:3], 2), np.float32), np.zeros(target.shape[:3], np.float32)


def state_match(trainer, state):
    """match(target, reference) of `state`'s eval-mode network."""
    from lqseg_jax.eval.matching import make_match_fn

    match = make_match_fn(trainer)
    params, rest = trainer.eval_params(state), state.rest
    return lambda target, reference: match(params, rest, target, reference)


def evaluate_sets(config, sets: dict, match) -> dict:
    """Matching metrics of `match` on each set of `sets` at config.eval's size."""
    from lqseg_jax.eval.matching import evaluate_matching

    e = config.eval
    kw = dict(short_side=e.short_side, mean=config.data.mean, std=config.data.std, dims=tuple(e.dims))
    return {name: evaluate_matching(match, examples, progress=False, **kw) for name, examples in sets.items()}


def demo_uawarpc(out: Path) -> dict:
    """Trains the tiny UAWarpC into OUT/uawarpc, evaluates it before and after, exports it."""
    from lqseg_jax.data_pipelines.matching_stream import ensure_data
    from lqseg_jax.eval.evaluate import restore_workdir
    from lqseg_jax.eval.matching import export_state
    from lqseg_jax.train.trainer import Trainer

    config = load_config(UAWARPC_CONFIG)
    workdir = out / "uawarpc"
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    ensure_data(config)
    print(
        f"== uawarpc: {UAWARPC_CONFIG}, training {config.total_steps} steps on {config.data.root} ==",
        flush=True,
    )
    sets = matching_sets(config)
    results = {"zero flow": evaluate_sets(config, sets, zero_flow)}
    trainer = Trainer(config)
    results["before (step 0)"] = evaluate_sets(config, sets, state_match(trainer, trainer.init_state()))
    train(config, workdir)
    trainer, state = restore_workdir(config, workdir)
    results[f"after (step {int(state.step)})"] = evaluate_sets(config, sets, state_match(trainer, state))
    export = export_state(trainer, state, workdir / "export", f"{workdir} step {int(state.step)}")
    seconds = time.time() - t0
    print(
        f"held-out synthetic pairs ({config.eval.root} {config.eval.split}, short side {config.eval.short_side}; "
        "warped: the val targets under the training's synthetic warps, seed 0):"
    )
    for set_name in sets:
        print(f"  {set_name}:")
        for name, by_set in results.items():
            r = by_set[set_name]
            pck1, pck5 = 100 * r["PCK_1"], 100 * r["PCK_5"]
            print(f"    {name:<16} PCK-1 {pck1:6.2f}   PCK-5 {pck5:6.2f}   AEPE {r['AEPE']:7.3f} px")
    print(f"exported to {export} (Refign: config.uda.refign.alignment.path); {seconds:.0f} s")
    return results


ADAPTATION = {  # the same network, data, steps and evaluation; only the adaptation differs
    "source_only": "configs/refign.py:tiny,source_only",
    "uda": "configs/refign.py:tiny,no_refign",
    "refign_row1": "configs/refign.py:tiny,row1",
    "refign_row6": "configs/refign.py:tiny",
}
GROUPS = {"uda": ("source_only", "uda"), "adaptation": tuple(ADAPTATION)}
SINGLE = ("daformer", "mask2former", "rass", "refign", *ADAPTATION)
DEFAULT_VARIANTS = (
    "rass,refign"  # `make demo`: both systems; configs/demo.py:refign needs no alignment network
)


def planned_runs(variants: str, out: Path) -> list[tuple[str, str]]:
    """(name, config path) of each training run `variants` asks for, in order, without repeats; the
    uawarpc variant and row 6's missing alignment network are trained on the way."""
    known = dict.fromkeys((*SINGLE, *GROUPS, "uawarpc"))
    for variant in variants.split(","):
        if variant not in known:
            raise ValueError(f"--variants: each of {', '.join(known)}; got {variant!r}")
    runs = []
    for variant in variants.split(","):
        if variant == "uawarpc":
            demo_uawarpc(out)
            continue
        for name in GROUPS.get(variant, (variant,)):
            if name == "refign_row6" and not (out / "uawarpc" / "export" / "meta.json").is_file():
                demo_uawarpc(out)
            run = (name, ADAPTATION.get(name, f"configs/demo.py:{name}"))
            if run not in runs:
                runs.append(run)
    return runs


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated: {', '.join(SINGLE)}, groups {', '.join(GROUPS)}, and uawarpc (see above)",
    )
    parser.add_argument("--out", default="runs/demo")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
    out = Path(args.out)
    cache = out / "jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    first = not any(cache.glob("*"))
    results = {}
    runs = planned_runs(args.variants, out)
    for variant, config_path in runs:
        config = load_config(config_path)
        if variant == "refign_row6":  # the alignment network the uawarpc variant trained
            config.uda.refign.alignment.path = str(out / "uawarpc" / "export")
        workdir = out / variant
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
    if not results:
        return
    print(
        "\n== demo results (mIoU on the val split: synthetic scenes; adaptation runs: adverse conditions) =="
    )
    for variant, (miou, seconds) in results.items():
        where = "adverse val" if variant in (*ADAPTATION, "refign") else "val"
        print(f"{variant:<12} mIoU {miou:6.2f}   {where:<11} ({seconds:.0f} s)")
    if "uda" in results and "source_only" in results:
        print(f"UDA - source-only: {results['uda'][0] - results['source_only'][0]:+.2f} mIoU")
    if "refign_row6" in results and "uda" in results:
        print(f"Refign (row 6) - UDA: {results['refign_row6'][0] - results['uda'][0]:+.2f} mIoU")


if __name__ == "__main__":
    main()
