"""Dispatching entry point for multi-scale deformable attention."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from .reference import ms_deform_attn_reference

IMPLS = ("auto", "reference")


def ms_deform_attn(
    value: jnp.ndarray,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> jnp.ndarray:
    """value (b, s, h, d), locations (b, q, h, l, p, 2), weights (b, q, h, l, p) -> (b, q, h*d)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    del interpret
    return ms_deform_attn_reference(
        value, tuple(map(tuple, spatial_shapes)), sampling_locations, attention_weights
    )
