"""The embedded demo: tiny networks trained on CPU in a few minutes (scripts/demo.py, `make demo`).

Variants on the synthetic scenes (data/synthetic), all on the same data, 300 steps and batch 8:
  "daformer" (default): MiT-B0 + DAFormer head (configs/daformer.py:tiny).
  "mask2former": MiT-B0 + a narrow Mask2Former head (configs/mask2former.py:tiny).
  "rass": toy-size RASS (VAE + LoRA UNet + projections + Mask2Former head) trained on degraded images
          (configs/rass.py:tiny).
And Refign for `make demo`:
  "refign": Refign-DAFormer ablation row 1 (configs/refign.py:tiny,row1: self-training with the teacher's
          target prediction blended 50/50 with its prediction of the unaligned reference; no alignment
          network) on the synthetic paired adverse data, shortened to fit `make demo`: 100 steps at batch
          4 source + 4 target pairs (the comparison runs of `scripts/demo.py --variants adaptation` use
          300 steps at 8 + 8).
"""

import ml_collections

from lqseg_jax.train.config import load_config

VARIANTS = {
    "daformer": "configs/daformer.py:tiny",
    "mask2former": "configs/mask2former.py:tiny",
    "rass": "configs/rass.py:tiny",
    "refign": "configs/refign.py:tiny,row1",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "daformer"
    if variant not in VARIANTS:
        raise ValueError(f"configs/demo.py variants: {tuple(VARIANTS)}; got {variant!r}")
    c = load_config(VARIANTS[variant])
    c.total_steps = 300
    if variant == "refign":  # shortened to fit `make demo`
        c.total_steps = 100
        c.batch_size = 4
    c.checkpoint.every = c.total_steps
    c.log_every = 25
    return c
