"""Dispatching entry point for local correlation.

impl "auto" runs the pure-JAX reference (the Pallas kernels are not in place yet); "reference" asks
for it explicitly.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import jax
import jax.numpy as jnp

from .reference import local_correlation_reference

IMPLS = ("auto", "reference")

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def _check_inputs(x1, x2, patch_size, dilation_patch) -> tuple[int, int]:
    """Validate shapes, dtypes and the patch; return (patch_size, dilation_patch) as ints."""
    for name, x in (("x1", x1), ("x2", x2)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"local_correlation: {name} must be (batch, height, width, channels), "
                f"got shape {getattr(x, 'shape', type(x).__name__)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"local_correlation: {name} must be floating point, got {x.dtype}")
    if x1.shape != x2.shape:
        raise ValueError(f"local_correlation: x1 {x1.shape} and x2 {x2.shape} must have the same shape")
    if x1.dtype != x2.dtype:
        raise ValueError(f"local_correlation: x1 ({x1.dtype}) and x2 ({x2.dtype}) must have the same dtype")
    if min(x1.shape) < 1:
        raise ValueError(f"local_correlation: every dimension must be positive, got shape {x1.shape}")
    ints = []
    for name, v in (("patch_size", patch_size), ("dilation_patch", dilation_patch)):
        try:
            n = None if isinstance(v, bool) else operator.index(v)
        except TypeError:
            n = None
        if n is None or n < 1:
            raise ValueError(f"local_correlation: {name} must be a positive static int, got {v!r}")
        ints.append(n)
    return ints[0], ints[1]


def resolve_impl(impl: str, interpret: Any = False) -> str:
    """The implementation that runs for this call."""
    if impl not in IMPLS:
        raise ValueError(f"local_correlation: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        _log_once(
            logging.INFO,
            f"local_correlation: impl='auto' runs the pure-JAX reference on backend {jax.default_backend()!r}",
        )
    return "reference"


def local_correlation(
    x1: jnp.ndarray,
    x2: jnp.ndarray,
    *,
    patch_size: int = 9,
    dilation_patch: int = 1,
    impl: str = "auto",
    interpret: Any = False,
) -> jnp.ndarray:
    """Local correlation of x1 with x2 over a patch of displacements (spatial-correlation-sampler).

    x1, x2 (b, h, w, c) of one floating dtype. Returns (b, h, w, patch_size**2) in that dtype, float32
    accumulation: channel (dy + r)*patch_size + (dx + r), r = (patch_size - 1) // 2, holds
    sum_c x1[y, x, c] * x2[y + dy*dilation_patch, x + dx*dilation_patch, c], zero outside the image,
    no 1/c normalisation. impl: "auto" or "reference". interpret: for the Pallas kernels (unused yet).
    """
    patch_size, dilation_patch = _check_inputs(x1, x2, patch_size, dilation_patch)
    resolve_impl(impl, interpret)
    return local_correlation_reference(x1, x2, patch_size=patch_size, dilation_patch=dilation_patch)
