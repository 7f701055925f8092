"""Evaluate UAWarpC matching (AEPE, PCK-1/3/5/10, AUSE; refign.md 3.10) on a matching set.

    python scripts/eval_matching.py --config configs/uawarpc.py:eval --converted weights/uawarpc_megadepth \\
        --config.eval.source=robotcar-matching --config.eval.root=data/robotcar_matching_records
    python scripts/eval_matching.py --config configs/uawarpc.py:tiny --workdir runs/uawarpc_tiny
    python scripts/eval_matching.py --config configs/uawarpc.py:tiny --init --out runs/uawarpc_tiny/eval_init
    python scripts/eval_matching.py --config configs/uawarpc.py:stage1 --workdir runs/stage1 \
        --export weights/uawarpc_stage1     # stage 2's starting point (configs/uawarpc.py:stage2)

Sets (config.eval.source at eval.root, split eval.split): "megadepth" (test1600Pairs records), "robotcar-
matching" (test6511 records, 1024x1024 at load) written by scripts/prepare_data.py, or "synthetic" (the
synthetic paired dataset's pairs, matches from the stored flow every 4th pixel). Images are resized to the
short side eval.short_side (480; 0 keeps them) with lanczos and padded bottom-right; the network runs in
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
    from lqseg_jax.convert.common import save_converted
    from lqseg_jax.eval.evaluate import restore_workdir

    trainer, state = restore_workdir(config, workdir, step)
    save_converted(out, trainer.model_from_state(state), {"source": f"{workdir} step {int(state.step)}"})
    return str(out)


def run(config, *, workdir=None, step=None, converted=None, init=False, out=None, progress=True) -> dict:
    """Evaluates and writes OUT/matching.json and OUT/matching.md; returns the results."""
    import jax
    from flax import nnx

    from lqseg_jax.data_pipelines.matching_stream import eval_example, matching_source
    from lqseg_jax.eval.evaluate import load_converted_state, restore_workdir
    from lqseg_jax.eval.matching import evaluate_matching, format_table
    from lqseg_jax.models.uawarpc import confidence
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
    source = matching_source(e.source, e.root, e.split)
    count = min(len(source), e.max_pairs) if e.max_pairs else len(source)
    examples = (eval_example(source[i]) for i in range(count))

    graphdef, weights = nnx.split(trainer.model_from_state(state))

    @jax.jit
    def match(weights, target, reference):
        model = nnx.merge(graphdef, weights)
        flow, log_var = model.dense_flow(target, reference)  # (1, H, W, 2), (1, H, W, 1)
        return flow, 1.0 - confidence(log_var)[..., 0]

    results = evaluate_matching(
        lambda t, r: match(weights, t, r),
        _Sized(examples, count),
        short_side=e.short_side,
        mean=config.data.mean,
        std=config.data.std,
        progress=progress,
    )
    title = f"UAWarpC matching on {e.source} {e.split} ({e.root})"
    table = format_table(results, title)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matching.json").write_text(
        json.dumps({"source": e.source, "split": e.split, **results}, indent=1)
    )
    (out / "matching.md").write_text(table + "\n")
    return {**results, "table": table, "out": str(out)}


class _Sized:
    """An iterator with a length (for the progress bar)."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self):
        return self.n


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
