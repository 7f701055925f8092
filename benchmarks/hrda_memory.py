"""Peak memory of the full HRDA* UDA training step, from XLA's compiled-memory analysis (nothing runs).

The jitted Trainer step of configs/hrda.py (MiT-B5 + DAFormer head student with the scale attention, EMA
teacher with its sliding detail crops, ImageNet-side encoder for the feature distance, ClassMix, AdamW) at
1024x1024 crops, batch 2 source + 2 target, bf16 compute (fp32 parameters and optimizer state), lowered
on abstract inputs and compiled for one device of this host's backend; `compiled.memory_analysis()` gives
the argument, output, temporary and generated-code sizes; the peak is arguments + temporaries + outputs
- aliased (donated) bytes. Reported next to the original HRDA's 22.5 GB (one Titan RTX, lhoyer/HRDA #14;
benchmarks/RESULTS.md). --remat rematerialises the student's encoder in the backward pass
(model.hrda.remat). --block-remat POLICY builds every MiT of the step with `block_remat=POLICY`
(lqseg_jax/models/mit.py: each block under nnx.remat with that jax.checkpoint_policies policy; only the
student's is differentiated, so the teacher and the ImageNet encoder just run forward). --head-remat
rematerialises the student's DAFormer decode head in both HRDA student passes (the head is passed to
hrda.student_forward wrapped in nnx.remat, as uda.py wraps the encoder for --remat). --scan-blocks /
--no-scan-blocks sets model.scan_blocks (every MiT's stages as rematerialised scans: mit.py scan_blocks;
configs/hrda.py turns it on), otherwise the config's value holds; block remat needs --no-scan-blocks.
--aspp barrier|loop runs every DAFormer head's depthwise-separable ASPP branches one after another in this
process (daformer_head.ASPPWrapper.__call__ replaced): "barrier" through optimization barriers, "loop" as
a scan over the branch index with a rematerialised lax.switch body (the change proposed for
daformer_head.py in benchmarks/RESULTS.md; same outputs, gradients and BatchNorm statistics). Both apply the
change in this process only (the presets / hrda.student_forward), as uda.py would with the config keys
proposed in RESULTS.md.

--dump DIR writes XLA's dumps (after-optimisation HLO, buffer assignment, live ranges) of the step to DIR,
for benchmarks/hrda_memory.py --analyse DIR: the temporaries live at the peak of the schedule, summed by
source line (the first lqseg_jax frames) and by forward residual / backward temporary. With --dump,
--assignment-only reads the figures from XLA's buffer assignment (the memory-usage report's total: the
same peak as memory_analysis, 20729166256 vs 20729099564 bytes for --depths 3,6,2,3) as soon as it is
written and stops there: on this CPU the LLVM code generation after it is most of the compile time.

--depths D1,D2,D3,D4 replaces the MiT preset's block counts in this process (widths, heads, crops and batch
unchanged): without remat every block keeps its own activations for the backward pass, so the peak grows
linearly in each stage's depth, and two shallower compiles extrapolate the full one where compiling all
52 MiT-B5 blocks takes too long (an XLA CPU compile of the full step is single-threaded and slow).

    python benchmarks/hrda_memory.py [--crop 1024] [--batch 2] [--dtype bfloat16] [--remat] [--config C]
                                     [--depths 3,6,40,3] [--block-remat nothing_saveable] [--head-remat]
                                     [--scan-blocks | --no-scan-blocks] [--aspp barrier|loop]
                                     [--dump DIR]
    python benchmarks/hrda_memory.py --analyse DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import threading
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from lqseg_jax.models import daformer_head, hrda, layers, mit
from lqseg_jax.train.config import load_config
from lqseg_jax.train.trainer import Trainer

ORIGINAL_GB = 22.5  # HRDA, one Titan RTX (performance-anchors.md)
GB = 1e9


def step_memory(config, assignment_dump: str | None = None) -> dict:
    """Compiled-memory figures (bytes) of the config's train step on one device, and the compile time.
    With `assignment_dump` (the --dump folder) the figures are read from XLA's buffer assignment as soon as
    it is written, before code generation (see --assignment-only)."""
    trainer = Trainer(config)
    b = config.batch_size
    h, w = config.data.crop
    sh = trainer.batch_sharding
    batch = dict(
        image_src=jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=sh),
        label_src=jax.ShapeDtypeStruct((b, h, w), jnp.uint8, sharding=sh),
        image_trg=jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=sh),
        image_ref=jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=sh),
    )
    rng = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()

    def compile_step():
        with jax.set_mesh(trainer.mesh):
            return trainer._train_step_jit.lower(trainer.abstract_state, batch, rng).compile()

    if assignment_dump is not None:
        threading.Thread(target=compile_step, daemon=True).start()
        return dict(**assignment_memory(assignment_dump), assigned_s=round(time.perf_counter() - start, 1))
    compiled = compile_step()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    out = dict(
        argument_bytes=int(m.argument_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes),
        code_bytes=int(m.generated_code_size_in_bytes),
        compile_s=round(seconds, 1),
        params=int(trainer.num_params),
    )
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def assignment_memory(dump: str, poll_s: float = 5.0) -> dict:
    """Waits for the train step's buffer assignment in `dump`, then its figures (bytes): the total XLA
    allocates (parameters, temporaries and outputs, donated outputs in their parameters' buffers: the
    same peak as memory_analysis, to within XLA's few-KB constants) and the temporaries."""
    report = None
    while report is None or time.time() - report.stat().st_mtime < poll_s:  # written and settled
        time.sleep(poll_s)
        report = next(Path(dump).glob("*train_step.cpu_after_optimizations-memory-usage-report.txt"), None)
    total = int(re.search(r"Total bytes: (\d+)", report.read_text()).group(1))
    assignment = Path(str(report).replace("-memory-usage-report", "-buffer-assignment")).read_text()
    temp = int(re.search(r"allocation \d+: size (\d+), preallocated-temp", assignment).group(1))
    return dict(peak_bytes=total, temp_bytes=temp, method="XLA buffer assignment (before code generation)")


def _call(module, *args):
    return module(*args)


def remat_student_head() -> None:
    """hrda.student_forward gets the decode head wrapped in nnx.remat (this process only)."""
    forward = hrda.student_forward

    def student_forward(backbone, head, scale_attention, x, key, os=hrda.HEAD_OS):
        return forward(backbone, partial(nnx.remat(_call), head), scale_attention, x, key, os)

    hrda.student_forward = student_forward


def _barrier_aspp(self, x):
    outs = []
    for branch in self.aspp_modules:
        if outs:
            x, outs = jax.lax.optimization_barrier((x, outs))
        outs.append(branch(x))  # (b, h, w, channels)
    return self.bottleneck(jnp.concatenate(outs, axis=-1))  # (b, h, w, channels)


def _loop_aspp(self, x):
    branches = list(self.aspp_modules)
    looped = [i for i, b in enumerate(branches) if isinstance(b, layers.DepthwiseSeparableConvModule)]
    split = [nnx.split(branches[i]) for i in looped]  # the same structure: they differ in dilation only

    def run(k):
        def apply(states):
            module = nnx.merge(split[k][0], states[k], copy=True)
            return module(x), nnx.state(module, nnx.BatchStat)  # (b, h, w, channels), updated statistics

        return apply

    @partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    def body(_, k):  # the backward recomputes each branch in its own iteration too
        return None, jax.lax.switch(k, [run(k) for k in range(len(looped))], [st for _, st in split])

    _, (ys, stats) = jax.lax.scan(body, None, jnp.arange(len(looped)))  # (n, b, h, w, channels)
    outs = [None if i in looped else b(x) for i, b in enumerate(branches)]
    for k, i in enumerate(looped):
        nnx.update(branches[i], jax.tree.map(lambda v, k=k: v[k], stats))
        outs[i] = ys[k]  # (b, h, w, channels)
    return self.bottleneck(jnp.concatenate(outs, axis=-1))  # (b, h, w, channels)


def aspp_order(order: str) -> None:
    """Every DAFormer head's ASPP runs its depthwise-separable branches one after another (this process
    only). "barrier": each branch's input goes through an optimization barrier with the previous branches'
    outputs; "loop": the branches as a jax.lax.scan over their index with a rematerialised jax.lax.switch
    body (one 1024-channel depthwise branch at a time, structurally, forward and backward)."""
    daformer_head.ASPPWrapper.__call__ = dict(barrier=_barrier_aspp, loop=_loop_aspp)[order]


# ----------------------------------------------------------------------------- dump analysis
_LIBRARY_FRAMES = re.compile(r"site-packages|/trainer\.py|hrda_memory\.py")


def _stack_frames(hlo: str):
    """stack_frame_id -> the chain of 'file:line' (innermost first) from the HLO text's frame tables."""

    def section(name: str, end: str) -> str:
        return hlo[hlo.index(f"\n{name}\n") : hlo.index(f"\n{end}\n")]

    files = {int(i): f for i, f in re.findall(r'^(\d+) "(.*)"$', section("FileNames", "FunctionNames"), re.M)}
    locations = {
        int(i): (int(f), int(line))
        for i, f, line in re.findall(
            r"^(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)",
            section("FileLocations", "StackFrames"),
            re.M,
        )
    }
    start = hlo.index("\nStackFrames\n")
    frames = {
        int(i): (int(loc), int(parent))
        for i, loc, parent in re.findall(
            r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)",
            hlo[start : hlo.index("\n\n", start)],
            re.M,
        )
    }

    def chain(frame: int) -> list[str]:
        out, seen = [], set()
        while frame in frames and frame not in seen:  # parent_frame_id is the parent's id + 1
            seen.add(frame)
            loc, parent = frames[frame]
            f, line = locations[loc]
            if not _LIBRARY_FRAMES.search(files[f]):
                out.append(f"{Path(files[f]).name}:{line}")
            frame = parent - 1
        return out

    return chain


