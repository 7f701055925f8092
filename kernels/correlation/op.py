"""Dispatching entry point for local correlation.

impl "auto" picks the Pallas GPU kernel on GPU, the Pallas TPU kernel on TPU and the pure-JAX
reference elsewhere (CPU). The kernels are wrapped in one `jax.custom_vjp` whose backward runs the
kernels' own backward. A kernel that cannot take a call (dtype, channels, patch) hands it to the
reference and logs why, once per reason; asking for a kernel on the wrong backend without `interpret`
is an error, never a silent fallback. Under `jax.set_mesh` the kernels run per batch shard.
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from . import pallas_gpu, pallas_tpu
from .reference import local_correlation_reference

IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}
_PLATFORM = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}

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


def resolve_impl(impl: str, x1, patch_size: int, dilation_patch: int, interpret: Any = False) -> str:
    """The implementation that runs for this call: 'reference', 'pallas_gpu' or 'pallas_tpu'."""
    if impl not in IMPLS:
        raise ValueError(f"local_correlation: impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "reference")
        if impl == "reference":
            _log_once(
                logging.INFO,
                f"local_correlation: impl='auto' runs the pure-JAX reference on backend {backend!r}",
            )
            return impl
        interpret = False
    if impl == "reference":
        return impl
    if not interpret and backend != _PLATFORM[impl]:
        raise ValueError(
            f"local_correlation impl={impl!r} needs a {_PLATFORM[impl]} backend, found {backend!r}; "
            "pass interpret=True to run the kernel in Pallas interpret mode"
        )
    reason = _KERNELS[impl].unsupported_reason(x1, patch_size, dilation_patch)
    if reason is not None:
        _log_once(
            logging.WARNING,
            f"local_correlation: {impl} cannot take this call ({reason}); using the pure-JAX reference",
        )
        return "reference"
    return impl


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _kernel_op(impl, patch_size, dilation_patch, interpret, x1, x2):
    return _KERNELS[impl].forward(
        x1, x2, patch_size=patch_size, dilation_patch=dilation_patch, interpret=interpret
    )


def _kernel_op_fwd(impl, patch_size, dilation_patch, interpret, x1, x2):
    return _kernel_op(impl, patch_size, dilation_patch, interpret, x1, x2), (x1, x2)


def _kernel_op_bwd(impl, patch_size, dilation_patch, interpret, residuals, grad_output):
    x1, x2 = residuals
    return _KERNELS[impl].backward(
        x1, x2, grad_output, patch_size=patch_size, dilation_patch=dilation_patch, interpret=interpret
    )


_kernel_op.defvjp(_kernel_op_fwd, _kernel_op_bwd)


def _split_batch_over_mesh(fn, batch: int):
    """Run `fn` per batch shard when a mesh is set (`jax.set_mesh`).

    XLA cannot partition a Pallas custom call: on sharded inputs it would gather the whole batch onto
    every device and compute it there. Images are independent, so the kernel runs under
    `jax.shard_map` with the batch split over all non-manual mesh axes.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    axes = tuple(
        name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind != jax.sharding.AxisType.Manual
    )
    size = int(np.prod([mesh.shape[name] for name in axes], dtype=np.int64))
    if size == 1:
        return fn
    if batch % size:
        _log_once(
            logging.WARNING,
            f"local_correlation: batch {batch} does not split over mesh axes {axes} ({size} devices); "
            "the kernel runs on the whole batch on every device",
        )
        return fn
    spec = P(axes)
    return jax.shard_map(fn, in_specs=(spec, spec), out_specs=spec, axis_names=set(axes), check_vma=False)


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
    no 1/c normalisation. impl: "auto", "reference", "pallas_gpu" or "pallas_tpu". interpret: run a
    Pallas kernel in interpret mode (True, or a `pltpu.InterpretParams` for pallas_tpu); for tests on CPU.
    """
    patch_size, dilation_patch = _check_inputs(x1, x2, patch_size, dilation_patch)
    impl = resolve_impl(impl, x1, patch_size, dilation_patch, interpret)
    if impl == "reference":
        return local_correlation_reference(x1, x2, patch_size=patch_size, dilation_patch=dilation_patch)
    kernel = functools.partial(_kernel_op, impl, patch_size, dilation_patch, interpret)
    return _split_batch_over_mesh(kernel, x1.shape[0])(x1, x2)
