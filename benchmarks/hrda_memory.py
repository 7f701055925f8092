"""Peak memory of the full HRDA* UDA training step, from XLA's compiled-memory analysis (nothing runs).

The jitted Trainer step of configs/hrda.py (MiT-B5 + DAFormer head student with the scale attention, EMA
teacher with its sliding detail crops, ImageNet-side encoder for the feature distance, ClassMix, AdamW) at
1024x1024 crops, batch 2 source + 2 target, bf16 compute (fp32 parameters and optimizer state), lowered
on abstract inputs and compiled for one device of this host's backend; `compiled.memory_analysis()` gives
the argument, output, temporary and generated-code sizes; the peak is arguments + temporaries + outputs
- aliased (donated) bytes. Reported next to the original HRDA's 22.5 GB (one Titan RTX, lhoyer/HRDA #14;
benchmarks/RESULTS.md). --remat rematerialises the student's encoder in the backward pass
(model.hrda.remat).

--depths D1,D2,D3,D4 replaces the MiT preset's block counts in this process (widths, heads, crops and batch
unchanged): without remat every block keeps its own activations for the backward pass, so the peak grows
linearly in each stage's depth, and two shallower compiles extrapolate the full one where compiling all
52 MiT-B5 blocks takes too long (an XLA CPU compile of the full step is single-threaded and slow).

    python benchmarks/hrda_memory.py [--crop 1024] [--batch 2] [--dtype bfloat16] [--remat] [--config C]
                                     [--depths 3,6,40,3]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from lqseg_jax.models import mit
from lqseg_jax.train.config import load_config
from lqseg_jax.train.trainer import Trainer

ORIGINAL_GB = 22.5  # HRDA, one Titan RTX (performance-anchors.md)
GB = 1e9


def step_memory(config) -> dict:
    """Compiled-memory figures (bytes) of the config's train step on one device, and the compile time."""
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
    with jax.set_mesh(trainer.mesh):
        compiled = trainer._train_step_jit.lower(trainer.abstract_state, batch, rng).compile()
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
    args = parser.parse_args(argv)
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
    preset = config.model.backbone.removeprefix("mit_")
    if args.depths:
        mit.MIT_PRESETS[preset] = {
            **mit.MIT_PRESETS[preset],
            "depths": tuple(int(d) for d in args.depths.split(",")),
        }
    result = dict(
        config=args.config,
        depths=list(mit.MIT_PRESETS[preset]["depths"]),
        crop=args.crop,
        batch=f"{args.batch}+{args.batch}",
        dtype=args.dtype,
        remat=args.remat,
        backend=jax.default_backend(),
        **step_memory(config),
    )
    result["peak_gb"] = round(result["peak_bytes"] / GB, 2)
    result["original_gb"] = ORIGINAL_GB
    result["ratio_to_original"] = round(result["peak_gb"] / ORIGINAL_GB, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
