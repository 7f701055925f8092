"""Dispatching entry point for multi-scale deformable attention.

impl "auto" picks the Pallas GPU kernel on GPU, the Pallas TPU kernel on TPU and the pure-JAX
reference elsewhere (CPU). The kernels are wrapped in one `jax.custom_vjp` whose backward runs the
kernels' own backward. A kernel that cannot take a call (dtype, head dim, ...) hands it to the
reference and logs why, once per reason; asking for a kernel on the wrong backend without
`interpret` is an error, never a silent fallback. Under `jax.set_mesh` the kernels run per batch shard.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from . import pallas_gpu, pallas_tpu
from .reference import ms_deform_attn_reference

IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}
_PLATFORM = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def _check_inputs(
    value, spatial_shapes, sampling_locations, attention_weights
) -> tuple[tuple[int, int], ...]:
    """Validate shapes and dtypes; return spatial_shapes as a tuple of int pairs."""
    try:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"spatial_shapes must be a static sequence of (h, w) int pairs, got {spatial_shapes!r}"
        ) from err
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be non-empty with positive sizes, got {shapes}")
    if value.ndim != 4:
        raise ValueError(f"value must be (batch, S, heads, head_dim), got shape {value.shape}")
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (batch, Q, heads, levels, points, 2), got shape {sampling_locations.shape}"
        )
    b, s, heads, _ = value.shape
    lb, q, lheads, levels, points, _ = sampling_locations.shape
    if (lb, lheads, levels) != (b, heads, len(shapes)):
        raise ValueError(
            f"sampling_locations {sampling_locations.shape} must have batch={b}, heads={heads} "
            f"(from value {value.shape}) and levels={len(shapes)} (from spatial_shapes)"
        )
    if attention_weights.shape != (b, q, heads, levels, points):
        raise ValueError(
            f"attention_weights must have shape {(b, q, heads, levels, points)}, got {attention_weights.shape}"
        )
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(
            f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions but value has S={s}"
        )
    for name, x in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return shapes


def resolve_impl(impl: str, value, sampling_locations, interpret: Any = False) -> str:
    """The implementation that runs for this call: 'reference', 'pallas_gpu' or 'pallas_tpu'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "reference")
        if impl == "reference":
            _log_once(
                logging.INFO,
                f"ms_deform_attn: impl='auto' runs the pure-JAX reference on backend {backend!r}",
            )
            return impl
        interpret = False
    if impl == "reference":
        return impl
    if not interpret and backend != _PLATFORM[impl]:
        raise ValueError(
            f"ms_deform_attn impl={impl!r} needs a {_PLATFORM[impl]} backend, found {backend!r}; "
            "pass interpret=True to run the kernel in Pallas interpret mode"
        )
    reason = _KERNELS[impl].unsupported_reason(value, sampling_locations)
    if reason is not None:
        _log_once(
            logging.WARNING,
            f"ms_deform_attn: {impl} cannot take this call ({reason}); using the pure-JAX reference",
        )
        return "reference"
    return impl


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kernel_op(impl, spatial_shapes, interpret, value, sampling_locations, attention_weights):
    return _KERNELS[impl].forward(
        value, spatial_shapes, sampling_locations, attention_weights, interpret=interpret
    )


def _kernel_op_fwd(impl, spatial_shapes, interpret, value, sampling_locations, attention_weights):
    out = _kernel_op(impl, spatial_shapes, interpret, value, sampling_locations, attention_weights)
    return out, (value, sampling_locations, attention_weights)


def _kernel_op_bwd(impl, spatial_shapes, interpret, residuals, grad_output):
    value, sampling_locations, attention_weights = residuals
    return _KERNELS[impl].backward(
        value, spatial_shapes, sampling_locations, attention_weights, grad_output, interpret=interpret
    )


_kernel_op.defvjp(_kernel_op_fwd, _kernel_op_bwd)


def _split_batch_over_mesh(fn, batch: int):
    """Run `fn` per batch shard when a mesh is set (`jax.set_mesh`).

    XLA cannot partition a Pallas custom call: on sharded inputs it would gather the whole batch onto
    every device and compute it there. Every (batch, head) is independent, so the kernel runs under
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
            f"ms_deform_attn: batch {batch} does not split over mesh axes {axes} ({size} devices); "
            "the kernel runs on the whole batch on every device",
        )
        return fn
    spec = P(axes)
    return jax.shard_map(
        fn, in_specs=(spec, spec, spec), out_specs=spec, axis_names=set(axes), check_vma=False
    )


def ms_deform_attn(
    value: jnp.ndarray,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
    *,
    impl: str = "auto",
    interpret: Any = False,
) -> jnp.ndarray:
    """Multi-scale deformable attention (Deformable-DETR / Mask2Former semantics).

    value (b, s, h, d) with s = sum of h_l * w_l over the static spatial_shapes ((h_l, w_l), ...);
    sampling_locations (b, q, h, l, p, 2) normalised (x, y), align_corners=False, zero padding;
    attention_weights (b, q, h, l, p). Returns (b, q, h*d) in value.dtype (float32 accumulation).
    impl: "auto", "reference", "pallas_gpu" or "pallas_tpu". interpret: run a Pallas kernel in
    interpret mode (True, or a `pltpu.InterpretParams` for pallas_tpu); for tests on CPU.
    """
    shapes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    impl = resolve_impl(impl, value, sampling_locations, interpret)
    if impl == "reference":
        return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)
    kernel = functools.partial(_kernel_op, impl, shapes, interpret)
    return _split_batch_over_mesh(kernel, value.shape[0])(value, sampling_locations, attention_weights)
