"""RASS training-step throughput, peak memory and inference FPS (ours, JAX), next to the paper's 3.4 FPS.

Training: the jitted, sharded Trainer step of configs/rass.py (on-device degradation, VAE + UNet at t = 1
with LoRA, projections, Mask2Former head and criterion, AdamW) on random 512x512 crops, batch 2 per device,
bf16 compute, random weights (speed only). Inference: `scripts/eval.py`'s step (the system's sliding-window
backbone, the head once, crop-and-resize to the label) on one 512x683 image (an ADE20K validation shape:
ResizeShortestEdge 512, padded to the 512x704 canvas, two windows), images per second.
Peak memory: the device's peak_bytes_in_use (GPU/TPU); on CPU, which does not report it, the process's
peak resident memory.

Without a GPU or TPU, --tiny is implied: configs/rass.py:tiny (96x96 crops, its 96x128 evaluation canvas),
the numbers then measure the code path, not the hardware. The last line is a JSON object.

    python benchmarks/rass_step.py [--tiny] [--steps 10] [--per-device 2] [--dtype bfloat16]
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


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="configs/rass.py:tiny (implied without an accelerator)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--per-device", type=int, default=2, help="training images per device")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", action="store_true", help="rematerialise the UNet blocks")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    tiny = args.tiny or backend == "cpu"

    config = load_config("configs/rass.py:tiny" if tiny else "configs/rass.py")
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
        jax.block_until_ready(eval_step(params, rest, eval_batch))
        compile_eval_s = time.perf_counter() - t0
        eval_times = []
        for _ in range(max(3, args.steps // 2)):
            t0 = time.perf_counter()
            jax.block_until_ready(eval_step(params, rest, eval_batch))
            eval_times.append(time.perf_counter() - t0)
    fps = n_eval / statistics.median(eval_times)

    result = {
        "config": "configs/rass.py:tiny" if tiny else "configs/rass.py",
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
        **memory,
        "init_s": init_s,
        "compile_train_s": compile_train_s,
        "infer_canvas": eval_hw,
        "infer_fps": fps,
        "compile_infer_s": compile_eval_s,
        "paper_fps": PAPER_FPS,
        "fps_over_paper": fps / PAPER_FPS,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
