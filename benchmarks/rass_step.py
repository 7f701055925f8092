"""RASS training-step throughput, peak memory and inference FPS (ours, JAX), next to the paper's 3.4 FPS.

Training: the jitted, sharded Trainer step of configs/rass.py (on-device degradation, VAE + UNet at t = 1
with LoRA, projections, Mask2Former head and criterion, AdamW) on random 512x512 crops, batch 2 per device,
bf16 compute, random weights (speed only). Inference: `scripts/eval.py`'s step (the system's sliding-window
backbone, the head once, crop-and-resize to the label) on one 512x683 image (an ADE20K validation shape:
ResizeShortestEdge 512, padded to the 512x704 canvas, two windows), images per second.
Peak memory: the device's peak_bytes_in_use (GPU/TPU); on CPU, which does not report it, the process's
peak resident memory.

Without a GPU or TPU, --tiny is implied: configs/rass.py:tiny (96x96 crops, its 96x128 evaluation canvas),
the numbers then measure the code path, not the hardware. --smoke shrinks tiny further for a quick end-to-end
check (benchmarks/gpu_suite.py --cpu-smoke): one pixel-decoder and one transformer-decoder layer,
no degradation. FLOPs are XLA's cost analysis of each compiled step (elementwise work included, so the MFU
that benchmarks/gpu_suite.py derives from the "roofline" entries is an upper estimate of the matrix units'
share). A JSON line is printed after the training part (a partial result if inference runs out of time)
and, last, the full JSON object.

    python benchmarks/rass_step.py [--tiny | --smoke] [--steps 10] [--per-device 2] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import numpy as np

from lqseg_jax.eval.evaluate import make_eval_step
from lqseg_jax.train.config import load_config
from lqseg_jax.train.trainer import Trainer

PAPER_FPS = 3.4  # RASS, Table 1 of the paper (inference)


def peak_memory() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_device_bytes": int(stats["peak_bytes_in_use"])}
    return {"peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def xla_flops(jitted, *args) -> float | None:
    """FLOPs of the compiled program (compiling here; the jitted call that follows reuses the executable)."""
    compiled = jitted.lower(*args).compile()
    try:
        cost = compiled.cost_analysis()
    except NotImplementedError as err:  # a backend without cost analysis: no FLOPs, no MFU
        print(f"no XLA cost analysis here: {err}")
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return (cost or {}).get("flops")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="configs/rass.py:tiny (implied without an accelerator)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny, further shrunk (module docstring)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--per-device", type=int, default=2, help="training images per device")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", action="store_true", help="rematerialise the UNet blocks")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    tiny = args.tiny or args.smoke or backend == "cpu"

    config = load_config("configs/rass.py:tiny" if tiny else "configs/rass.py")
    if args.smoke:
        config.model.head.update(enc_layers=1, dec_layers=1, train_num_points=256)
        config.degradation.enabled = False
    n_dev = jax.device_count()
    config.batch_size = args.per_device * n_dev
    config.model.dtype = args.dtype
    config.model.remat = args.remat
    config.prompt.mode = "fixed"  # text embeddings are cached per prompt either way
    config.prompt.text = "sky, tree, building"
    crop = tuple(config.data.crop)
    eval_hw = (96, 128) if tiny else (512, 704)  # the eval canvas (image_bucket padding)
    valid_hw = (96, 128) if tiny else (512, 683)
    label_hw = (120, 160) if tiny else (512, 683)

    trainer = Trainer(config)
    t0 = time.perf_counter()
    state = trainer.init_state()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    b = config.batch_size
    labels = np.repeat(
        np.repeat(rng.integers(0, config.model.num_classes, (b, crop[0] // 16, crop[1] // 16)), 16, 1), 16, 2
    )
    batch = trainer.device_batch(
        {
            "image": rng.integers(0, 256, (b, *crop, 3), dtype=np.uint8),
            "label": labels.astype(np.uint8),
            "name": [f"img{i}" for i in range(b)],
        }
    )
    t0 = time.perf_counter()
    with jax.set_mesh(trainer.mesh):  # as Trainer.train_step traces it
        train_flops = xla_flops(trainer._train_step_jit, state, batch, trainer.step_rng(0))
    state, metrics = trainer.train_step(state, batch, trainer.step_rng(0))
    jax.block_until_ready(metrics)
    compile_train_s = time.perf_counter() - t0
    times = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch, trainer.step_rng(step))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    memory = peak_memory()
    result = {
        "config": "configs/rass.py:tiny" + " (--smoke)" * args.smoke if tiny else "configs/rass.py",
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "devices": n_dev,
        "jax": jax.__version__,
        "dtype": args.dtype,
        "remat": args.remat,
        "train_crop": crop,
        "train_batch": b,
        "train_step_ms": 1e3 * step_s,
        "train_images_per_s": b / step_s,
        "train_loss_last": float(metrics["loss"]),
        "train_flops": train_flops,
        **memory,
        "init_s": init_s,
        "compile_train_s": compile_train_s,
        "roofline": [{"name": "train step", "ms": 1e3 * step_s, "flops": train_flops}],
    }
    print(json.dumps(result), flush=True)  # the training part, in case inference runs out of time

    # inference: one image per step, as the original evaluates
    n_eval = n_dev  # one image per device (the batch is sharded over every device)
    image = np.zeros((n_eval, *eval_hw, 3), np.uint8)
    image[:, : valid_hw[0], : valid_hw[1]] = rng.integers(0, 256, (n_eval, *valid_hw, 3), dtype=np.uint8)
    eval_batch = trainer.device_batch(
        {
            "image": image,
            "label": np.zeros((n_eval, *label_hw), np.uint8),
            "valid": np.ones(n_eval, bool),
            "valid_hw": np.tile(np.array(valid_hw, np.int32), (n_eval, 1)),
            "label_hw": np.tile(np.array(label_hw, np.int32), (n_eval, 1)),
            "name": [f"img{i}" for i in range(n_eval)],
        }
    )
    eval_step = make_eval_step(trainer)
    params, rest = trainer.eval_params(state), state.rest
    with jax.set_mesh(trainer.mesh):
        t0 = time.perf_counter()
        infer_flops = xla_flops(eval_step, params, rest, eval_batch)
        jax.block_until_ready(eval_step(params, rest, eval_batch))
        compile_eval_s = time.perf_counter() - t0
        eval_times = []
        for _ in range(max(3, args.steps // 2)):
            t0 = time.perf_counter()
            jax.block_until_ready(eval_step(params, rest, eval_batch))
            eval_times.append(time.perf_counter() - t0)
    fps = n_eval / statistics.median(eval_times)

    infer_ms = 1e3 * statistics.median(eval_times)
    result.update(
        infer_canvas=eval_hw,
        infer_fps=fps,
        infer_flops=infer_flops,
        compile_infer_s=compile_eval_s,
        paper_fps=PAPER_FPS,
        fps_over_paper=fps / PAPER_FPS,
    )
    result["roofline"].append(
        {"name": f"inference ({n_eval} image(s))", "ms": infer_ms, "flops": infer_flops}
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
