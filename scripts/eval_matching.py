"""Evaluate UAWarpC matching (AEPE, PCK-1/3/5/10, AUSE; refign.md 3.10) on a matching set.

    python scripts/eval_matching.py --config configs/uawarpc.py:eval --converted weights/uawarpc_megadepth \\
        --config.eval.source=robotcar-matching --config.eval.root=data/robotcar_matching_records
    python scripts/eval_matching.py --config configs/uawarpc.py:tiny --workdir runs/uawarpc_tiny
    python scripts/eval_matching.py --config configs/uawarpc.py:tiny --init --out runs/uawarpc_tiny/eval_init
    python scripts/eval_matching.py --config configs/uawarpc.py:stage1 --workdir runs/stage1 \
        --export weights/uawarpc_stage1     # stage 2's starting point (configs/uawarpc.py:stage2)

Sets (config.eval.source at eval.root, split eval.split): "megadepth" (test1600Pairs records), "robotcar-
matching" (test6511 records, 1024x1024 at load) written by scripts/prepare_data.py, or "synthetic" (the
synthetic paired dataset's pairs, matches from the stored flow every 4th pixel). Images are resized with
lanczos to eval.dims (h, w) when set (:stage1 / :stage2: MegaDepth val at 480x720, refign's validation, also
run by the training loop every eval_every steps), else to the short side eval.short_side (:eval: the test
protocol's 480; 0 keeps them), and padded bottom-right; the network runs in
eval mode, one pair at a time. Writes OUT/matching.json and OUT/matching.md (the table) and prints the
table; OUT is --out, else WORKDIR/eval or CONVERTED/eval. Errors in the inputs end in one line and exit
code 2 (--debug or LQSEG_DEBUG=1: the traceback).
"""

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lqseg_jax.cli import flag_config, report_errors, run_absl, setup_logging

config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint is evaluated")
flags.DEFINE_integer("step", None, "with --workdir: evaluate this saved step instead of the latest")
flags.DEFINE_string("converted", None, "a scripts/convert.py uawarpc output folder to evaluate")
flags.DEFINE_bool("init", False, "evaluate the freshly initialised network of the config (a baseline)")
flags.DEFINE_string("out", None, "results folder (default WORKDIR/eval or CONVERTED/eval)")
flags.DEFINE_string(
    "export",
    None,
    "write the weights as a converted folder (stage 2's model.pretrained.path) instead of evaluating",
)
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_bool("debug", False, "show the traceback of errors (or LQSEG_DEBUG=1)")
flags.mark_flags_as_required(["config"])


def export(config, workdir, step, out) -> str:
    """WORKDIR's checkpoint (default the latest) as a `scripts/convert.py`-style folder at OUT: how stage 2
    starts from a stage-1 workdir (configs/uawarpc.py:stage2, model.pretrained.path = OUT)."""
    from lqseg_jax.eval.evaluate import restore_workdir
    from lqseg_jax.eval.matching import export_state

    trainer, state = restore_workdir(config, workdir, step)
    return str(export_state(trainer, state, out, f"{workdir} step {int(state.step)}"))


def run(config, *, workdir=None, step=None, converted=None, init=False, out=None, progress=True) -> dict:
    """Evaluates and writes OUT/matching.json and OUT/matching.md; returns the results."""
    from lqseg_jax.eval.evaluate import load_converted_state, restore_workdir
    from lqseg_jax.eval.matching import evaluate_state, format_table
    from lqseg_jax.train.trainer import Trainer

    if sum(x is not None and x is not False for x in (workdir, converted, init or None)) != 1:
        raise app.UsageError("give exactly one of --workdir, --converted and --init")
    if workdir is not None:
        trainer, state = restore_workdir(config, workdir, step)
    elif converted is not None:
        trainer, state = load_converted_state(config, converted)
    else:
        trainer = Trainer(config)
        state = trainer.init_state()
    if out is None:
        if init:
            raise app.UsageError("--init needs --out")
        out = Path(workdir or converted) / "eval"
    e = config.eval
    results = evaluate_state(trainer, state, progress=progress)
    title = f"UAWarpC matching on {e.source} {e.split} ({e.root})"
    table = format_table(results, title)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matching.json").write_text(
        json.dumps({"source": e.source, "split": e.split, **results}, indent=1)
    )
    (out / "matching.md").write_text(table + "\n")
    return {**results, "table": table, "out": str(out)}


@report_errors
def main(argv):
    del argv
    setup_logging()
    f = flags.FLAGS
    config = flag_config("config")
    if f.step is not None and f.workdir is None:
        raise app.UsageError("--step N needs --workdir")
    if f.export:
        if f.workdir is None:
            raise app.UsageError("--export DIR needs --workdir")
        print(f"weights of {f.workdir} written to {export(config, f.workdir, f.step, f.export)}")
        return
    results = run(
        config,
        workdir=f.workdir,
        step=f.step,
        converted=f.converted,
        init=f.init,
        out=f.out,
        progress=f.progress,
    )
    print(results["table"])
    print(f"results in {results['out']}/matching.json")


if __name__ == "__main__":
    run_absl(main)
