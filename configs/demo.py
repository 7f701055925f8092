"""The embedded demo: tiny networks trained on the synthetic scenes on CPU in a few minutes.

Variants: "daformer" (default): MiT-B0 + DAFormer head (configs/daformer.py:tiny) with the demo's step count.
"""

import ml_collections

from lqseg_jax.train.config import load_config

VARIANTS = ("daformer",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "daformer"
    if variant not in VARIANTS:
        raise ValueError(f"configs/demo.py variants: {VARIANTS}; got {variant!r}")
    c = load_config("configs/daformer.py:tiny")
    c.total_steps = 300
    c.checkpoint.every = 300
    c.log_every = 25
    return c
