"""The embedded demo: tiny networks trained on the synthetic scenes on CPU in a few minutes.

Variants, all on the same data, steps and batch:
  "daformer" (default): MiT-B0 + DAFormer head (configs/daformer.py:tiny).
  "mask2former": MiT-B0 + a narrow Mask2Former head (configs/mask2former.py:tiny).
  "rass": toy-size RASS (VAE + LoRA UNet + projections + Mask2Former head) trained on degraded images
          (configs/rass.py:tiny).
"""

import ml_collections

from lqseg_jax.train.config import load_config

VARIANTS = {
    "daformer": "configs/daformer.py:tiny",
    "mask2former": "configs/mask2former.py:tiny",
    "rass": "configs/rass.py:tiny",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "daformer"
    if variant not in VARIANTS:
        raise ValueError(f"configs/demo.py variants: {tuple(VARIANTS)}; got {variant!r}")
    c = load_config(VARIANTS[variant])
    c.total_steps = 300
    c.checkpoint.every = 300
    c.log_every = 25
    return c