def analyse(dump: str, top: int = 25) -> dict:
    """The train step's temporaries live at the peak of XLA's schedule, from a --dump folder."""
    prefix = next(Path(dump).glob("*train_step.cpu_after_optimizations.txt")).as_posix()[: -len(".txt")]
    assignment = Path(f"{prefix}-buffer-assignment.txt").read_text()
    live_ranges = Path(f"{prefix}-live-range.txt").read_text()
    hlo = Path(f"{prefix}.txt").read_text()
    start = assignment.index("preallocated-temp:")
    end = assignment.find("\nallocation", start)
    temp = re.findall(
        r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)",
        assignment[start : end if end > 0 else None],
    )
    ranges = {}
    for name, first, last in re.findall(
        r"^\s+(\S+)\{[^}]*\}:(\d+)-(\d+)", live_ranges[live_ranges.index("BufferLiveRange") :], re.M
    ):
        ranges.setdefault(name, (int(first), int(last)))
    chain = _stack_frames(hlo)
    source = {}
    for name, metadata in re.findall(r"^\s*(?:ROOT )?%(\S+) = .*?metadata=\{([^}]*)\}", hlo, re.M):
        op = re.search(r'op_name="([^"]*)"', metadata)
        frame = re.search(r"stack_frame_id=(\d+)", metadata)
        frames = chain(int(frame.group(1))) if frame else []
        kind = "backward" if op and "transpose(" in op.group(1) else "forward"
        calls = [f for f in frames if f.startswith("uda.py")]  # which student / teacher call
        source[name] = f"{kind} {' < '.join(frames[:3])} (from {' < '.join(calls)})"
    buffers = [(name, int(size), *ranges[name], shape) for name, size, shape in temp if name in ranges]
    delta = collections.Counter()
    for _, size, first, last, _ in buffers:
        delta[first] += size
        delta[last + 1] -= size
    live, peak, t_peak = 0, 0, 0
    for t in sorted(delta):
        live += delta[t]
        if live > peak:
            peak, t_peak = live, t
    by_source = collections.Counter()
    for name, size, first, last, shape in buffers:
        if first <= t_peak <= last:
            opcode = re.sub(r"[.]\d+$", "", name)  # copies, transposes: no metadata of their own
            by_source[source.get(name, f"(no metadata) {opcode} {shape.split('{')[0]}")] += size
    return dict(
        peak_live_temp_gb=round(peak / GB, 2),
        schedule_position=f"{t_peak} of {max(delta)}",
        live_at_peak_gb={k: round(v / GB, 3) for k, v in by_source.most_common(top)},
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/hrda.py:acdc")
    parser.add_argument("--crop", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2, help="source images (= target images) per step")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", action="store_true", help="model.hrda.remat: recompute the encoder")
    parser.add_argument(
        "--depths", default="", help="blocks per MiT stage, e.g. 3,6,2,3 (default: the preset)"
    )
    parser.add_argument("--block-remat", default=None, help="MiT block_remat policy, e.g. nothing_saveable")
    parser.add_argument("--head-remat", action="store_true", help="remat the student's decode head")
    parser.add_argument(
        "--scan-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model.scan_blocks: MiT stages as rematerialised scans (default: the config's)",
    )
    parser.add_argument(
        "--aspp", choices=("parallel", "barrier", "loop"), default="parallel", help="ASPP branch order"
    )
    parser.add_argument("--dump", default=None, help="write XLA's dumps of the step to this folder")
    parser.add_argument(
        "--assignment-only",
        action="store_true",
        help="with --dump: report from XLA's buffer assignment and stop before code generation",
    )
    parser.add_argument("--analyse", default=None, help="print what is live at the peak of a --dump folder")
    args = parser.parse_args(argv)
    if args.analyse:
        print(json.dumps(analyse(args.analyse), indent=1))
        return
    if args.assignment_only and not args.dump:
        parser.error("--assignment-only needs --dump DIR")
    if args.dump:
        flags = f"--xla_dump_to={args.dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}"
        if "jax._src.xla_bridge" in sys.modules and jax._src.xla_bridge._backends:
            raise RuntimeError("--dump must be set before JAX starts its backend")
    config = load_config(
        args.config,
        **{
            "model.dtype": args.dtype,
            "model.hrda.remat": args.remat,
            "batch_size": args.batch,
            "data.crop": (args.crop, args.crop),
            "mesh.data": 1,
            "mesh.fsdp": 1,
        },
    )
    if args.scan_blocks is not None:
        config.model.scan_blocks = args.scan_blocks
    preset = config.model.backbone.removeprefix("mit_")
    if args.depths:
        mit.MIT_PRESETS[preset] = {
            **mit.MIT_PRESETS[preset],
            "depths": tuple(int(d) for d in args.depths.split(",")),
        }
    if args.block_remat:
        mit.MIT_PRESETS[preset] = {**mit.MIT_PRESETS[preset], "block_remat": args.block_remat}
    if args.head_remat:
        remat_student_head()
    if args.aspp != "parallel":
        aspp_order(args.aspp)
    result = dict(
        config=args.config,
        depths=list(mit.MIT_PRESETS[preset]["depths"]),
        crop=args.crop,
        batch=f"{args.batch}+{args.batch}",
        dtype=args.dtype,
        remat=args.remat,
        block_remat=args.block_remat,
        head_remat=args.head_remat,
        scan_blocks=config.model.scan_blocks,
        aspp=args.aspp,
        backend=jax.default_backend(),
        **step_memory(config, args.dump if args.assignment_only else None),
    )
    result["peak_gb"] = round(result["peak_bytes"] / GB, 2)
    result["original_gb"] = ORIGINAL_GB
    result["ratio_to_original"] = round(result["peak_gb"] / ORIGINAL_GB, 3)
    print(json.dumps(result), flush=True)
    if args.assignment_only:
        os._exit(0)  # the compile thread is still generating code: stop it with the process


if __name__ == "__main__":
    main()
