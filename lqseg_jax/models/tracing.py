"""Fast tracing of model construction (abstract init, jitted init).

flax's `Variable.set_value` probes `getattr(value, "sharding", None)`. On a tracer, JAX answers with an
AttributeError whose message `_origin_msg()` scans the whole jaxpr built so far, and every RNG draw
during init does this. Tracing an init therefore costs time quadratic in the number of parameters:
61 s for MiT-B5's `nnx.eval_shape` on CPU, 3.9 s without the message. Inside `fast_init_tracing()` that
message is empty, and only there: errors raised elsewhere keep their full text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from flax import nnx
from jax._src.interpreters import partial_eval as _pe

T = TypeVar("T")


@contextlib.contextmanager
def fast_init_tracing() -> Iterator[None]:
    tracer = getattr(_pe, "DynamicJaxprTracer", None)
    original = getattr(tracer, "_origin_msg", None)
    if original is None:  # a JAX without this hook: nothing to speed up
        yield
        return
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original


@contextlib.contextmanager
def light_compilation() -> Iterator[None]:
    """XLA's most expensive optimisations off while inside: for one-off computations such as an eager
    model build, where each op's compile time matters and its run time does not."""
    import jax

    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def abstract_model(make: Callable[[], T]) -> T:
    """`nnx.eval_shape(make)` without the quadratic tracing cost: shapes only, no memory."""
    with fast_init_tracing():
        return nnx.eval_shape(make)


def param_count(model: nnx.Module) -> int:
    """Number of parameters (nnx.Param leaves) of a real or abstract model."""
    import math

    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
