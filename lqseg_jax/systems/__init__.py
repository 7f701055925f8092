"""Systems by name: config.system -> System subclass (imported lazily)."""

from __future__ import annotations

import importlib

import ml_collections

from .base import System

SYSTEMS = {
    "daformer": "lqseg_jax.systems.daformer:DAFormerSystem",
    "mask2former": "lqseg_jax.systems.mask2former:Mask2FormerSystem",
    "rass": "lqseg_jax.systems.rass:RASSSystem",
    "uda": "lqseg_jax.systems.uda:UDASystem",
    "uawarpc": "lqseg_jax.systems.uawarpc:UAWarpCSystem",
}


def get_system(config: ml_collections.ConfigDict) -> System:
    if config.system not in SYSTEMS:
        raise ValueError(f"config.system must be one of {sorted(SYSTEMS)}, got {config.system!r}")
    module, name = SYSTEMS[config.system].split(":")
    return getattr(importlib.import_module(module), name)(config)
